"""Big request bodies kept as files beside the SQLite journal, so the broker loop never writes
(or deletes) 60 MB rows.

A decode process (broker.decode_stage) that has decoded a valid generation body writes it to
`<state_dir>/bodies/<name>` and hands back a short reference; when the core accepts the job,
the journal row holds the reference instead of the body (journalling a 62 MB body as a row
took the loop 0.3-1 s, deleting it at finish 0.15-0.4 s). After a restart the journal resolves
the reference (`read`). A finished job's file is removed with its row; a refused request's
right after the core refused it; any file no row references is swept by the journal's
periodic expiry (after SWEEP_AFTER_S) and at start.

A reference starts with a NUL byte, which no request body can (codec.sniff refuses it), so a
row's body is always told apart from a reference.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

BODIES_DIR = "bodies"
_MAGIC = b"\x00sdxl-broker-staged-body:"
# a staged file no row references yet may still be on its way to the core (waiting behind its
# peer's earlier body): kept this long before the sweep removes it
SWEEP_AFTER_S = 600.0


def bodies_dir(state_dir: str) -> str:
    return os.path.join(state_dir, BODIES_DIR)


def write(state_dir: str, name: str, body: bytes) -> bytes:
    """Write `body` as a staged file; return its reference. OSError (a full disk) propagates."""
    directory = bodies_dir(state_dir)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    partial = path + ".partial"
    try:
        with open(partial, "wb") as f:
            f.write(body)
        os.replace(partial, path)   # never a half-written file under the referenced name
    except OSError:
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise
    return _MAGIC + name.encode()


def is_reference(blob: bytes) -> bool:
    return bytes(blob[:len(_MAGIC)]) == _MAGIC


def name_of(reference: bytes) -> str:
    return bytes(reference[len(_MAGIC):]).decode()


def read(state_dir: str, reference: bytes) -> bytes:
    with open(os.path.join(bodies_dir(state_dir), name_of(reference)), "rb") as f:
        return f.read()


def remove(state_dir: str, reference: bytes) -> None:
    try:
        os.unlink(os.path.join(bodies_dir(state_dir), name_of(reference)))
    except OSError as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("cannot remove staged body %s: %s", name_of(reference), exc)


def sweep(state_dir: str, referenced: set[str], older_than_s: float | None = SWEEP_AFTER_S) -> int:
    """Remove staged files no row references (older than `older_than_s`; None: all). Returns
    how many were removed."""
    directory = bodies_dir(state_dir)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    cutoff = time.time() - older_than_s if older_than_s is not None else None
    removed = 0
    for name in names:
        if name in referenced:
            continue
        path = os.path.join(directory, name)
        try:
            if cutoff is not None and os.stat(path).st_mtime > cutoff:
                continue
            os.unlink(path)
            removed += 1
        except OSError as exc:
            log.warning("cannot remove staged body %s: %s", path, exc)
    return removed
