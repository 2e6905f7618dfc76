"""transformers as the reference: greedy continuations through its own KV cache.

transformers 5 renamed the cache argument and output from ``past_key_values`` to ``cache`` and
will drop the old name; both are handled, so the tests run on every version pyproject allows.
"""

from __future__ import annotations

import inspect

import torch


def hf_greedy(hf_model, ids: list[int], num_tokens: int) -> list[int]:
    """Greedy continuation of `ids` (EOS ignored), on the model's device."""
    device = next(hf_model.parameters()).device
    name = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    cache, generated, step_input = None, [], torch.tensor([ids], device=device)
    with torch.inference_mode():
        for _ in range(num_tokens):
            out = hf_model(step_input, use_cache=True, **{name: cache})
            cache = getattr(out, name)
            generated.append(int(out.logits[0, -1].argmax()))
            step_input = torch.tensor([[generated[-1]]], device=device)
    return generated
