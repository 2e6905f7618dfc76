"""The `request.preempted` event: one per victim, with the cache's state as the policy left it."""

from __future__ import annotations

from scheduler.block_manager import BlockManager
from scheduler.sequence import Sequence
from shared.logging import get_logger

log = get_logger("scheduler")


def log_preempted(seq: Sequence, cause: str, mode: str, bm: BlockManager) -> None:
    """Logged before the victim's blocks are freed or swapped: tokens to recompute (0 when
    swapped), device and host blocks in use."""
    log.info("request.preempted", request_id=seq.request_id, seq_id=seq.seq_id, mode=mode, cause=cause,
             tokens_to_recompute=seq.num_tokens if mode == "recompute" else 0,
             kv_blocks_used=bm.num_used_blocks, kv_blocks_total=bm.num_blocks,
             host_blocks_used=bm.num_used_host_blocks, host_blocks_total=bm.num_host_blocks,
             **seq.request.log_fields())
