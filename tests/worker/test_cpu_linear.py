"""oneDNN-packed CPU linears (worker/cpu_linear.py): the same numbers as F.linear, every Linear
replaced, a tied LM head packed as a copy. The model-level agreement with transformers through
the packed path is tests/worker/test_model_vs_transformers.py (ModelRunner packs on CPU)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared.config import ServerConfig
from worker.cpu_linear import PackedLinear, onednn_available, pack_linears, should_pack
from worker.models.llama import LlamaForCausalLM, ModelArgs

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")

SMALL = ModelArgs(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, tie_word_embeddings=True)


@pytest.mark.parametrize("rows", [0, 1, 3, 17, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_float32(rows, bias):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(72, 40, generator=g)
    b = torch.randn(72, generator=g) if bias else None
    x = torch.randn(rows, 40, generator=g)
    got = PackedLinear(weight, b)(x)
    assert got.shape == (rows, 72) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_packed_linear_takes_strided_and_batched_inputs_and_bfloat16():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 32, generator=g)
    packed = PackedLinear(weight, None)
    strided = torch.randn(5, 64, generator=g)[:, ::2]
    torch.testing.assert_close(packed(strided), F.linear(strided, weight), rtol=1e-5, atol=1e-5)
    batched = torch.randn(2, 3, 32, generator=g)
    torch.testing.assert_close(packed(batched), F.linear(batched, weight), rtol=1e-5, atol=1e-5)
    w16, x16 = weight.bfloat16(), torch.randn(9, 32, generator=g).bfloat16()
    got = PackedLinear(w16, None)(x16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.linear(x16.float(), w16.float()), rtol=2e-2, atol=2e-2)


def _model(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    args = ModelArgs(**{**SMALL.__dict__, "tie_word_embeddings": tied})
    model = LlamaForCausalLM(args)
    for p in model.parameters():
        nn.init.normal_(p, 0.0, 0.05)
    return model.eval()


@pytest.mark.parametrize("tied", [True, False])
def test_pack_linears_replaces_every_linear_and_keeps_the_logits(tied):
    model = _model(tied)
    hidden = torch.randn(6, SMALL.hidden_size)
    x = torch.randn(6, SMALL.hidden_size)
    with torch.inference_mode():
        before_logits = model.compute_logits(hidden)
        before_mlp = model.layers[0].feed_forward(x)
        added = pack_linears(model)
        after_logits = model.compute_logits(hidden)
        after_mlp = model.layers[0].feed_forward(x)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 4 * SMALL.num_layers + 1  # + the LM head
    if tied:  # a packed copy of the embedding; the embedding itself stays for lookups
        assert isinstance(model.lm_head, PackedLinear) and added == 300 * 64 * 4
    else:
        assert model.lm_head is None and added == 0
    torch.testing.assert_close(after_logits, before_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after_mlp, before_mlp, rtol=1e-5, atol=1e-5)


def test_should_pack_follows_the_choice():
    cpu = torch.device("cpu")
    assert should_pack(cpu, torch.float32) and should_pack(cpu, torch.bfloat16, "onednn")
    assert not should_pack(cpu, torch.float32, "torch")
    assert not should_pack(cpu, torch.float16)  # auto: not where it does not apply
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        should_pack(cpu, torch.float16, "onednn")
    assert not should_pack(torch.device("cuda"), torch.bfloat16)


def test_config_refuses_an_unknown_cpu_linear():
    ServerConfig.from_settings(cpu_linear="torch").validate()
    with pytest.raises(ValueError, match="cpu_linear must be auto, onednn or torch"):
        ServerConfig.from_settings(cpu_linear="mkl").validate()
    with pytest.raises(ValueError, match="cpu_linear onednn needs device cpu"):
        ServerConfig.from_settings(cpu_linear="onednn", device="cuda").validate()
