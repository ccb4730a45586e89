"""The issue-16 fault kinds, run by the fault scheduler (faults.py) on its schedule:

  big_bodies        a hostile client sends legal ~60 MB JSON and msgpack bodies
  poison_telemetry  a worker peer sends telemetry "x", free_mb "abc" and other garbage frames
  rogue_worker      a peer sends READY with a real worker's id, then forges results for jobs
                    it never got
  stuck_worker      a peer that heart-beats and takes jobs but never finishes one
  full_disk         the split phase's journal disk (a tmpfs) is filled, then freed

Each takes the scheduler, returns the one-line outcome the run log shows, and appends what it
measured to `scheduler.attacks[kind]` (the report's table and JSON). The long ones run in a
side thread so the schedule goes on; their measurements land when they finish.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

from . import bodies
from .attacks import send_big_bodies
from .clients import Conn
from .ledger import Entry
from .probes import status_once
from .raw_worker import POISON_FRAMES, PoisonWorker, RogueWorker, StuckWorker
from .worker_health import STRESS_PREFIX

log = logging.getLogger("stress.hostile")

KINDS = ("big_bodies", "poison_telemetry", "rogue_worker", "stuck_worker", "full_disk")
_serial = itertools.count(1)


# big bodies (which stall the broker's loop on current code), the poison worker and the full
# disk are measured one at a time: a stall must not be read as poison breaking status
_exclusive = threading.Lock()


def _side(s, name: str, fn) -> None:
    """Run `fn` in a side thread so the schedule goes on; nothing new once the phase stopped
    (its requests would miss the end-of-run resend)."""
    def go():
        try:
            if not s.stop.is_set():
                fn()
            else:
                log.warning("fault %s not run: the phase is over", name)
        except BaseException as exc:   # the report lists it as a tool error
            s.error = s.error or exc
            log.exception("fault %s crashed", name)
    t = threading.Thread(target=go, name=name, daemon=True)
    t.start()
    s._side_threads.append(t)


class _Exclusive:
    """`with _Exclusive(s):` waits its turn; `.ok` is False when the phase ended meanwhile."""

    def __init__(self, s):
        self.s = s

    def __enter__(self):
        _exclusive.acquire()
        self.ok = not self.s.stop.is_set()
        return self

    def __exit__(self, *exc):
        _exclusive.release()
        return False


def _peer_error(s, peer) -> None:
    if peer.error is not None:
        s.error = s.error or peer.error


def _real_workers(s) -> list[dict]:
    return [w for w in s.monitor.workers if w.get("state") != "lost"
            and not str(w.get("worker_id", "")).startswith(STRESS_PREFIX)]


def _status_watch(s, seconds: float, timeout_s: float = 15.0) -> dict:
    """Poll status for `seconds`: how many polls were answered within `timeout_s`."""
    asked = answered = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        asked += 1
        if status_once(s.ctx, s.topo.frontend, timeout_s=timeout_s) is not None:
            answered += 1
        time.sleep(1.0)
    return {"status_polls": asked, "status_answered": answered}


def big_bodies(s) -> str:
    o = s.topo.opts
    size_mb = min(o.big_body_mb, o.max_message_mb - 1)
    count = o.big_bodies_per_fault

    def go():
        with _Exclusive(s) as turn:
            if not turn.ok:
                return
            result = send_big_bodies(s.ctx, s.topo.frontend, s.ledger, s.topo.kind, count,
                                     size_mb, s.rng.randrange(2**31), wait_s=120.0,
                                     stop_now=s.stop)
        s.attacks.setdefault("big_bodies", []).append(result)
        log.info("big bodies done: %s", result)

    _side(s, "big-bodies", go)
    return f"{count} legal bodies of {size_mb:.0f} MB (JSON zeros / msgpack init_image)"


def poison_telemetry(s) -> str:
    o = s.topo.opts
    peer = PoisonWorker(s.ctx, s.topo.backend, f"{STRESS_PREFIX}poison-{next(_serial)}", s.stop,
                        duration_s=o.poison_s, heartbeat_interval_s=o.heartbeat_interval_s,
                        period_s=0.1)

    def go():
        with _Exclusive(s) as turn:
            if not turn.ok:
                return
            finals_before = s.ledger.finals_count()
            peer.start()
            watch = _status_watch(s, o.poison_s + 3.0)
            peer.join(timeout=30)
        _peer_error(s, peer)
        result = {**peer.summary(), "poison_frames": peer.poison_sent(), **watch,
                  "finals_meanwhile": s.ledger.finals_count() - finals_before}
        if watch["status_answered"] < watch["status_polls"]:
            s.ledger.violation("status_unanswered_during_poison",
                               f"{watch['status_polls'] - watch['status_answered']} of "
                               f"{watch['status_polls']} status polls unanswered in 15 s")
        s.attacks.setdefault("poison_telemetry", []).append(result)
        log.info("poison telemetry done: %s", result)

    _side(s, "poison", go)
    return (f"poison worker {peer.worker_id}: {len(POISON_FRAMES)} kinds of garbage frame "
            f"for {o.poison_s:.0f}s")


def rogue_worker(s) -> str:
    o = s.topo.opts
    # a worker killed or stopped just now may be declared lost, and then its id is free for
    # whoever registers it first (the product's rule): impersonate a healthy one
    real = [w for w in _real_workers(s)
            if not s.topo.fault_log.covers(str(w.get("worker_id")), time.time())]
    if not real:
        return "skipped: no live, unfaulted real worker to impersonate"
    victim = s.rng.choice(real)["worker_id"]
    started = time.time()
    phase = s.topo.kind

    def targets() -> list[str]:
        return [e.request_id for e in s.ledger.unanswered(phase)][-20:]

    peer = RogueWorker(s.ctx, s.topo.backend, f"{STRESS_PREFIX}rogue-{next(_serial)}", s.stop,
                       duration_s=o.rogue_s, heartbeat_interval_s=o.heartbeat_interval_s,
                       victim_id=victim, targets=targets)

    def go():
        peer.start()
        peer.join(timeout=60)
        _peer_error(s, peer)
        result = peer.summary()
        faulted_meanwhile = any(s.topo.fault_log.covers(victim, t)
                                for t in (started, started + o.rogue_s, time.time()))
        if peer.takeover_registered and not faulted_meanwhile:
            s.ledger.violation("rogue_took_worker_id", f"{peer.worker_id} registered as {victim}")
        result["victim_faulted_meanwhile"] = faulted_meanwhile
        s.attacks.setdefault("rogue_worker", []).append(result)
        log.info("rogue worker done: %s", result)

    _side(s, "rogue", go)
    return f"rogue peer READY as {victim}, then forged results for waiting jobs"


def stuck_worker(s) -> str:
    o = s.topo.opts
    real = _real_workers(s)
    if not real:
        return "skipped: no live real worker to copy"
    template = max(real, key=lambda w: len(w.get("model_sizes_mb") or {}))
    peer = StuckWorker(s.ctx, s.topo.backend, f"{STRESS_PREFIX}stuck-{next(_serial)}", s.stop,
                       duration_s=o.stuck_s, heartbeat_interval_s=o.heartbeat_interval_s,
                       template=template)

    def go():
        peer.start()
        peer.join(timeout=o.stuck_s + 30)
        _peer_error(s, peer)
        # which of its jobs finished while it still heart-beat is settled at the end of the
        # phase (settle_stuck_workers), when every reply that will come has come
        result = {**peer.summary(), "held_s": o.stuck_s,
                  "_taken": sorted(set(peer.job_ids_seen)),
                  "_left_at": peer.left_at or time.monotonic()}
        s.attacks.setdefault("stuck_worker", []).append(result)
        log.info("stuck worker done: %s", result)

    _side(s, "stuck", go)
    return f"stuck peer {peer.worker_id} for {o.stuck_s:.0f}s (copies {template['worker_id']})"


def settle_stuck_workers(attacks: dict, ledger) -> None:
    """For each stuck worker: of the client requests it took, how many finished elsewhere
    while it still heart-beat (the watchdog's doing), how many only after it vanished
    (re-queued as for a lost worker), and how many never got a final reply. Requests nobody
    waited for are counted apart: a vanished client's (its reply is only read by the
    end-of-run resend) and the bad-input stream's (not in the ledger)."""
    for result in attacks.get("stuck_worker", []):
        taken, left = result.pop("_taken", []), result.pop("_left_at", 0.0)
        result["job_ids"] = taken
        counts = {"finished_while_stuck": 0, "finished_after_it_left": 0, "never_finished": 0,
                  "nobody_waiting": 0}
        for rid in taken:
            entries = [e for e in ledger.entries_for(rid) if not e.vanished]
            if not entries:
                counts["nobody_waiting"] += 1
                continue
            ats = [f.at for e in entries for f in e.finals]
            if not ats:
                counts["never_finished"] += 1
            elif min(ats) <= left:
                counts["finished_while_stuck"] += 1
            else:
                counts["finished_after_it_left"] += 1
        result.update(counts)


def full_disk(s) -> str:
    disk = getattr(s.topo, "tmpfs", None)
    if disk is None:
        return "skipped: this phase has no state dir (serve keeps its journal in memory)"
    if not disk.mounted:
        return f"skipped: {disk.skip_reason}"
    _side(s, "full-disk", lambda: _full_disk(s, disk))
    return (f"state-dir tmpfs of {disk.size_mb} MB filled for {s.topo.opts.full_disk_s:.0f}s "
            f"with requests sent meanwhile, then freed")


_DISK_ERRORS = ("disk is full", "No space left", "disk I/O error")


def _disk_errors_logged(s) -> int:
    n = 0
    for path in s.topo.broker_logs():
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            continue
        n += sum(text.count(e) for e in _DISK_ERRORS)
    return n


def _full_disk(s, disk) -> None:
    with _Exclusive(s) as turn:
        if not turn.ok:
            return
        state = _while_full(s, disk)
    _after_freeing(s, state)


def _while_full(s, disk) -> dict:
    """Fill the state dir's filesystem, send four requests, watch for `full_disk_s`, free it."""
    o = s.topo.opts
    phase = s.topo.kind
    n = next(_serial)
    errors_before = _disk_errors_logged(s)
    # SQLite reuses its WAL file's space (it never shrinks here) and the free pages of deleted
    # rows: a full disk bites a write bigger than that room. The first request carries an
    # init_image 2 MB bigger than the WAL (as far as --max-message-mb allows).
    wal = disk.path / "broker-journal.sqlite3-wal"
    wal_mb = wal.stat().st_size / 2**20 if wal.exists() else 0.0
    buster_mb = max(2.0, min(o.max_message_mb - 1.0, wal_mb + 2.0))
    conn = Conn(s.ctx, s.topo.frontend, s.ledger, s.rng)
    probes: list[Entry] = []
    written = disk.fill()
    try:
        free_when_full = disk.free_mb()
        for i in range(4):
            rid = f"{phase}-disk-{n}-{i}"
            codec = bodies.CODECS[(i + 1) % 2]
            spec = bodies.GenerationSpec(request_id=rid, form="flat", steps=2, prompt="full disk")
            frame = (bodies.big_msgpack_body(spec, buster_mb) if i == 0
                     else bodies.encode(bodies.generation_body(spec), codec))
            probes.append(s.ledger.add(Entry(
                key=rid, request_id=rid, kind="disk_probe", phase=phase, frame=frame,
                codec=codec, expected_reply_type=bodies.REPLY_TYPE["flat"])))
            conn.send(probes[-1])
        deadline = time.monotonic() + o.full_disk_s
        while time.monotonic() < deadline and not s.stop.is_set():
            if conn.poll(100):
                conn.receive()
        answered_full = [p.finals[0].error_code or "success" for p in probes if p.finals]
        status_ok = status_once(s.ctx, s.topo.frontend, timeout_s=10.0) is not None
    finally:
        disk.free()
    return {"conn": conn, "probes": probes, "errors_before": errors_before, "result": {
        "filled_mb": round(written / 2**20, 1), "free_mb_when_full": free_when_full,
        "wal_mb_before": round(wal_mb, 1), "first_request_mb": round(buster_mb, 1),
        "held_s": o.full_disk_s, "requests_while_full": len(probes),
        "answered_while_full": len(answered_full), "outcomes_while_full": sorted(answered_full),
        "status_answered_while_full": status_ok}}


def _after_freeing(s, state: dict) -> None:
    """The disk is free again: wait for the four, then send each body once more from another
    socket. A job that ran must give its stored outcome, never a second run (the ledger
    compares seeds: duplicated); a request refused while full (or never answered) is new."""
    conn, probes = state["conn"], state["probes"]
    again = Conn(s.ctx, s.topo.frontend, s.ledger, s.rng)
    resends: list[Entry] = []
    try:
        deadline = time.monotonic() + 30.0
        while conn.pending and time.monotonic() < deadline and not s.stop.is_set():
            if conn.poll(100):
                conn.receive()
        for p in probes:
            ran = bool(p.finals) and p.finals[0].success
            resends.append(s.ledger.add(Entry(
                key=f"{p.key}#after-disk", request_id=p.request_id,
                kind="probe_same" if ran else "disk_retry", phase=p.phase, frame=p.frame,
                codec=p.codec, expected_reply_type=p.expected_reply_type,
                parent=p.key if ran else None)))
            again.send(resends[-1])
        deadline = time.monotonic() + 30.0
        while again.pending and time.monotonic() < deadline and not s.stop.is_set():
            if again.poll(100):
                again.receive()
    finally:
        conn.close()
        again.close()
    result = {**state["result"],
              "disk_errors_logged": _disk_errors_logged(s) - state["errors_before"],
              "answered_in_the_end": sum(1 for p in probes if p.finals),
              "outcomes_in_the_end": sorted(p.finals[0].error_code or "success"
                                            for p in probes if p.finals),
              "resent_after_free": len(resends),
              "resends_answered": sum(1 for r in resends if r.finals)}
    s.attacks.setdefault("full_disk", []).append(result)
    log.info("full disk done: %s", result)
