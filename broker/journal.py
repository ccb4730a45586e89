"""The broker's journal: accepted jobs and final replies in SQLite (WAL) under --state-dir.

After a restart, unfinished jobs are queued again and a resend of a finished request_id gets
its stored reply. Stored replies expire after `reply_ttl_s` and the table is capped at
`max_replies` rows, so the journal does not grow without bound. Rows hold the request body as
the client sent it (bytes) and replies as msgpack: no pickle. With state_dir None the journal
lives in memory (MemoryJournal: the same interface on dicts, nothing survives a restart).

A full or failing disk: every sqlite3 error is raised as JournalError (the broker answers it:
a job it cannot store is refused `unavailable`), a reserve file (DiskReserve) is released so
the replies of running jobs can still be stored, and a reply that still cannot be stored is
kept in memory (UnstoredReplies) until it can.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import msgpack

from broker import staged_bodies

log = logging.getLogger(__name__)

JOURNAL_FILE = "broker-journal.sqlite3"
RESERVE_FILE = "broker-journal.reserve"   # disk space held back for replies (DiskReserve)
_NO_FALLOCATE = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}
RESERVE_RETRY_EVERY_S = 2.0   # how often a released reserve is tried again (at an accept)
_BLOB_CHUNK = 1 << 20   # bytes per incremental write of a job body

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    request_id  TEXT PRIMARY KEY,
    body        BLOB NOT NULL,
    fingerprint TEXT NOT NULL,
    accepted_at REAL NOT NULL          -- wall clock (time.time()), survives restarts
);
CREATE TABLE IF NOT EXISTS replies (
    request_id  TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    codec       TEXT NOT NULL,
    reply       BLOB NOT NULL,         -- msgpack of the final reply dict
    finished_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS replies_finished ON replies(finished_at);
"""


class JournalError(Exception):
    """The journal could not be read or written (a full or failing disk). Raised by the
    journal's methods instead of sqlite3's errors; the transaction was rolled back."""


@dataclass(frozen=True)
class StoredReply:
    request_id: str
    fingerprint: str
    codec: str
    reply: dict


@dataclass(frozen=True)
class PendingJob:
    request_id: str
    body: bytes
    fingerprint: str
    accepted_at: float


class DiskReserve:
    """A file of `size_bytes` beside the journal, written while the disk has room and deleted
    when the disk fills, so the final replies of jobs already running can still be stored
    (a reply only in memory is lost if the broker stops before the disk has room, and its job
    would run again after the restart). While it is released, new jobs are refused: the room
    it made is for replies, and it is written again once the disk has that much room."""

    def __init__(self, path: str, size_bytes: int, wall_clock=time.time):
        self.path, self.size_bytes, self.wall_clock = path, int(size_bytes), wall_clock
        self._next_try = 0.0
        self.held = self.size_bytes <= 0 or self._write()
        if not self.held:
            log.warning("journal: could not set %.0f MB aside at %s (is the disk full?); "
                        "new jobs are refused until it can be", self.size_bytes / 2**20, path)

    def release(self) -> bool:
        """Give its room back to the journal; False when there is none to give."""
        if self.size_bytes <= 0 or not self.held:
            return False
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        self.held = False
        self._next_try = self.wall_clock() + RESERVE_RETRY_EVERY_S
        log.warning("journal: the disk is full; released the %.0f MB reserve (%s) to store the "
                    "replies of running jobs; new jobs are refused `unavailable` until the disk "
                    "has that much room again", self.size_bytes / 2**20, self.path)
        return True

    def ensure(self) -> bool:
        """Held, or written again now (tried at most every RESERVE_RETRY_EVERY_S)."""
        if self.held or self.wall_clock() < self._next_try:
            return self.held
        self._next_try = self.wall_clock() + RESERVE_RETRY_EVERY_S
        self.held = self._write()
        if self.held:
            log.info("journal: the disk has room again; reserve of %.0f MB set aside, new jobs "
                     "are accepted", self.size_bytes / 2**20)
        return self.held

    def _write(self) -> bool:
        try:
            if os.path.exists(self.path) and os.path.getsize(self.path) == self.size_bytes:
                return True
            with open(self.path, "wb") as f:
                try:   # blocks, not a sparse file
                    os.posix_fallocate(f.fileno(), 0, self.size_bytes)
                except (AttributeError, OSError) as exc:
                    if isinstance(exc, OSError) and exc.errno not in _NO_FALLOCATE:
                        raise
                    chunk = b"\0" * _BLOB_CHUNK   # a filesystem without fallocate: write zeros
                    for _ in range(0, self.size_bytes, len(chunk)):
                        f.write(chunk)
            return True
        except OSError:
            try:
                os.remove(self.path)
            except OSError:
                pass
            return False


class Journal:
    def __init__(self, state_dir: str | None, reply_ttl_s: float = 3600.0,
                 max_replies: int = 100_000, wall_clock=time.time, reserve_mb: float = 0.0):
        self.reply_ttl_s = reply_ttl_s
        self.max_replies = max_replies
        self.wall_clock = wall_clock
        self.state_dir = state_dir
        if state_dir:
            os.makedirs(state_dir, exist_ok=True)
            self.path = os.path.join(state_dir, JOURNAL_FILE)
        else:
            self.path = ":memory:"
        self.reserve = DiskReserve(os.path.join(state_dir, RESERVE_FILE) if state_dir else "",
                                   int(reserve_mb * 2**20) if state_dir else 0, wall_clock)
        # one connection, used only by the broker's loop thread
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed row survives a process kill (not a power cut)
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        if state_dir:   # staged bodies of requests never accepted, or of finished jobs
            staged_bodies.sweep(state_dir, self._staged_names(), older_than_s=None)
        log.info("journal at %s (reply ttl %.0f s)", self.path, reply_ttl_s)

    def _staged_names(self) -> set[str]:
        """The staged body files (broker.staged_bodies) job rows refer to."""
        magic = staged_bodies.is_reference
        rows = self._db.execute("SELECT substr(body, 1, 256) FROM jobs WHERE length(body) < 256")
        return {staged_bodies.name_of(r[0]) for r in rows if magic(r[0])}

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _io(self, what: str):
        """sqlite3 errors (SQLITE_FULL: "database or disk is full", disk I/O errors) become a
        JournalError naming the journal file; an open transaction is rolled back, so the
        connection stays usable once the disk has room again."""
        try:
            yield
        except sqlite3.Error as exc:
            try:
                if self._db.in_transaction:
                    self._db.rollback()
            except sqlite3.Error:
                pass
            raise JournalError(f"journal {self.path} could not {what}: {exc}") from exc

    def accept(self, request_id: str, body: bytes, fingerprint: str) -> None:
        """Store an accepted job's body. Written through SQLite's incremental blob I/O, not
        bound as a parameter: a bound blob is copied by SQLite and the copy stays in the cached
        statement until its next run (one more 60 MB in RAM after a 60 MB request)."""
        if not self.reserve.ensure():
            raise JournalError(f"journal {self.path} could not store the job: its disk is full "
                               f"(the {self.reserve.size_bytes / 2**20:.0f} MB reserve for the "
                               f"replies of running jobs is in use)")
        with self._io("store the job"):
            if not hasattr(self._db, "blobopen"):   # Python 3.10: no incremental blob I/O
                self._db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?)",
                                 (request_id, body, fingerprint, self.wall_clock()))
                return
            with self._db:
                self._db.execute("BEGIN")
                rowid = self._db.execute(
                    "INSERT OR REPLACE INTO jobs VALUES (?, zeroblob(?), ?, ?)",
                    (request_id, len(body), fingerprint, self.wall_clock())).lastrowid
                if body:
                    view = memoryview(body)
                    with self._db.blobopen("jobs", "body", rowid) as blob:
                        for offset in range(0, len(view), _BLOB_CHUNK):
                            blob.write(view[offset:offset + _BLOB_CHUNK])

    def finish(self, request_id: str, fingerprint: str, codec: str, reply: dict,
               finished_at: float | None = None) -> None:
        """Store the final reply and drop the job row, in one transaction. `finished_at`
        (wall clock): when it finished, for a reply stored late (a retry after a full disk).
        When the disk is full, the reserve is released and the store tried once more."""
        blob = _pack_reply(reply)
        staged = self._staged_reference(request_id) if self.state_dir else None
        try:
            self._store_reply(request_id, fingerprint, codec, blob, finished_at)
        except JournalError:
            if not self.reserve.release():
                raise
            self._store_reply(request_id, fingerprint, codec, blob, finished_at)
        if staged is not None:
            staged_bodies.remove(self.state_dir, staged)

    def _store_reply(self, request_id: str, fingerprint: str, codec: str, blob: bytes,
                     finished_at: float | None) -> None:
        with self._io("store the reply"), self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?)",
                             (request_id, fingerprint, codec, blob,
                              self.wall_clock() if finished_at is None else finished_at))
            self._db.execute("DELETE FROM jobs WHERE request_id = ?", (request_id,))

    def _staged_reference(self, request_id: str) -> bytes | None:
        """The staged-body reference the job's row holds, if it holds one (a small read)."""
        with self._io("read the job"):
            row = self._db.execute("SELECT substr(body, 1, 256) FROM jobs WHERE request_id = ? "
                                   "AND length(body) < 256", (request_id,)).fetchone()
        return bytes(row[0]) if row is not None and staged_bodies.is_reference(row[0]) else None

    def drop_staged_unless_accepted(self, request_id: str, reference: bytes) -> None:
        """After the core handled a request whose body the decode stage staged: the file goes
        unless the job's row now refers to it (a refusal, a resend of a known job)."""
        try:
            if self._staged_reference(request_id) != reference:
                staged_bodies.remove(self.state_dir, reference)
        except JournalError as exc:   # left to the periodic sweep
            log.warning("%s", exc)

    def stored_reply(self, request_id: str) -> StoredReply | None:
        with self._io("read a stored reply"):
            row = self._db.execute(
                "SELECT fingerprint, codec, reply, finished_at FROM replies WHERE request_id = ?",
                (request_id,)).fetchone()
        if row is None:
            return None
        if self.wall_clock() - row[3] > self.reply_ttl_s:
            return None
        return StoredReply(request_id, row[0], row[1], _unpack_reply(row[2]))

    def recent(self, limit: int) -> list[tuple[str, float, dict]]:
        """(request_id, finished_at, reply) of the newest stored replies within the TTL, newest
        first (list_history)."""
        cutoff = self.wall_clock() - self.reply_ttl_s
        with self._io("read the history"):
            rows = self._db.execute(
                "SELECT request_id, finished_at, reply FROM replies WHERE finished_at >= ? "
                "ORDER BY finished_at DESC LIMIT ?", (cutoff, int(limit))).fetchall()
        return [(r[0], r[1], _unpack_reply(r[2])) for r in rows]

    def pending(self) -> list[PendingJob]:
        """Accepted jobs without a final reply, oldest first (to re-queue after a restart)."""
        rows = self._db.execute(
            "SELECT request_id, body, fingerprint, accepted_at FROM jobs ORDER BY accepted_at")
        out = []
        for request_id, body, fingerprint, accepted_at in rows:
            body = bytes(body)
            if staged_bodies.is_reference(body) and self.state_dir:
                try:   # a big body the decode stage kept as a file
                    body = staged_bodies.read(self.state_dir, body)
                except OSError as exc:
                    log.error("journal: job %s: its staged body is unreadable (%s); dropping it",
                              request_id, exc)
                    continue
            out.append(PendingJob(request_id, body, fingerprint, accepted_at))
        return out

    def expire(self) -> int:
        """Delete replies older than the TTL and the oldest past max_replies. Returns rows deleted."""
        cutoff = self.wall_clock() - self.reply_ttl_s
        with self._io("expire old replies"):
            deleted = self._db.execute("DELETE FROM replies WHERE finished_at < ?",
                                       (cutoff,)).rowcount
            count = self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
            if count > self.max_replies:
                deleted += self._db.execute(
                    "DELETE FROM replies WHERE request_id IN "
                    "(SELECT request_id FROM replies ORDER BY finished_at LIMIT ?)",
                    (count - self.max_replies,)).rowcount
            if self.state_dir:
                staged_bodies.sweep(self.state_dir, self._staged_names())
        return deleted

    def counts(self) -> dict:
        jobs = self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        replies = self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
        return {"jobs": jobs, "replies": replies}


def _pack_reply(reply: dict) -> bytes:
    """The stored form of a final reply, in both journals."""
    return msgpack.packb(reply, use_bin_type=True, default=_msgpack_default)


def _unpack_reply(blob: bytes) -> dict:
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


def _msgpack_default(obj):
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, memoryview):
        return bytes(obj)
    raise TypeError(f"cannot store {type(obj).__name__}")


class MemoryJournal:
    """The Journal interface without a disk (state_dir None): dicts, same expiry and bound.
    Replies are kept as msgpack bytes, as the SQLite journal keeps them: 100,000 reply dicts
    would be ~2 million objects for Python's garbage collector to walk, and each full
    collection paused the broker loop (30,000 replies: 280 ms; bytes are not walked).
    Accepted jobs are kept without their body: nothing here survives a restart, so the body
    would never be read again, and keeping it held every request's images twice (the body and
    the decoded job: 12 queued 60 MB jobs cost 120 MB each instead of 60; bench/queue_memory.py)."""

    path = ":memory:"

    def __init__(self, reply_ttl_s: float = 3600.0, max_replies: int = 100_000, wall_clock=time.time):
        self.reply_ttl_s = reply_ttl_s
        self.max_replies = max_replies
        self.wall_clock = wall_clock
        self._jobs: dict[str, PendingJob] = {}
        # request_id -> (fingerprint, codec, msgpack reply, finished_at), oldest first
        self._replies: OrderedDict[str, tuple[str, str, bytes, float]] = OrderedDict()

    def close(self) -> None:
        pass

    def accept(self, request_id: str, body: bytes, fingerprint: str) -> None:
        self._jobs[request_id] = PendingJob(request_id, b"", fingerprint, self.wall_clock())

    def finish(self, request_id: str, fingerprint: str, codec: str, reply: dict,
               finished_at: float | None = None) -> None:
        blob = _pack_reply(reply)
        self._replies.pop(request_id, None)
        self._replies[request_id] = (fingerprint, codec, blob,
                                     self.wall_clock() if finished_at is None else finished_at)
        self._jobs.pop(request_id, None)
        if len(self._replies) > self.max_replies:
            self._replies.popitem(last=False)

    def stored_reply(self, request_id: str) -> StoredReply | None:
        entry = self._replies.get(request_id)
        if entry is None or self.wall_clock() - entry[3] > self.reply_ttl_s:
            return None
        fingerprint, codec, blob, _ = entry
        return StoredReply(request_id, fingerprint, codec, _unpack_reply(blob))

    def recent(self, limit: int) -> list[tuple[str, float, dict]]:
        cutoff = self.wall_clock() - self.reply_ttl_s
        out = []
        for request_id in reversed(self._replies):   # newest last in the OrderedDict
            _, _, blob, finished_at = self._replies[request_id]
            if finished_at < cutoff or len(out) >= limit:
                break
            out.append((request_id, finished_at, _unpack_reply(blob)))
        return out

    def pending(self) -> list[PendingJob]:
        """Accepted jobs without a final reply (bodies not kept: empty at every start)."""
        return sorted(self._jobs.values(), key=lambda p: p.accepted_at)

    def expire(self) -> int:
        cutoff = self.wall_clock() - self.reply_ttl_s
        deleted = 0
        while self._replies and next(iter(self._replies.values()))[3] < cutoff:
            self._replies.popitem(last=False)
            deleted += 1
        return deleted

    def counts(self) -> dict:
        return {"jobs": len(self._jobs), "replies": len(self._replies)}


class UnstoredReplies:
    """Final replies the journal could not store (a full disk, its reserve used up), kept in
    memory until a retry stores them: a resend meanwhile gets the reply from here, never a
    second run. The job's row stays in the journal until then, so a broker stopped before the
    disk has room runs the job again after its restart (logged when it stops;
    docs/reliability.md)."""

    def __init__(self, wall_clock=time.time):
        self.wall_clock = wall_clock
        # request_id -> (fingerprint, codec, msgpack reply, finished_at wall clock), oldest first
        self._replies: OrderedDict[str, tuple[str, str, bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._replies)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._replies

    def keep(self, request_id: str, fingerprint: str, codec: str, reply: dict) -> None:
        self._replies[request_id] = (fingerprint, codec, _pack_reply(reply), self.wall_clock())

    def get(self, request_id: str) -> StoredReply | None:
        entry = self._replies.get(request_id)
        if entry is None:
            return None
        fingerprint, codec, blob, _ = entry
        return StoredReply(request_id, fingerprint, codec, _unpack_reply(blob))

    def store_into(self, journal) -> int:
        """Store what the journal takes now, oldest first; stop at the first JournalError
        (raised, with what was stored so far removed). Returns how many were stored."""
        stored = 0
        for request_id, (fingerprint, codec, blob, finished_at) in list(self._replies.items()):
            journal.finish(request_id, fingerprint, codec, _unpack_reply(blob),
                           finished_at=finished_at)
            del self._replies[request_id]
            stored += 1
        return stored

    def request_ids(self) -> list[str]:
        return list(self._replies)


def open_journal(state_dir: str | None, reply_ttl_s: float = 3600.0,
                 reserve_mb: float = 0.0) -> Journal | MemoryJournal:
    """SQLite under state_dir (with `reserve_mb` of disk set aside for replies), or the
    in-memory journal when there is none."""
    if state_dir:
        return Journal(state_dir, reply_ttl_s, reserve_mb=reserve_mb)
    log.info("journal in memory (no --state-dir): jobs and replies do not survive a restart")
    return MemoryJournal(reply_ttl_s)
