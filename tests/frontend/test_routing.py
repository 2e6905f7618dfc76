"""Routing between engine replicas (frontend/router.py, frontend/replicas.py), without sockets:
the decision by policy, margin and session; the replica set's bookkeeping (which replica holds
which request, failover holds only the failed replica's requests, aborts reach the owner, causes
counted); the merged stats."""

from __future__ import annotations

import asyncio

import zmq.asyncio

from frontend.replica_stats import merged_stats
from frontend.replicas import ReplicaSet
from frontend.requests import FrontendRequest, RequestTable
from frontend.router import Candidate, RoutingPolicy
from shared import protocol as p
from shared.block_hash import block_hashes, route_key
from shared.config import ServerConfig

BLOCK = 4


def test_prefix_routing_takes_the_longest_cached_prefix_within_the_margin():
    policy = RoutingPolicy("prefix", margin=2)
    assert policy.choose([Candidate(0, load=3, matched=1), Candidate(1, load=2, matched=4)]) == (1, "prefix")
    assert policy.choose([Candidate(0, load=3, matched=5), Candidate(1, load=1, matched=0)]) == (0, "prefix")
    # Past the margin the cache is not worth the queue: the least loaded replica.
    assert policy.choose([Candidate(0, load=4, matched=5), Candidate(1, load=1, matched=0)]) == (1, "load")
    # Nothing cached anywhere: the least loaded.
    assert policy.choose([Candidate(0, load=2), Candidate(1, load=0), Candidate(2, load=1)]) == (1, "load")


def test_equal_candidates_take_turns():
    policy = RoutingPolicy("prefix", margin=2)
    picks = {policy.choose([Candidate(0, 0), Candidate(1, 0)])[0] for _ in range(4)}
    assert picks == {0, 1}
    policy = RoutingPolicy("prefix", margin=2)
    picks = {policy.choose([Candidate(0, 0, 3), Candidate(1, 0, 3), Candidate(2, 0, 1)])[0] for _ in range(4)}
    assert picks == {0, 1}


def test_round_robin_and_least_loaded_ignore_the_cache():
    rr = RoutingPolicy("round_robin")
    cands = [Candidate(0, 9, 9), Candidate(1, 0, 0), Candidate(2, 0, 0)]
    picks = [rr.choose(cands) for _ in range(6)]
    assert sorted(i for i, _ in picks) == [0, 0, 1, 1, 2, 2] and {c for _, c in picks} == {"round_robin"}
    ll = RoutingPolicy("least_loaded")
    assert ll.choose([Candidate(0, 1, 9), Candidate(1, 0, 0)]) == (1, "load")


def test_a_session_sticks_to_its_replica_while_within_the_margin():
    policy = RoutingPolicy("prefix", margin=1)
    first, _ = policy.choose([Candidate(0, 0), Candidate(1, 0)], session_key="s")
    other = 1 - first
    assert policy.choose([Candidate(first, 1), Candidate(other, 0)], session_key="s") == (first, "affinity")
    # Too busy: the session moves, and stays where it moved.
    assert policy.choose([Candidate(first, 5), Candidate(other, 0)], session_key="s") == (other, "load")
    assert policy.choose([Candidate(first, 0), Candidate(other, 0)], session_key="s") == (other, "affinity")
    policy.forget_replica(other)
    assert policy.choose([Candidate(first, 0), Candidate(other, 3, 0)], session_key="s") == (first, "load")


# -- the replica set's bookkeeping -------------------------------------------------------

def info(scheduler_id: str) -> p.EngineInfo:
    return p.EngineInfo(ready=True, model="m", max_model_len=256, vocab_size=100, block_size=BLOCK,
                        num_device_blocks=64, workers_ready=1, workers_expected=1, scheduler_id=scheduler_id)


class Sent:
    """Records what each replica's EngineClient would send."""

    def __init__(self, replicas: ReplicaSet) -> None:
        self.by_replica: dict[int, list] = {r.index: [] for r in replicas.replicas}
        for r in replicas.replicas:
            async def send(msg, i=r.index):
                self.by_replica[i].append(msg)

            async def abort(ids, i=r.index):
                self.by_replica[i].append(p.AbortRequests(request_ids=list(ids)))

            r.client.send, r.client.abort = send, abort


def make_set(n: int = 2, policy: str = "prefix"):
    config = ServerConfig.from_settings(engines=[f"ipc:///tmp/x{i}" for i in range(n)], routing_policy=policy)
    table = RequestTable()
    replicas = ReplicaSet(zmq.asyncio.Context.instance(), config, table, on_message=None)
    for r in replicas.replicas:
        r.status.update(info(f"s{r.index}"))
        replicas.heard(r)
    return replicas, table, Sent(replicas)


def request(table: RequestTable, rid: str, prompt: list[int]) -> FrontendRequest:
    req = FrontendRequest(request_id=rid, client=b"c", stream=True, prompt_ids=prompt,
                          params=p.SamplingParams(max_tokens=4), outputs=[], arrival=0.0, finish=[None],
                          engine_id=rid)
    table.add(req)
    return req


def add(replicas: ReplicaSet, req: FrontendRequest) -> None:
    asyncio.run(replicas.add(req.engine_id, req.prompt_ids, req.params, 0.0, 0))


def test_requests_go_where_their_prefix_is_cached_and_causes_are_counted():
    replicas, table, sent = make_set()
    prompt = list(range(12))
    keys = [route_key(k) for k in block_hashes(prompt, BLOCK)]
    replicas.on_kv_events(replicas.replicas[1], p.KvEvents(scheduler_id="s1", seq=1, snapshot=True, stored=keys[:2]))
    req = request(table, "a", prompt + [99])
    add(replicas, req)
    assert req.replica == 1 and isinstance(sent.by_replica[1][-1], p.AddRequest)
    assert replicas.replicas[1].routed == {"prefix": 1}
    assert replicas.replicas[1].load_now() == 1  # counted until its next report
    replicas.on_kv_events(replicas.replicas[1], p.KvEvents(scheduler_id="s1", seq=2, waiting=20, running=4))
    other = request(table, "b", prompt)
    add(replicas, other)  # 24 requests there, past the margin of 8
    assert other.replica == 0 and replicas.replicas[0].routed == {"load": 1}


def test_failover_holds_only_the_failed_replicas_requests_and_resubmits_them_elsewhere():
    replicas, table, sent = make_set()
    reqs = [request(table, f"r{i}", [i] * 8) for i in range(4)]
    for req in reqs:
        add(replicas, req)
    on_one = [r for r in reqs if r.replica == 1]
    assert on_one and len(on_one) < 4
    replicas.replicas[1].last_heard -= 10.0  # silent past replica_silence_s
    gone = replicas.silent(now=replicas.replicas[0].last_heard + 0.1)
    assert [r.index for r in gone] == [1] and not replicas.replicas[1].routable
    moved = replicas.fail_over(gone[0], "silent")
    assert moved == on_one and all(r.held for r in on_one) and not any(r.held for r in reqs if r not in on_one)
    asyncio.run(replicas.replicas[0].resubmitter.resubmit_held())
    assert all(r.replica == 0 and not r.held and r.engine_id == f"{r.request_id}#1" for r in on_one)
    aborts = [m for m in sent.by_replica[1] if isinstance(m, p.AbortRequests)]
    assert aborts and set(aborts[-1].request_ids) == {r.request_id for r in on_one}  # the stale copies there
    assert replicas.replicas[0].routed["failover"] == len(on_one)
    replicas.heard(replicas.replicas[1])
    assert replicas.replicas[1].routable  # it speaks again: it takes new work


def test_aborts_reach_the_replica_holding_the_request_even_after_it_left_the_table():
    replicas, table, sent = make_set()
    reqs = [request(table, f"r{i}", [i] * 8) for i in range(2)]
    for req in reqs:
        add(replicas, req)
    target = reqs[0]
    table.forget(target)  # a completion forgets first, then aborts
    asyncio.run(replicas.abort([target.engine_id, "unknown"]))
    for r in replicas.replicas:
        aborted = [i for m in sent.by_replica[r.index] if isinstance(m, p.AbortRequests) for i in m.request_ids]
        assert ("unknown" in aborted) and ((target.engine_id in aborted) == (r.index == target.replica))
    replicas.silent(now=0.0)  # prunes the finished request's entry
    assert target.engine_id not in replicas.where


def test_a_draining_replica_gets_no_new_requests():
    replicas, table, _ = make_set()
    replicas.on_kv_events(replicas.replicas[0], p.KvEvents(scheduler_id="s0", seq=1, draining=True))
    for i in range(3):
        req = request(table, f"r{i}", [i] * 8)
        add(replicas, req)
        assert req.replica == 1


def test_merged_stats_sum_counters_and_recompute_the_hit_rate():
    per = {0: {"steps": 3, "prefix_cache_hit_tokens": 10, "prefix_cache_queried_tokens": 20, "draining": False,
               "step_time_p50_s": 0.1}, 1: {"steps": 2, "prefix_cache_hit_tokens": 0, "prefix_cache_queried_tokens": 20,
                                            "draining": True, "step_time_p50_s": 0.3}}
    figures = [{"routed": {"prefix": 2}, "routable": True}, {"routed": {"prefix": 1, "load": 1}, "routable": False}]
    out = merged_stats(per, figures)
    assert out["steps"] == 5 and out["prefix_cache_hit_rate"] == 0.25 and out["draining"] is True
    assert out["step_time_p50_s"] == 0.3 and out["routed"] == {"prefix": 3, "load": 1}
    assert out["replicas_routable"] == 1 and out["replicas"] == figures


def test_refusals_hold_the_request_and_take_the_replica_out_of_routing():
    from frontend.failover import Failover
    from frontend.fleet_status import FleetStatus

    replicas, _, _ = make_set()
    failover = Failover(replicas, FleetStatus(replicas.replicas), replicas.replicas[0].resubmitter)
    r0, r1 = replicas.replicas
    replicas.on_kv_events(r1, p.KvEvents(scheduler_id="s1", seq=1))
    assert failover.refused(r0, p.ErrorCode.UNAVAILABLE.value) and not r0.routable  # until its next EngineInfo
    assert failover.refused(r1, p.ErrorCode.SHUTTING_DOWN.value) is False  # no replica left to take it
    assert r1.draining
    r0.status.update(info("s0"))
    assert r0.routable and failover.refused(r1, p.ErrorCode.SHUTTING_DOWN.value)
    assert not failover.refused(r0, p.ErrorCode.INVALID_REQUEST.value)
    single, _, _ = make_set(1)
    lone = Failover(single, FleetStatus(single.replicas), single.replicas[0].resubmitter)
    assert not lone.refused(single.replicas[0], p.ErrorCode.SHUTTING_DOWN.value)  # one replica: as before


def test_replicas_join_and_leave_at_runtime():
    replicas, table, sent = make_set()
    old = [request(table, f"r{i}", [i] * 8) for i in range(4)]
    for req in old:
        add(replicas, req)
    on_one = [r for r in old if r.replica == 1]
    assert on_one
    added, retired = replicas.set_engines(["ipc:///tmp/x0", "ipc:///tmp/x9"])
    assert added == ["ipc:///tmp/x9"] and retired == ["ipc:///tmp/x1"] and len(replicas) == 2
    new = replicas.replicas[2]
    sent.by_replica[2] = []

    async def record(msg):
        sent.by_replica[2].append(msg)

    new.client.send = record
    new.status.update(info("s9"))
    replicas.heard(new)
    fresh = [request(table, f"n{i}", [50 + i] * 8) for i in range(4)]
    for req in fresh:
        add(replicas, req)
    assert {r.replica for r in fresh} == {0, 2}, "nothing new for the retired replica"
    replicas.silent(now=0.0)
    assert not replicas.replicas[1].closed  # its requests still run there
    for req in on_one:
        table.forget(req)
    replicas.silent(now=0.0)
    assert replicas.replicas[1].closed
    asyncio.run(replicas.abort(["unknown"]))  # a closed replica is not sent anything
    assert replicas.set_engines(["ipc:///tmp/x0", "ipc:///tmp/x9"]) == ([], [])


def test_a_draining_replicas_deadline_aborts_move_the_request_but_a_clients_abort_ends_it():
    from frontend.failover import Failover
    from frontend.fleet_status import FleetStatus

    replicas, table, sent = make_set()
    failover = Failover(replicas, FleetStatus(replicas.replicas), replicas.replicas[0].resubmitter)
    reqs = [request(table, f"r{i}", [i] * 8) for i in range(4)]
    for req in reqs:
        add(replicas, req)
    r1 = replicas.replicas[1]
    on_one = [r for r in reqs if r.replica == 1]
    on_one[-1].aborting = True  # its client aborted it
    replicas.on_kv_events(r1, p.KvEvents(scheduler_id="s1", seq=1, draining=True))
    abort = p.FinishReason.ABORT.value
    moved = [r for r in on_one if failover.drained_away(r1, p.TokenDelta(r.engine_id, 0, [], finish_reason=abort))]
    assert moved == on_one[:-1] and all(r.held for r in moved)
    assert not failover.drained_away(r1, p.TokenDelta(reqs[0].engine_id, 0, [5]))  # tokens stream as ever
    asyncio.run(failover.resubmit_if_ready())
    assert all(r.replica == 0 and not r.held for r in moved)
    assert not failover.drained_away(replicas.replicas[0], p.TokenDelta(moved[0].engine_id, 0, [],
                                                                        finish_reason=abort))  # not draining
