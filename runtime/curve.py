"""`sdxl-broker keys DIR`: CURVE key pairs for the broker and its peers (zmq.auth).

Writes NAME.key (public) and NAME.key_secret (secret) for each name: by default a `server`
pair (the broker's --curve-secret-key) and a `client` pair. Copy a peer's public NAME.key into
the broker's --curve-allowed-keys (clients), --curve-worker-keys (workers) or
--curve-admin-keys (clients allowed to manage) directory to authorise it (docs/curve.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

log = logging.getLogger(__name__)
_WARN_EVERY_S = 60.0


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
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


def load_secret_pair(secret_file: str) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a `.key_secret` file; ValueError if it holds no secret."""
    import zmq.auth

    if not os.path.isfile(secret_file):
        raise ValueError(f"CURVE secret key file {secret_file} does not exist")
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key (use the .key_secret file)")
    return public, secret


def make_curve_server(sock, secret_file: str) -> None:
    """Turn a not-yet-bound socket into a CURVE server with the key pair in secret_file."""
    public, secret = load_secret_pair(secret_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def make_curve_client(sock, server_public_file: str, client_secret_file: str) -> None:
    """Set a not-yet-connected socket to talk CURVE to the server whose public key is given."""
    server_public, (public, secret) = client_keys(server_public_file, client_secret_file)
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret


# ZAP domains: the frontend authenticates clients (and admins), the backend workers only, so a
# client key can never register as a worker (receive others' prompts, forge results)
CLIENT_DOMAIN = "clients"
WORKER_DOMAIN = "workers"


class AllowedKeys:
    """ZAP credentials provider: a key is allowed when its public `.key` file is in one of the
    directories (or is one of extra_key_files). The directories are read again on an unknown
    key, so a key copied in later is accepted without a restart; a refusal is logged at
    WARNING (pyzmq logs it at DEBUG only), naming the role ("client", "worker")."""

    def __init__(self, directories: list[str] | tuple[str, ...], extra_key_files: tuple[str, ...] = (),
                 role: str = "client"):
        import zmq.auth

        self.directories = tuple(d for d in directories if d)
        for directory in self.directories:
            if not os.path.isdir(directory):
                raise ValueError(f"CURVE {role} keys directory {directory} does not exist")
        self.role = role
        self._extra = {zmq.auth.load_certificate(f)[0] for f in extra_key_files}
        self._keys: set[bytes] = set()
        self._reloaded_at = 0.0
        self._warned_at: dict[bytes, float] = {}
        self._reload()

    def __len__(self) -> int:
        return len(self._keys)

    def _reload(self) -> None:
        import zmq.auth

        keys = set()
        for directory in self.directories:
            for name in sorted(os.listdir(directory)):
                if not name.endswith(".key"):
                    continue
                try:
                    public, _ = zmq.auth.load_certificate(os.path.join(directory, name))
                except (ValueError, OSError) as exc:
                    log.warning("CURVE: cannot read key file %s: %s", name, exc)
                    continue
                keys.add(public)
        self._keys = keys | self._extra
        self._reloaded_at = time.monotonic()

    def knows(self, z85_key: bytes) -> bool:
        """The key is listed (the directories re-read at most once a second on a miss)."""
        if z85_key in self._keys:
            return True
        if time.monotonic() - self._reloaded_at >= 1.0:
            self._reload()
            return z85_key in self._keys
        return False

    def callback(self, domain: str, z85_key: bytes) -> bool:
        if self.knows(z85_key):
            return True
        # a refused peer retries every ~100 ms: warn about one key at most once a minute
        now = time.monotonic()
        if now - self._warned_at.get(z85_key, -_WARN_EVERY_S) >= _WARN_EVERY_S:
            if len(self._warned_at) > 10_000:   # bounded memory under a key-spraying peer
                self._warned_at.clear()
            self._warned_at[z85_key] = now
            where = " or ".join(self.directories) or "the keys this broker made for its own workers"
            log.warning("CURVE: refused %s key %s... (not in %s)", self.role,
                        z85_key[:8].decode("ascii", "replace"), where)
        return False


class AnyKey:
    """ZAP credentials provider for CURVE without an allowed-keys list: every key passes (the
    traffic is encrypted and the peer's key is still known, as its User-Id)."""

    def callback(self, domain: str, z85_key: bytes) -> bool:
        return True


def start_authenticator(context, providers: dict[str, object]):
    """A running ZAP authenticator for the CURVE server sockets of `context` (stop() it before
    terminating the context). `providers`: ZAP domain -> credentials provider; a socket's
    `zap_domain` picks its provider, a key passes only that one. The peer's z85 public key
    becomes the ZAP User-Id of its messages (pyzmq's default), which the broker reads."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(context, log=logging.getLogger("runtime.curve.zap"))
    auth.start()
    for domain, provider in providers.items():
        auth.configure_curve_callback(domain=domain, credentials_provider=provider)
        if isinstance(provider, AllowedKeys):
            log.info("CURVE %s: %d authorised key(s) in %s", domain, len(provider),
                     ", ".join(provider.directories) or "(serve's own workers only)")
        else:
            log.info("CURVE %s: any key (no allowed-keys directory)", domain)
    return auth


def local_worker_keys(server_secret_file: str, directory: str) -> tuple[str, str, str]:
    """For `serve`: a fresh key pair for the workers it starts, plus a copy of the broker's
    PUBLIC key (workers never see its secret), written to directory.
    Returns (broker public .key, worker public .key, worker .key_secret)."""
    server_public, _ = load_secret_pair(server_secret_file)
    os.makedirs(directory, exist_ok=True)
    pairs = make_keys(directory, ["serve-worker"], force=True)
    worker_public, worker_secret = pairs["serve-worker"]
    broker_public = os.path.join(directory, "broker.key")
    with open(broker_public, "w", encoding="ascii") as out:   # zmq.auth certificate format
        out.write('metadata\ncurve\n    public-key = "%s"\n' % server_public.decode("ascii"))
    return broker_public, worker_public, worker_secret


def run(args: argparse.Namespace) -> int:
    try:
        pairs = make_keys(args.dir, args.names, args.force)
    except (ValueError, FileExistsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, (public, secret) in pairs.items():
        print(f"{name}: public {public}  secret {secret}")
    return 0
