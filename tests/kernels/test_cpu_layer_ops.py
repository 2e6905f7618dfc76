"""kernels/cpu_layer_ops.py (the fused RMSNorm, RoPE + K/V write and SiLU * up in C++) against the
torch ops they replace: RoPE and the cache write bit for bit, the residual add bit for bit, the
norm and SiLU to float32 rounding (one bfloat16 ulp on a few elements), and the model's forward
pass with the fused ops against the same pass without them."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_kernels, cpu_layer_ops, reference
from worker.attention import AttentionMetadata
from worker.models.llama import LlamaForCausalLM, ModelArgs, apply_rope, rope_inv_freq, rope_tables

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_kernels.load() is not None, cpu_kernels.error()


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units of the dtype's last place (same-sign values)."""
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return (a.view(bits).long() - b.view(bits).long()).abs()


def _tables(positions: torch.Tensor, head_dim: int, dtype):
    args = ModelArgs(vocab_size=8, hidden_size=head_dim, intermediate_size=8, num_layers=1, num_heads=1,
                     num_kv_heads=1, head_dim=head_dim, rope_theta=100000.0)
    return rope_tables(positions.float()[:, None] * rope_inv_freq(args)[None, :], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv_is_the_torch_ops_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(1)
    tokens, hq, hkv, d, block_size = 29, 6, 2, 64, 16
    wide = torch.randn(tokens, (hq + 2 * hkv) * d + 40, generator=gen).to(dtype)
    qkv = wide[:, 8:8 + (hq + 2 * hkv) * d]  # rows further apart than their length
    cos, sin = _tables(torch.randint(0, 4000, (tokens,), generator=gen), d, dtype)
    key_cache = torch.full((6, block_size, hkv, d), float("nan"), dtype=dtype)
    value_cache = key_cache.clone()
    slots = torch.randperm(6 * block_size, generator=gen)[:tokens]
    slots[5] = -1  # a padding token: not written
    want_k_cache, want_v_cache = key_cache.clone(), value_cache.clone()

    q = cpu_layer_ops.rope_write_kv(qkv, cos, sin, hq, key_cache, value_cache, slots)

    rotated = apply_rope(qkv[:, :(hq + hkv) * d].reshape(tokens, hq + hkv, d), cos, sin)
    reference.reshape_and_cache(rotated[:, hq:], qkv[:, (hq + hkv) * d:].reshape(tokens, hkv, d),
                                want_k_cache, want_v_cache, slots)
    assert torch.equal(q, rotated[:, :hq])  # k: in the cache, checked next
    assert torch.equal(key_cache.nan_to_num(7.0), want_k_cache.nan_to_num(7.0))
    assert torch.equal(value_cache.nan_to_num(7.0), want_v_cache.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(dtype, with_residual):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(70, 576, generator=gen) * 3).to(dtype)
    weight = (torch.rand(576, generator=gen) + 0.5).to(dtype)
    residual = torch.randn(70, 576, generator=gen).to(dtype) if with_residual else None
    want_residual = None if residual is None else residual.clone()

    got = cpu_layer_ops.rms_norm(x, weight, 1e-5, residual)
    want = cpu_layer_ops.rms_norm_reference(x, weight, 1e-5, want_residual)

    if with_residual:
        assert torch.equal(residual, want_residual)  # the add is one rounded op, as torch's
    apart = _ulps_apart(got, want)
    assert int(apart.max()) <= (1 if dtype == torch.bfloat16 else 4)
    assert float((apart > 0).float().mean()) < (0.01 if dtype == torch.bfloat16 else 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype):
    gen = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(33, 2 * 1539, generator=gen) * 6).to(dtype)  # not a multiple of the vector width
    gate_up[0, :4] = torch.tensor([-200.0, -88.5, 88.5, 200.0]).to(dtype)  # past exp's clamps
    got, want = cpu_layer_ops.silu_mul(gate_up), cpu_layer_ops.silu_mul_reference(gate_up)
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=1e-30)
    if dtype == torch.bfloat16:
        assert float((got != want).float().mean()) < 0.001


def test_bad_inputs_are_refused():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="one dtype"):
        cpu_layer_ops.rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        cpu_layer_ops.rms_norm(x, torch.ones(7), 1e-5)
    cache = torch.zeros(2, 4, 1, 8)
    cos, sin = _tables(torch.arange(4), 8, torch.float32)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_layer_ops.rope_write_kv(torch.randn(4, 24), cos, sin, 1, cache, cache.clone(),
                                    torch.tensor([0, 1, 2, 8]))
    assert not cpu_layer_ops.applies(torch.randn(4, 8).half())


def _forward(model: LlamaForCausalLM, args: ModelArgs, dtype) -> torch.Tensor:
    """A prefill of two sequences (13 and 9 tokens) into fresh caches, then one decode step of
    both; the final hidden states of both steps."""
    gen = torch.Generator().manual_seed(4)
    block_size, lens = 8, [13, 9]
    caches = [(torch.zeros(8, block_size, args.num_kv_heads, args.head_dim, dtype=dtype),
               torch.zeros(8, block_size, args.num_kv_heads, args.head_dim, dtype=dtype)) for _ in model.layers]
    tables = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    slots = torch.cat([tables[b, torch.arange(n) // block_size].long() * block_size + torch.arange(n) % block_size
                       for b, n in enumerate(lens)])
    prefill = AttentionMetadata(slots, tables, torch.tensor(lens, dtype=torch.int32),
                                torch.tensor([0, 13, 22], dtype=torch.int32), decode_only=False)
    ids = torch.randint(0, args.vocab_size, (22,), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lens])
    first = model(ids, positions, prefill, caches)
    decode = AttentionMetadata(torch.tensor([13, 3 * block_size + 9]), tables,
                               torch.tensor([14, 10], dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32),
                               decode_only=True)
    second = model(torch.tensor([5, 6]), torch.tensor([13, 9]), decode, caches)
    return torch.cat([first, second])


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_forward_with_and_without_fused_ops(dtype, monkeypatch):
    args = ModelArgs(vocab_size=97, hidden_size=128, intermediate_size=160, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(args)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    model = model.to(dtype)
    calls = []
    for name in ("rms_norm", "rope_write_kv", "silu_mul"):
        real = getattr(cpu_layer_ops, name)
        monkeypatch.setattr(cpu_layer_ops, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or
                            _real(*a, **k))
    with torch.no_grad():
        fused = _forward(model, args, dtype)
        assert sorted(set(calls)) == ["rms_norm", "rope_write_kv", "silu_mul"]
        monkeypatch.setattr(cpu_layer_ops, "enabled", False)
        calls.clear()
        plain = _forward(model, args, dtype)
    assert calls == []
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(fused, plain, **tolerance)
