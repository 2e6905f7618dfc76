import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from server_process import ServerProcess  # noqa: E402

from shared.models import resolve_model  # noqa: E402


@pytest.fixture(scope="session")
def hf_model():
    """transformers' tokenizer and model on the same GGUF weights, float32 (loaded once a session)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = resolve_model("default")
    tok = AutoTokenizer.from_pretrained(files.directory, gguf_file=files.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(files.directory, gguf_file=files.gguf_file, dtype=torch.float32)
    model.eval()
    return tok, model


@pytest.fixture(scope="session")
def hf_reference(hf_model):
    """transformers' model and tokenizer on the same GGUF weights, float32: the oracle."""
    import torch

    tok, model = hf_model

    def greedy(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                 dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=model.generation_config.eos_token_id, pad_token_id=tok.eos_token_id)
        return out[0, len(prompt_ids):].tolist()

    return tok, greedy


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(str(tmp_path_factory.mktemp("run")))
    yield srv
    srv.stop()
