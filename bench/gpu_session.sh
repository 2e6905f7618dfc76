#!/usr/bin/env bash
# Everything the Triton/CUDA path needs from a GPU, in one call of the device tool (issue 4):
# native kernel and end-to-end tests, bench/kernels.py, bench/decode_graphs.py. About 8 minutes
# on an H100 once started; each part is time-boxed so a slow one cannot eat the others' time.
#
# Before the call, on the development machine (the GPU box has no package access):
#   mkdir -p .wheels && cp ../shared/wheels/*.whl .wheels/
#   pip download -q -d .wheels --only-binary=:all: --python-version 3.12 --no-deps \
#       pytest iniconfig pluggy packaging
# then run `bash bench/gpu_session.sh` with carry [".wheels"]. Everything lands in $OUT:
# versions.json, nvidia-smi.txt, pytest.log (+ junit XML), kernels JSON/log, decode-graphs
# JSON/log. Copy the JSON results into bench/results/ and commit them with the device named.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
if [ -d .wheels ]; then
  python3 -m pip install -q --no-index --no-deps --target .site .wheels/*.whl > "$OUT/pip.log" 2>&1
  export PYTHONPATH=$PWD/.site:$PWD
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 - > "$OUT/versions.json" <<'PY'
import json, platform, torch, triton, transformers
print(json.dumps({"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
                  "transformers": transformers.__version__, "python": platform.python_version()}, indent=2))
PY
cat "$OUT/versions.json"

step() {  # step NAME SECONDS COMMAND...: run, time-boxed, output to $OUT/NAME.log; print its tail
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - started)) s"
  tail -n 15 "$OUT/$name.log"
}

# Native: every kernel case (fp16/bf16 included), the backend against torch, decode graphs
# captured for real, and a small random Llama against transformers (graphs and eager).
step pytest 300 python3 -m pytest -q -p no:cacheprovider -m "not slow" --junitxml "$OUT/pytest.xml" \
  tests/kernels tests/worker/test_attention_backends.py tests/worker/test_decode_graphs.py \
  tests/worker/test_triton_end_to_end.py
# The quick kernel grid first (batch 1 and 64, contexts 512 and 4096: the targets' shapes), the
# full grid last, so a slow full grid costs only itself.
step kernels-quick 120 python3 bench/kernels.py --quick --out "$OUT/kernels-quick.json"
step decode-graphs 150 python3 bench/decode_graphs.py --out "$OUT/decode-graphs.json"
step kernels 240 python3 bench/kernels.py --out "$OUT/kernels.json"
