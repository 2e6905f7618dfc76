"""CURVE encryption and client authentication on the client endpoint (optional).

Keys are ZeroMQ certificate files, as `zmq.auth` writes them: `NAME.key` holds the public key,
`NAME.key_secret` the public and the secret key (mode 0600). `pagedserve keygen DIR NAME`
writes a pair.

The frontend, given `curve_secret_key_file` (its own `.key_secret`) and `curve_clients_dir` (a
directory of the allowed clients' public `.key` files), encrypts its client socket and admits
only the listed clients: a ZAP handler checks each connecting client's public key. A client
with another key, or none (plaintext), fails the handshake and is never served. The SDK takes
`CurveKeys`: its own key pair and the server's public key (`CurveKeys.load`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import zmq
import zmq.auth


@dataclass(frozen=True)
class CurveKeys:
    """A client's key pair and the server's public key (Z85 bytes)."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, client_secret_file: str, server_public_file: str) -> "CurveKeys":
        public, secret = zmq.auth.load_certificate(client_secret_file)
        if secret is None:
            raise ValueError(f"{client_secret_file} holds no secret key (use the .key_secret file)")
        server_public, _ = zmq.auth.load_certificate(server_public_file)
        return cls(public, secret, server_public)

    def apply(self, sock: zmq.Socket) -> None:
        """Before connect: make `sock` a CURVE client of the server."""
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)


def write_key_pair(directory: str, name: str) -> tuple[str, str]:
    """Write NAME.key and NAME.key_secret (mode 0600) under `directory`; their paths."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        public_file, secret_file = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(secret_file, 0o600)
    os.chmod(public_file, 0o644)
    return public_file, secret_file


def make_server(sock: zmq.Socket, secret_file: str) -> None:
    """Before bind: make `sock` a CURVE server with the key pair in `secret_file`."""
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"curve_secret_key_file {secret_file} holds no secret key (use the .key_secret file)")
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SERVER, 1)


def serve_curve_threaded(ctx: zmq.Context, sock: zmq.Socket, secret_file: str, allowed_dir: str):
    """Before bind, for a process without an asyncio loop (the scheduler's frontend endpoint):
    `sock` a CURVE server with the key pair in `secret_file`, admitting only the public keys in
    `allowed_dir`, checked by a ZAP handler on a thread of its own. The authenticator: `stop()` it
    before the context terminates."""
    from zmq.auth.thread import ThreadAuthenticator

    if not os.path.isdir(allowed_dir):
        raise ValueError(f"{allowed_dir} is not a directory of allowed public keys")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=allowed_dir)
    make_server(sock, secret_file)
    return auth
