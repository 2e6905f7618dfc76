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


# Prompt logprobs are computed this many positions at a time: a [chunk, vocab] float32 block each.
PROMPT_LOGPROBS_CHUNK = 256


def collect_prompt_logprobs(compute_logits, hidden: torch.Tensor, spans, device: torch.device) -> None:
    """Append this chunk's prompt logprobs to each sequence that wants them (rare: not batched).
    `spans`: `StepInputs.prompt_logprob_spans`; `compute_logits`: `ModelRunner.compute_logits`
    (None off rank 0; collective, so every rank calls it for the same rows)."""
    for seq, flat_start, first_position, count in spans:
        k = seq.params.prompt_logprobs
        for offset in range(0, count, PROMPT_LOGPROBS_CHUNK):
            n = min(PROMPT_LOGPROBS_CHUNK, count - offset)
            logits = compute_logits(hidden[flat_start + offset:flat_start + offset + n])
            if logits is None:
                # Not rank 0: placeholders keep the list as long as rank 0's, so every rank's
                # batch makes the same prompt-logprob decisions (and calls the same collectives).
                seq.prompt_logprobs.extend([None] * n)
                continue
            position = first_position + offset + 1  # of the first predicted prompt token
            next_ids = torch.tensor(seq.token_ids[position:position + n], dtype=torch.int64, device=device)
            seq.prompt_logprobs.extend(prompt_logprobs(logits, next_ids, k))
