"""Queue order and limits, the SQLite journal, and heartbeat liveness with an injected clock."""

from __future__ import annotations

import pytest

from broker.job_queue import JobQueue
from broker.journal import Journal, JournalError, MemoryJournal
from broker.registry import WorkerRegistry
from protocol.worker_protocol import Ready, Telemetry


def test_priorities_then_fifo_and_positions():
    q = JobQueue()
    for rid, prio in [("n1", "normal"), ("l1", "low"), ("h1", "high"), ("n2", "normal"), ("h2", "high")]:
        q.push(rid, prio, None)
    assert [rid for rid, _ in q] == ["h1", "h2", "n1", "n2", "l1"]
    assert q.position("n2") == 3 and q.position("missing") is None
    q.push_front("l0", "low", None)
    assert [rid for rid, _ in q][-2:] == ["l0", "l1"]
    assert q.remove("n1") is None and "n1" not in q and len(q) == 5


def test_queue_counts_the_bytes_its_jobs_hold():
    q = JobQueue()
    q.push("a", "normal", None, size_bytes=100)
    q.push("b", "low", None, size_bytes=50)
    assert q.bytes_held == 150
    q.remove("a")
    assert q.bytes_held == 50
    q.push_front("a", "normal", None, size_bytes=100)   # re-queued: counted once again
    q.push_front("a", "normal", None, size_bytes=100)
    assert q.bytes_held == 150
    q.remove("a"), q.remove("b"), q.remove("missing")
    assert q.bytes_held == 0


# the size limit moved to the broker core: test_core.py::test_queue_full_refuses_new_jobs_never_requeued_ones


def test_journal_survives_reopen_and_expires(tmp_path):
    wall = [1000.0]
    j = Journal(str(tmp_path), reply_ttl_s=60.0, wall_clock=lambda: wall[0])
    j.accept("a", b'{"x":1}', "fp-a")
    j.accept("b", b'{"x":2}', "fp-b")
    j.finish("a", "fp-a", "json", {"success": True, "data": {"image": b"\x00\x01"}})
    j.close()

    j = Journal(str(tmp_path), reply_ttl_s=60.0, wall_clock=lambda: wall[0])
    assert [p.request_id for p in j.pending()] == ["b"]
    stored = j.stored_reply("a")
    assert stored.fingerprint == "fp-a" and stored.reply["data"]["image"] == b"\x00\x01"
    wall[0] += 61.0
    assert j.stored_reply("a") is None
    assert j.expire() == 1 and j.counts() == {"jobs": 1, "replies": 0}


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_journal_is_bounded_and_expires(kind):
    wall = [0.0]
    if kind == "sqlite":
        j = Journal(None, reply_ttl_s=100.0, max_replies=5, wall_clock=lambda: wall[0])
    else:
        j = MemoryJournal(reply_ttl_s=100.0, max_replies=5, wall_clock=lambda: wall[0])
    for i in range(12):
        wall[0] += 1.0
        j.finish(f"r{i}", "fp", "json", {"i": i})
    j.expire()
    assert j.counts()["replies"] == 5
    assert j.stored_reply("r11").reply == {"i": 11} and j.stored_reply("r0") is None
    j.accept("p", b"{}", "fp-p")
    assert [p.request_id for p in j.pending()] == ["p"]
    wall[0] += 96.5          # r7 finished at 8, now 108.5: older than the 100 s TTL
    assert j.stored_reply("r7") is None and j.stored_reply("r8") is not None
    assert j.expire() == 1 and j.counts() == {"jobs": 1, "replies": 4}


def test_liveness_with_injected_clock():
    now = [0.0]
    reg = WorkerRegistry(heartbeat_interval_s=1.0, heartbeat_liveness=3, clock=lambda: now[0])
    a, _ = reg.register(b"id-a", Ready(worker_id="a", device="cpu", memory_total_mb=100))
    b, _ = reg.register(b"id-b", Ready(worker_id="b"))
    now[0] = 2.5
    reg.touch(a)
    now[0] = 3.1          # b silent for 3.1 s > 3 intervals; a heard 0.6 s ago
    assert [w.worker_id for w in reg.expire()] == ["b"]
    assert b.state == "lost" and reg.by_identity(b"id-b") is None
    assert [w.worker_id for w in reg.live()] == ["a"]
    assert reg.expire() == []
    # the same worker id registering again replaces the lost record
    b2, previous = reg.register(b"id-b2", Ready(worker_id="b"))
    assert previous is None and reg.by_identity(b"id-b2") is b2 and b2.state == "idle"
    a.jobs["job"] = 1
    a2, previous = reg.register(b"id-a2", Ready(worker_id="a"))
    assert previous is a  # its jobs must be re-queued by the broker


def test_registry_keeps_model_sizes_and_views_current_across_heartbeats():
    reg = WorkerRegistry()
    rec, _ = reg.register(b"id", Ready(worker_id="w", telemetry=Telemetry.from_dict({
        "model_sizes_mb": {"refiner": 3000.0},
        "models_loaded": [{"name": "base", "size_mb": 6500.0}]})))
    assert reg.model_sizes == {"refiner": 3000.0, "base": 6500.0}
    assert rec.warm == {"base"} and rec.loaded_total_mb == 6500.0
    # a heartbeat with the same model lists keeps the views; a new load updates views and sizes
    reg.touch(rec, Telemetry.from_dict({"model_sizes_mb": {"refiner": 3000.0},
                                        "models_loaded": [{"name": "base", "size_mb": 6500.0}],
                                        "memory": {"total_mb": 24000.0, "used_mb": 7000.0}}))
    assert rec.memory["free_mb"] == 17000.0 and rec.warm == {"base"}
    reg.touch(rec, Telemetry.from_dict({"model_sizes_mb": {"refiner": 3000.0}, "models_loading": ["vae"],
                                        "models_loaded": [{"name": "base", "size_mb": 6500.0},
                                                          {"name": "cn-canny", "size_mb": 2500.0}]}))
    assert rec.warm == {"base", "cn-canny", "vae"} and rec.loaded_total_mb == 9000.0
    assert reg.model_sizes["cn-canny"] == 2500.0


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_stored_reply_is_a_serialized_copy_in_both_journals(kind):
    """Both journals keep msgpack bytes, not the reply dict (a dict per stored reply made the
    memory journal's garbage-collector pauses grow with traffic): a later change to the dict
    does not reach the stored reply, image bytes stay bytes, tuples come back as lists."""
    j = Journal(None) if kind == "sqlite" else MemoryJournal()
    reply = {"success": True, "data": {"image": b"\x89PNG", "size": (8, 8)}}
    j.finish("r", "fp", "msgpack", reply)
    reply["data"]["image"] = b"changed"
    stored = j.stored_reply("r")
    assert stored.reply == {"success": True, "data": {"image": b"\x89PNG", "size": [8, 8]}}
    assert (stored.fingerprint, stored.codec) == ("fp", "msgpack")


def test_the_disk_reserve_is_released_for_replies_and_blocks_new_jobs_until_restored(tmp_path):
    """A reply that SQLite cannot store (here: an injected SQLITE_FULL on the first try) is
    stored after the reserve file gives its room back; accepts are refused meanwhile, and
    allowed again once the reserve could be written again."""
    wall = [0.0]
    j = Journal(str(tmp_path), wall_clock=lambda: wall[0], reserve_mb=1)
    reserve = tmp_path / "broker-journal.reserve"
    assert reserve.stat().st_size == 2**20
    j.accept("a", b"{}", "fp")
    real_store, failures = j._store_reply, [1]

    def full_once(*args):
        if failures:
            failures.pop()
            raise JournalError("journal could not store the reply: database or disk is full")
        return real_store(*args)
    j._store_reply = full_once
    j.finish("a", "fp", "json", {"success": True})
    assert j.stored_reply("a").reply == {"success": True} and not reserve.exists()
    with pytest.raises(JournalError, match="reserve"):
        j.accept("b", b"{}", "fp")
    wall[0] += 3.0                     # the next try writes the reserve again: room for it now
    j.accept("b", b"{}", "fp")
    assert reserve.stat().st_size == 2**20 and [p.request_id for p in j.pending()] == ["b"]
    # no reserve left to give: the error reaches the caller (the broker keeps the reply)
    j.reserve.release()
    failures.append(1)
    with pytest.raises(JournalError):
        j.finish("b", "fp", "json", {"success": False})


def test_the_disk_reserve_is_written_where_the_filesystem_has_no_fallocate(tmp_path, monkeypatch):
    import errno
    import os

    def no_fallocate(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(os, "posix_fallocate", no_fallocate)
    j = Journal(str(tmp_path), reserve_mb=1)
    assert j.reserve.held and (tmp_path / "broker-journal.reserve").stat().st_size == 2**20
    j.accept("a", b"{}", "fp")     # new jobs are taken
