"""The worker ranks as the scheduler sees them: one tensor-parallel group.

Every rank says hello with its capacity; the group is complete when all
`size` ranks have joined, and its capacity is the smallest rank's (every rank
holds its share of every block, so a block exists only if every rank has room
for it). Every rank gets every plan; rank 0 alone returns results.

Failure is the group's: once any rank fails (`failed`), the group takes no more
plans until the fault-tolerance work brings a new one up.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.protocol import WorkerHello

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
        self.failed = False

    @property
    def complete(self) -> bool:
        return len(self.members) == self.size

    def refusal(self, hello: WorkerHello) -> str | None:
        """Why `hello` cannot join, or None."""
        if hello.world_size != self.size:
            return f"world size {hello.world_size} is not the scheduler's tensor_parallel_size {self.size}"
        if not 0 <= hello.rank < self.size:
            return f"rank {hello.rank} is outside [0, {self.size})"
        for rank, (_, other) in self.members.items():
            if rank == hello.rank:
                continue  # the same rank again (restarted before the group was complete): it replaces
            for name in _SAME_ON_EVERY_RANK:
                if getattr(hello, name) != getattr(other, name):
                    return (f"rank {hello.rank} has {name} {getattr(hello, name)!r} but rank {rank} has "
                            f"{getattr(other, name)!r}: every rank must serve the same model the same way")
        return None

    def join(self, ident: bytes, hello: WorkerHello) -> None:
        self.members[hello.rank] = (ident, hello)

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
