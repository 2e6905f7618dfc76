"""The worker ranks as the scheduler sees them: one tensor-parallel group.

Every rank says hello with its capacity; the group is complete when all
`size` ranks have joined, and its capacity is the smallest rank's (every rank
holds its share of every block, so a block exists only if every rank has room
for it). Every rank gets every plan; rank 0 alone returns results.

Failure is the group's: when any rank dies, hangs or fails a step, the group is
`dissolve`d (every member forgotten: their KV caches are gone or stale) and the
ranks must join again. A rejoining group must serve the same model the same way
as the first one (`reference`) and hold at least the pools the scheduler sized
from it (`required`): the block tables outlive the workers.

Liveness: `last_seen` is when each member last sent anything (monotonic seconds);
`overdue` names a member silent for longer than the heartbeat timeout.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.protocol import PROTOCOL_VERSION, WorkerHello

# Facts every rank must agree on: they run the same model the same way.
_SAME_ON_EVERY_RANK = ("model", "block_size", "vocab_size", "eos_token_ids", "dtype")


@dataclass(frozen=True)
class Capacity:
    num_device_blocks: int  # KV blocks: the smallest rank's
    num_host_blocks: int  # swap blocks: the smallest rank's
    max_model_len: int  # tokens: the smallest rank's


class WorkerGroup:
    def __init__(self, size: int):
        self.size = size  # tensor_parallel_size
        self.members: dict[int, tuple[bytes, WorkerHello]] = {}  # rank -> (socket identity, hello)
        self.last_seen: dict[int, float] = {}  # rank -> monotonic seconds of its last message
        self.reference: WorkerHello | None = None  # rank 0's hello of the first complete group
        self.required: Capacity | None = None  # the pools' sizes, once the scheduler exists
        self.generation = 0  # groups dissolved so far

    @property
    def complete(self) -> bool:
        return len(self.members) == self.size

    @property
    def failed(self) -> bool:
        """A group existed and was dissolved; it has not come back whole yet."""
        return self.generation > 0 and not self.complete

    def refusal(self, hello: WorkerHello) -> str | None:
        """Why `hello` cannot join, or None."""
        if hello.protocol_version != PROTOCOL_VERSION:
            return (f"rank {hello.rank} speaks protocol version {hello.protocol_version} but the scheduler speaks "
                    f"version {PROTOCOL_VERSION}: run the same pagedserve version in every role")
        if hello.world_size != self.size:
            return f"world size {hello.world_size} is not the scheduler's tensor_parallel_size {self.size}"
        if not 0 <= hello.rank < self.size:
            return f"rank {hello.rank} is outside [0, {self.size})"
        others = [(f"rank {rank}", other) for rank, (_, other) in self.members.items() if rank != hello.rank]
        if self.reference is not None:
            others.append(("the group this scheduler started with", self.reference))
        for who, other in others:  # the same rank again (restarted before the group was complete) replaces
            for name in _SAME_ON_EVERY_RANK:
                if getattr(hello, name) != getattr(other, name):
                    return (f"rank {hello.rank} has {name} {getattr(hello, name)!r} but {who} has "
                            f"{getattr(other, name)!r}: every rank must serve the same model the same way")
        need = self.required
        if need is not None:
            for name, have, want in (("KV blocks", hello.num_device_blocks, need.num_device_blocks),
                                     ("host swap blocks", hello.num_host_blocks, need.num_host_blocks),
                                     ("max_model_len", hello.max_model_len, need.max_model_len)):
                if have < want:
                    return (f"rank {hello.rank} has {have} {name}, fewer than the {want} the scheduler's block "
                            f"tables were sized for (pin the capacity with --num-kv-blocks)")
        return None

    def join(self, ident: bytes, hello: WorkerHello, now: float = 0.0) -> None:
        self.members[hello.rank] = (ident, hello)
        self.last_seen[hello.rank] = now

    def dissolve(self) -> list[tuple[int, bytes]]:
        """Forget every member (their state is lost); returns who they were, as `identities()`."""
        gone = self.identities()
        self.members.clear()
        self.last_seen.clear()
        self.generation += 1
        return gone

    def touch(self, rank: int, now: float) -> None:
        self.last_seen[rank] = now

    def overdue(self, now: float, timeout_s: float) -> tuple[int, float] | None:
        """(rank, seconds silent) of the member silent longest, if over `timeout_s`; only for a complete group."""
        if not self.complete or not self.last_seen:
            return None
        rank = min(self.last_seen, key=self.last_seen.__getitem__)
        silent = now - self.last_seen[rank]
        return (rank, silent) if silent > timeout_s else None

    def rank_of(self, ident: bytes) -> int | None:
        for rank, (known, _) in self.members.items():
            if known == ident:
                return rank
        return None

    def identities(self) -> list[tuple[int, bytes]]:
        """(rank, identity) in rank order."""
        return [(rank, ident) for rank, (ident, _) in sorted(self.members.items())]

    def first_hello(self) -> WorkerHello:
        return self.members[min(self.members)][1]

    def capacity(self) -> Capacity:
        hellos = [h for _, h in self.members.values()]
        return Capacity(num_device_blocks=min(h.num_device_blocks for h in hellos),
                        num_host_blocks=min(h.num_host_blocks for h in hellos),
                        max_model_len=min(h.max_model_len for h in hellos))

    def ready_count(self) -> int:
        return 0 if self.failed else len(self.members)
