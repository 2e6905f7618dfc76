"""`pagedserve keygen DIR [--name NAME]`: a CURVE key pair (shared/curve.py)."""

from __future__ import annotations

from shared.curve import write_key_pair


def run_keygen(args) -> int:
    public_file, secret_file = write_key_pair(args.directory, args.name)
    print(f"public key: {public_file}\nsecret key: {secret_file} (mode 0600: keep it private)")
    return 0
