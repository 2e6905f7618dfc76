"""bench/structured.py's arithmetic: steps summed over rounds, the ratio against its target,
mask-fill time per masked step; and its requests (one seed each, the tool-call schema)."""

from __future__ import annotations

from bench.structured import TARGET_RATIO, prompts, summarize


def _phase(wall_s, steps, **extra):
    return {"wall_s": wall_s, "steps": steps, "structured_mask_fill_s": 0.0, "structured_mask_steps": 0,
            "structured_masks": 0, **extra}


def test_summary_sums_steps_over_rounds():
    rounds = [{"constrained": _phase(2.2, 20, structured_mask_fill_s=0.04, structured_mask_steps=20,
                                     structured_masks=640), "free": _phase(2.0, 20)},
              {"constrained": _phase(1.1, 10, structured_mask_fill_s=0.02, structured_mask_steps=10,
                                     structured_masks=320), "free": _phase(1.0, 10)}]
    summary = summarize(rounds)
    assert summary["ms_per_step_constrained"] == 110.0 and summary["ms_per_step_unconstrained"] == 100.0
    assert summary["ratio"] == 1.1 and summary["meets_target"] is (1.1 <= TARGET_RATIO)
    assert summary["mask_fill_ms_per_step"] == 2.0 and summary["masks_per_step"] == 32.0


def test_prompts_are_distinct_chats():
    chats = prompts(64)
    assert len({c[0]["content"] for c in chats}) == 64 and all(c[0]["role"] == "user" for c in chats)
