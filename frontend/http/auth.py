"""Bearer API keys for the HTTP API, and the rule that keeps an open listener on loopback.

Keys come from --api-key-file: one per line; blank lines and lines starting with # are skipped.
A request's key is compared with every key, each with `hmac.compare_digest`, and without
stopping at a match, so the time taken says nothing about which key, or how much of one, fits.
"""

from __future__ import annotations

import hmac
import ipaddress

from frontend.http.errors import unauthorized
from shared.config import FrontendConfig


class HttpConfigError(ValueError):
    """A setting that stops the HTTP listener from starting (the message names the flags)."""


class ApiKeys:
    """The keys a request may present; none means the API is open."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @classmethod
    def from_file(cls, path: str) -> ApiKeys:
        try:
            with open(path, encoding="utf-8") as f:
                keys = [line.strip() for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise HttpConfigError(f"--api-key-file {path}: cannot read it: {e}") from None
        keys = [k for k in keys if k and not k.startswith("#")]
        if not keys:
            raise HttpConfigError(f"--api-key-file {path} holds no key (one per line)")
        return cls(keys)

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """Raise ApiError 401 unless `authorization` is "Bearer <one of the keys>" (or no key is set)."""
        if not self._keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("this server needs an API key: send the header `Authorization: Bearer <key>`")
        given = token.strip().encode()
        match = False
        for key in self._keys:
            match |= hmac.compare_digest(key, given)
        if not match:
            raise unauthorized("the API key is not valid")


def split_listen(listen: str) -> tuple[str, int]:
    """"HOST:PORT" (FrontendConfig checked its form) -> (host, port); "[::1]:8000" -> ("::1", 8000)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name: it may resolve to anything
        return False


def keys_for(frontend: FrontendConfig) -> ApiKeys:
    """The API keys for `frontend.http_listen`, or HttpConfigError when the listener must not
    start: a non-loopback address without keys, unless allow_unauthenticated_http."""
    keys = ApiKeys.from_file(frontend.api_key_file) if frontend.api_key_file else ApiKeys([])
    host, _ = split_listen(frontend.http_listen)
    if not keys.required and not is_loopback(host) and not frontend.allow_unauthenticated_http:
        raise HttpConfigError(f"--http-listen {frontend.http_listen} is not a loopback address and no API keys "
                              f"are set: give --api-key-file FILE (bearer keys, one per line), or "
                              f"--allow-unauthenticated-http true to serve it open")
    return keys
