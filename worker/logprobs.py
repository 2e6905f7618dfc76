"""Log-probabilities for the wire: the chosen token's and the top-k, as `TokenLogprobs`.

Computed from the raw distribution (log_softmax of the model's logits, float32), before
penalties, temperature and filters, as vLLM does by default. Only the rows that asked are sent;
the conversion to Python lists is one device->host copy per tensor.
"""

from __future__ import annotations

import numpy as np
import torch

from shared.protocol import MAX_LOGPROBS, TokenLogprobs


def _chosen_and_top(logprobs: torch.Tensor, chosen: torch.Tensor, k: int):
    chosen_logprob = logprobs.gather(-1, chosen[:, None])
    rank = (logprobs > chosen_logprob).sum(dim=-1) + 1  # 1-based; ties share the better rank
    top_logprobs, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], chosen[:, None][:, :0])
    return chosen_logprob[:, 0], rank, top_ids, top_logprobs


def to_wire(logprobs: torch.Tensor, chosen: torch.Tensor, ks: list[int]) -> list[TokenLogprobs]:
    """logprobs float32 ``[R, vocab]``, chosen int64 ``[R]``, ks: top-k wanted per row."""
    k_max = min(max(ks, default=0), MAX_LOGPROBS)
    chosen_logprob, rank, top_ids, top_logprobs = _chosen_and_top(logprobs, chosen, k_max)
    ids, lps = top_ids.tolist(), top_logprobs.tolist()
    return [TokenLogprobs(token_id=t, logprob=lp, rank=r, top_ids=ids[i][:k], top_logprobs=lps[i][:k])
            for i, (t, lp, r, k) in enumerate(zip(chosen.tolist(), chosen_logprob.tolist(), rank.tolist(), ks))]


def sampled_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, num_logprobs: np.ndarray) -> list[TokenLogprobs | None]:
    """Per batch row: the sampled token's logprobs, or None where the row did not ask."""
    wanted = np.nonzero(num_logprobs >= 0)[0]
    index = torch.from_numpy(wanted).to(logprobs.device)
    wire = to_wire(logprobs[index], tokens[index], num_logprobs[wanted].tolist())  # not index_select: slow on CPU
    out: list[TokenLogprobs | None] = [None] * len(num_logprobs)
    for row, item in zip(wanted.tolist(), wire):
        out[row] = item
    return out


def prompt_logprobs(logits: torch.Tensor, next_ids: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """One prompt chunk: logits ``[T, vocab]`` at positions p predict the prompt tokens
    `next_ids` ``[T]`` at p + 1."""
    return to_wire(torch.log_softmax(logits.to(torch.float32), dim=-1), next_ids, [k] * len(next_ids))
