"""Speculative decoding settings' checks (the settings are SchedulerConfig fields, so that they are
flags of the scheduler section: --speculative-method, --num-speculative-tokens, --prompt-lookup-min/max,
--draft-model, --draft-load-format). docs/speculative.md describes the methods."""

from __future__ import annotations

SPECULATIVE_METHODS = ("none", "ngram", "draft")
MAX_SPECULATIVE_TOKENS = 16  # proposals per sequence per step, at most


def validate_speculative(method: str, num_tokens: int, lookup_min: int, lookup_max: int, max_batch: int = 0,
                         draft_model: str = "") -> None:
    """Raise ValueError naming the first bad speculative setting."""
    if max_batch < 0:
        raise ValueError(f"speculative_max_batch must be >= 0, got {max_batch}")
    if method not in SPECULATIVE_METHODS:
        raise ValueError(f"speculative_method must be one of {SPECULATIVE_METHODS}, got {method!r}")
    if not 0 <= num_tokens <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"num_speculative_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}], got {num_tokens}")
    if method != "none" and num_tokens == 0:
        raise ValueError(f"speculative_method {method} needs --num-speculative-tokens >= 1")
    if not 1 <= lookup_min <= lookup_max:
        raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {lookup_min} and {lookup_max}")
    if method == "draft" and not draft_model:
        raise ValueError("speculative_method draft needs --draft-model DIR|FILE.gguf (or default)")
    if draft_model and method != "draft":
        raise ValueError(f"--draft-model goes with --speculative-method draft, not {method}")


def validate_draft_parallel(method: str, tensor_parallel_size: int) -> None:
    """The draft model runs unsharded beside rank 0's share of the target: not with tensor parallelism."""
    if method == "draft" and tensor_parallel_size > 1:
        raise ValueError(f"speculative_method draft is not supported with tensor_parallel_size "
                         f"{tensor_parallel_size} (use ngram, or tensor_parallel_size 1; docs/speculative.md)")
