"""KV-cache events for routing (scheduler/kv_events.py): the journal nets changes, the publisher
numbers messages and snapshots a new or cleared cache, and a frontend's `PrefixIndex` fed with
them (gaps answered by snapshots) ends up with exactly the cache's keys."""

from __future__ import annotations

import random

from frontend.prefix_index import PrefixIndex
from scheduler.block_manager import BlockManager
from scheduler.kv_events import PUBLISH_EVERY_S, KvJournal, KvPublisher
from shared.block_hash import block_hashes, route_key


class FakeScheduler:
    """What the publisher reads of a Scheduler: the block manager and stats()."""

    def __init__(self, num_blocks: int = 16, block_size: int = 2) -> None:
        self.block_manager = BlockManager(num_blocks=num_blocks, block_size=block_size, watermark=0.0)

    def stats(self) -> dict:
        bm = self.block_manager
        return {"waiting": 3, "running": 2, "kv_blocks_total": bm.num_blocks, "kv_blocks_used": bm.num_used_blocks,
                "prefix_cache_hit_tokens": 5, "prefix_cache_queried_tokens": 10}


def cached_keys(bm: BlockManager) -> set[int]:
    return {route_key(k) for k, _ in bm.prefix_cache.items()}


def make_publisher(sched):
    sent = []
    holder = {"sched": sched}
    pub = KvPublisher("s1", lambda: holder["sched"], sent.append, lambda: 0.012)
    return pub, sent, holder


def test_the_journal_keeps_what_happened_last_to_each_key():
    j = KvJournal()
    j.stored(b"a" * 16)
    j.removed(b"a" * 16)
    j.removed(b"b" * 16)
    j.stored(b"b" * 16)
    j.stored(b"c" * 16)
    stored, removed, reset = j.take()
    assert sorted(stored) == sorted([route_key(b"b" * 16), route_key(b"c" * 16)])
    assert removed == [route_key(b"a" * 16)] and not reset
    assert j.take() == ([], [], False)
    j.cleared()
    assert j.take() == ([], [], True)


def test_the_prefix_cache_tells_its_journal_of_stores_evictions_and_clears():
    bm = BlockManager(num_blocks=2, block_size=2, watermark=0.0)
    bm.prefix_cache.journal = j = KvJournal()
    bm.allocate(0, 4)
    bm.mark_computed(0, [1, 2, 3, 4], 4)
    keys = [route_key(k) for k in block_hashes([1, 2, 3, 4], 2)]
    assert j.take() == (keys, [], False)
    bm.free(0)
    bm.allocate(1, 2)  # evicts one of the cached blocks
    stored, removed, _ = j.take()
    assert stored == [] and len(removed) == 1 and removed[0] in keys
    bm.free(1)
    bm.reset_prefix_cache()
    assert j.take()[2] is True


def test_the_publisher_sends_a_snapshot_for_a_new_cache_then_numbered_deltas_with_load():
    sched = FakeScheduler()
    pub, sent, holder = make_publisher(None)
    pub.tick(now=0.0)
    assert sent == [] and pub.due_in_s(0.0) == PUBLISH_EVERY_S  # no Scheduler yet: nothing to say
    holder["sched"] = sched
    pub.tick(now=0.05)
    assert sent == []  # not due yet
    pub.tick(now=0.11)
    assert sent[-1].snapshot and sent[-1].seq == 1 and sent[-1].stored == []
    bm = sched.block_manager
    bm.allocate(0, 4)
    bm.mark_computed(0, [7, 8, 9, 10], 4)
    pub.tick(now=0.22)
    msg = sent[-1]
    assert not msg.snapshot and msg.seq == 2 and set(msg.stored) == cached_keys(bm)
    assert (msg.waiting, msg.running, msg.total_blocks, msg.step_time_ms) == (3, 2, 16, 12.0)
    assert msg.free_blocks == 16 - 2 and msg.prefix_hit_tokens == 5 and msg.prefix_queried_tokens == 10
    pub.tick(now=0.33)
    assert sent[-1].seq == 3 and sent[-1].stored == [] and sent[-1].removed == []  # load goes out every time
    snap = pub.snapshot()
    assert snap.snapshot and snap.seq == 3 and set(snap.stored) == cached_keys(bm)
    holder["sched"] = FakeScheduler()  # the workers rejoined: a new Scheduler, a new (empty) cache
    pub.tick(now=0.44)
    assert sent[-1].snapshot and sent[-1].seq == 4 and sent[-1].stored == []


def test_an_index_fed_the_events_matches_the_cache_through_gaps_and_snapshots():
    rng = random.Random(5)
    sched = FakeScheduler(num_blocks=12, block_size=2)
    pub, sent, _ = make_publisher(sched)
    index = PrefixIndex()
    bm = sched.block_manager
    live: list[int] = []
    now = 0.0
    for step in range(300):
        if live and (len(live) > 3 or rng.random() < 0.4):
            bm.free(live.pop(rng.randrange(len(live))))
        else:
            seq_id = step
            tokens = [rng.randrange(3) for _ in range(rng.choice([2, 4, 6]))]  # few values: shared prefixes
            hit = bm.find_cached_prefix(tokens, len(tokens) // 2)
            if bm.can_allocate(len(tokens), hit):
                bm.allocate(seq_id, len(tokens), hit)
                bm.mark_computed(seq_id, tokens, len(tokens))
                live.append(seq_id)
        if rng.random() < 0.05 and not live:
            bm.reset_prefix_cache()
        now += PUBLISH_EVERY_S * 1.01
        pub.tick(now=now)
        msg = sent[-1]
        if rng.random() < 0.1:
            continue  # lost on the way: the next one shows a gap
        outcome = index.apply(msg)
        if outcome == "gap":
            assert index.apply(pub.snapshot()) == "snapshot"
        assert index.keys == cached_keys(bm), f"step {step}: {outcome}"
    assert index.gaps > 0


def test_an_index_ignores_old_messages_and_starts_afresh_for_a_new_scheduler():
    from shared import protocol as p

    index = PrefixIndex()
    assert index.apply(p.KvEvents(scheduler_id="a", seq=1, snapshot=True, stored=[1, 2])) == "snapshot"
    assert index.apply(p.KvEvents(scheduler_id="a", seq=2, stored=[3], removed=[1])) == "ok"
    assert index.keys == {2, 3}
    assert index.apply(p.KvEvents(scheduler_id="a", seq=2, stored=[9])) == "old"
    assert index.apply(p.KvEvents(scheduler_id="b", seq=1, stored=[5])) == "gap"  # a restarted scheduler
    assert index.keys == {5} and index.stale
    assert index.matched_blocks([5, 6]) == 1 and index.matched_blocks([6, 5]) == 0
    index.clear()
    assert index.keys == set()


def test_a_new_frontend_gets_a_snapshot_and_broadcasts_skip_a_silent_one(monkeypatch):
    import time as real_time

    from scheduler import frontend_link as fl
    from scheduler.frontend_link import FrontendLink
    from shared import protocol as p

    sent = []

    class Router:
        def send(self, ident, msg):
            sent.append((ident, msg))
            return True

    joined = []
    link = FrontendLink(Router(), scheduler_id="s1", engine_info=lambda: p.EngineInfo(ready=False),
                        abort_frontend=lambda ident: [], on_join=joined.append)
    hello = p.encode(p.FrontendHello("x", protocol_version=p.PROTOCOL_VERSION))
    link.receive(b"a", hello)
    link.receive(b"a", hello)
    link.receive(b"b", hello)
    assert joined == [b"a", b"b"]  # once each, at the first hello
    now = real_time.monotonic()
    monkeypatch.setattr(fl.time, "monotonic", lambda: now + fl.BROADCAST_SILENCE_S + 1)
    link.receive(b"b", hello)  # b spoke just now; a has been silent
    sent.clear()
    link.broadcast(p.KvEvents(scheduler_id="s1", seq=1))
    assert [ident for ident, _ in sent] == [b"b"]
