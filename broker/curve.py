"""`sdxl-broker keys DIR`: CURVE key pairs for the broker and its peers (zmq.auth).

Writes NAME.key (public) and NAME.key_secret (secret) for each name: by default a `server`
pair (the broker's --curve-secret-key) and a `client` pair. Copy a peer's public NAME.key
into the broker's --curve-allowed-keys directory to authorise it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="directory to write the key files to (created if missing)")
    parser.add_argument("--names", nargs="+", default=["server", "client"], metavar="NAME",
                        help="one key pair per name (default: server client)")
    parser.add_argument("--force", action="store_true", help="overwrite existing key files")


def make_keys(directory: str, names: list[str], force: bool = False) -> dict[str, tuple[str, str]]:
    """name -> (public key file, secret key file). Refuses to overwrite unless force."""
    import zmq.auth

    os.makedirs(directory, exist_ok=True)
    out = {}
    for name in names:
        if not name or os.sep in name or name.startswith("."):
            raise ValueError(f"bad key name {name!r}")
        public = os.path.join(directory, f"{name}.key")
        secret = os.path.join(directory, f"{name}.key_secret")
        if not force and (os.path.exists(public) or os.path.exists(secret)):
            raise FileExistsError(f"{public} or {secret} exists; use --force to replace it")
        public, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)  # the secret half is for its owner only
        out[name] = (public, secret)
    return out


def client_keys(server_public_file: str, client_secret_file: str) -> tuple[bytes, tuple[bytes, bytes]]:
    """(server public key, (client public, client secret)) from `keys` files, for
    clients.client.BrokerClient(curve_server_key=..., curve_client_keys=...)."""
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(server_public_file)
    public, secret = zmq.auth.load_certificate(client_secret_file)
    if secret is None:
        raise ValueError(f"{client_secret_file} holds no secret key (use the .key_secret file)")
    return server_public, (public, secret)


def run(args: argparse.Namespace) -> int:
    try:
        pairs = make_keys(args.dir, args.names, args.force)
    except (ValueError, FileExistsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, (public, secret) in pairs.items():
        print(f"{name}: public {public}  secret {secret}")
    return 0
