"""CURVE on the scheduler's frontend endpoint (docs/data_parallel.md, replicas across hosts): the
real scheduler process on tcp with `--engine-curve-*`; a frontend with an allowed key pair is
answered (EngineInfo, then KvEvents), one with another key pair is never served, and the
frontend's own `EngineClient` connects with the keys the config names."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import pytest
import zmq
import zmq.asyncio

from shared import protocol as p
from shared.config import ServerConfig
from shared.curve import CurveKeys, write_key_pair

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def curve_scheduler(tmp_path):
    keys = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    _, sched_secret = write_key_pair(str(keys), "scheduler")
    fe_public, fe_secret = write_key_pair(str(keys), "frontend")
    write_key_pair(str(keys / "other"), "intruder")
    allowed.mkdir()
    os.link(fe_public, allowed / "frontend.key")
    addr = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "scheduler", "--run-dir", str(tmp_path / "run"),
                             "--scheduler-frontend-addr", addr, "--engine-curve-secret-key-file", sched_secret,
                             "--engine-curve-frontends-dir", str(allowed), "--drain-timeout", "1"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield addr, keys, fe_secret
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def _hello(addr: str, keys: CurveKeys, timeout_ms: int):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    keys.apply(sock)
    sock.connect(addr)
    try:
        sock.send(p.encode(p.FrontendHello("fe", protocol_version=p.PROTOCOL_VERSION)))
        if not sock.poll(timeout_ms):
            return None
        return p.decoder_for(p.SchedulerMessage).decode(sock.recv())
    finally:
        sock.close()
        ctx.term()


def test_only_allowed_frontends_are_served(curve_scheduler):
    addr, keys, fe_secret = curve_scheduler
    allowed = CurveKeys.load(fe_secret, str(keys / "scheduler.key"))
    reply = _hello(addr, allowed, 20_000)
    assert isinstance(reply, p.EngineInfo) and not reply.ready  # served: no worker yet
    intruder = CurveKeys.load(str(keys / "other" / "intruder.key_secret"), str(keys / "scheduler.key"))
    assert _hello(addr, intruder, 1500) is None


def test_the_frontends_engine_client_uses_the_configured_keys(curve_scheduler):
    from frontend.engine_client import EngineClient

    addr, keys, fe_secret = curve_scheduler
    config = ServerConfig.from_settings(engines=[addr], engine_curve_secret_key_file=fe_secret,
                                        engine_curve_server_key_file=str(keys / "scheduler.key"))
    config.validate()

    async def scenario():
        got = asyncio.get_running_loop().create_future()
        client = EngineClient(zmq.asyncio.Context.instance(), addr,
                              lambda msg: got.done() or got.set_result(msg), config.routing.engine_curve_keys())
        receiving = asyncio.create_task(client.run())
        await client.hello()
        try:
            return await asyncio.wait_for(got, 20)
        finally:
            receiving.cancel()
            client.close()

    assert isinstance(asyncio.run(scenario()), p.EngineInfo)
