"""CURVE on the client endpoint: `pagedserve keygen` writes key pairs (secret files 0600); a
client whose public key is listed is served; an unlisted key and a plaintext client are refused
(never served: their requests fail with `unavailable`)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest
from server_process import ServerProcess

from shared.client import Client, RequestError
from shared.curve import CurveKeys
from shared.protocol import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _keygen(directory, name: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "launcher", "keygen", str(directory), "--name", name], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(os.stat(directory / f"{name}.key_secret").st_mode) == 0o600


@pytest.mark.slow
def test_a_listed_key_is_served_an_unlisted_one_and_plaintext_are_refused(tmp_path):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    for name in ("server", "alice", "mallory"):
        _keygen(keys, name)
    allowed.mkdir()
    shutil.copy(keys / "alice.key", allowed / "alice.key")
    srv = ServerProcess(str(tmp_path / "run"), "--curve-secret-key-file", str(keys / "server.key_secret"),
                        "--curve-clients-dir", str(allowed), ready_timeout_s=300)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    try:
        alice = CurveKeys.load(str(keys / "alice.key_secret"), str(keys / "server.key"))
        with Client(srv.address, curve=alice) as c:
            out = c.generate("The capital of France is", params, timeout=120)
        assert len(out.token_ids) == 4

        mallory = CurveKeys.load(str(keys / "mallory.key_secret"), str(keys / "server.key"))
        for curve in (mallory, None):
            with Client(srv.address, curve=curve, liveness_timeout=None) as c:
                with pytest.raises(RequestError) as refused:
                    c.generate("The capital of France is", params, timeout=5)
            assert refused.value.code == "unavailable"
    finally:
        srv.stop()
    assert srv.named("frontend.listening")[0]["curve"] is True
    assert not srv.named("request.finished")[1:], "only alice was served"
