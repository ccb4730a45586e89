"""Attacks that are not worker peers: a hostile client's big legal bodies, and a full disk under
the broker's journal.

- `send_big_bodies`: one DEALER sends `count` legal requests of ~60 MB each, alternately JSON
  (30 M zeros in an unknown field: slow to parse) and msgpack (a 60 MB `init_image`: a job the
  broker holds and journals), then collects their final replies. They are ledger entries like
  any other request (kind `big`), so they count in lost / duplicated.
- `TmpfsStateDir`: the split phase's `--state-dir` on a tmpfs of a few hundred MB that this
  script mounts (root only; otherwise the full-disk fault is skipped with the reason). `fill()`
  writes a file until the filesystem is full; `free()` removes it.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import zmq

from . import bodies
from .clients import Conn
from .ledger import Entry, Ledger

log = logging.getLogger("stress.attacks")


def send_big_bodies(ctx: zmq.Context, endpoint: str, ledger: Ledger, phase: str, count: int,
                    size_mb: float, seed: int, wait_s: float,
                    stop_now: threading.Event) -> dict:
    rng = random.Random(seed)
    conn = Conn(ctx, endpoint, ledger, rng)
    entries: list[Entry] = []
    sent_at: dict[str, float] = {}
    try:
        for i in range(count):
            rid = f"{phase}-big-{seed % 10**6}-{i}"
            codec = "json" if i % 2 == 0 else "msgpack"
            spec = bodies.GenerationSpec(request_id=rid, form="flat", steps=2, prompt="big body",
                                         priority="low")
            frame = (bodies.big_json_body(spec, size_mb) if codec == "json"
                     else bodies.big_msgpack_body(spec, size_mb))
            entry = ledger.add(Entry(key=rid, request_id=rid, kind="big", phase=phase,
                                     frame=frame, codec=codec,
                                     expected_reply_type=bodies.REPLY_TYPE["flat"]))
            entries.append(entry)
            sent_at[rid] = time.monotonic()
            conn.send(entry)
        answer_s: dict[str, float] = {}
        deadline = time.monotonic() + wait_s
        while conn.pending and time.monotonic() < deadline and not stop_now.is_set():
            if conn.poll(100):
                key, reply = conn.receive()
                if key and reply.get("final") is not False:
                    answer_s[key] = round(time.monotonic() - sent_at[key], 2)
        codes = {}
        for e in entries:
            if e.finals:
                code = e.finals[0].error_code or "success"
                codes[code] = codes.get(code, 0) + 1
                e.frame = b""   # 60 MB each: keep only what the end-of-run resend may need
        return {"sent": count, "size_mb": size_mb, "answered": len(answer_s),
                "outcomes": codes, "answer_s": sorted(answer_s.values())}
    finally:
        conn.close()


class TmpfsStateDir:
    """A tmpfs mounted at the split phase's state dir, so the journal's disk can be filled."""

    FILLER = "stress-disk-filler"

    def __init__(self, path: Path, size_mb: int):
        self.path, self.size_mb = Path(path), size_mb
        self.mounted = False
        self.skip_reason: str | None = None

    def mount(self) -> bool:
        if os.name != "posix" or not hasattr(os, "geteuid"):
            self.skip_reason = "not a POSIX system"
        elif os.geteuid() != 0:
            self.skip_reason = "not root: cannot mount a tmpfs for the state dir"
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m",
                                   "stress-state", str(self.path)],
                                  capture_output=True, text=True, timeout=30)
            if proc.returncode == 0:
                self.mounted = True
                log.info("state dir %s is a %d MB tmpfs (full-disk fault)", self.path,
                         self.size_mb)
            else:
                self.skip_reason = f"mount -t tmpfs failed: {proc.stderr.strip()[:200]}"
        if self.skip_reason:
            log.warning("full-disk fault will be skipped: %s", self.skip_reason)
        return self.mounted

    def fill(self) -> int:
        """Write zeros until the filesystem is full; returns the bytes written."""
        written = 0
        chunk = bytes(1 << 20)
        with open(self.path / self.FILLER, "ab", buffering=0) as f:
            while True:
                try:
                    written += f.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
            # the last partial chunk: fill the remaining bytes too
            for size in (4096, 512, 1):
                while True:
                    try:
                        written += f.write(bytes(size))
                    except OSError:
                        break
        return written

    def free(self) -> None:
        try:
            (self.path / self.FILLER).unlink()
        except FileNotFoundError:
            pass

    def free_mb(self) -> float:
        st = os.statvfs(self.path)
        return round(st.f_bavail * st.f_frsize / 2**20, 1)

    def unmount(self) -> None:
        if not self.mounted:
            return
        proc = subprocess.run(["umount", str(self.path)], capture_output=True, text=True,
                              timeout=30)
        if proc.returncode != 0:   # something still holds a file: lazy unmount
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=30)
        self.mounted = False
