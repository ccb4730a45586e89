"""Side channels of a stress run: the bad-input stream, the oversized frame, and the status
monitor that tells the fault scheduler which worker pids exist."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, defaultdict

import zmq

from . import bodies
from .bad_input import CORPUS, BadCase
from .ledger import Ledger

log = logging.getLogger("stress.probes")

ERROR_CODES = frozenset({
    "malformed_message", "unknown_message_type", "validation_error", "model_not_found",
    "unsupported_feature", "queue_full", "timeout", "cancelled", "worker_lost", "out_of_memory",
    "duplicate_request_id", "internal_error", "unavailable", "forbidden"})

# outcome of one bad frame
REFUSED = "refused"            # typed error, a code the case names
OTHER_CODE = "other_code"      # typed error, another catalogue code (reported, not a failure)
ACCEPTED = "accepted"          # success: the broker took input it must refuse
UNTYPED = "untyped"            # a reply without a catalogue error code
NO_REPLY = "no_reply"          # nothing within the wait: a lost request
VIOLATIONS = (ACCEPTED, UNTYPED, NO_REPLY)


class BadInputClient(threading.Thread):
    """Sends the corpus one frame at a time and classifies each reply."""

    def __init__(self, ctx: zmq.Context, endpoint: str, ledger: Ledger, phase: str, seed: int,
                 stop: threading.Event, simulated_workers: bool, pause_s: float = 0.05,
                 heavy_interval_s: float = 8.0, reply_wait_s: float = 20.0,
                 worker_reply_wait_s: float = 20.0):
        super().__init__(name=f"bad-input-{phase}", daemon=True)
        self.ctx, self.endpoint, self.ledger, self.phase = ctx, endpoint, ledger, phase
        self.rng = random.Random(seed)
        self.stop = stop
        self.simulated_workers = simulated_workers
        self.pause_s, self.heavy_interval_s, self.reply_wait_s = pause_s, heavy_interval_s, reply_wait_s
        # cases only a worker refuses wait in the job queue first (minutes behind real jobs)
        self.worker_reply_wait_s = worker_reply_wait_s
        self.outcomes: dict[str, Counter] = defaultdict(Counter)
        self.examples: dict[str, str] = {}
        self.paused = threading.Event()  # set while the broker is down on purpose
        self.disruptions = 0  # bumped by the fault scheduler when it kills the broker
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._drive()
        except BaseException as exc:
            self.error = exc
            log.exception("bad-input client crashed")

    def _socket(self) -> zmq.Socket:
        sock = self.ctx.socket(self.rng.choice([zmq.DEALER, zmq.DEALER, zmq.REQ]))
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    def _drive(self) -> None:
        last_heavy = 0.0
        n = 0
        sock = self._socket()
        try:
            while not self.stop.is_set():
                if self.paused.is_set():
                    self.stop.wait(0.2)
                    continue
                case = self.rng.choice(CORPUS)
                if case.heavy:
                    if time.monotonic() - last_heavy < self.heavy_interval_s:
                        continue
                    last_heavy = time.monotonic()
                n += 1
                rid = f"{self.phase}-bad-{n}"
                frame = case.build(self.rng, rid)
                disruptions_before = self.disruptions
                outcome, detail = self._one(sock, case, frame)
                if outcome == NO_REPLY and (self.paused.is_set()
                                            or self.disruptions != disruptions_before):
                    # sent just before a planned kill -9 of the broker: a refusal is not
                    # journaled, so it dies with the broker; not a lost request
                    outcome = "skipped_broker_down"
                self.outcomes[case.name][outcome] += 1
                if outcome != REFUSED:
                    self.examples.setdefault(f"{case.name}:{outcome}", detail[:200])
                if outcome in (NO_REPLY, UNTYPED, "skipped_broker_down") or sock.type == zmq.REQ:
                    sock.close(linger=0)  # a late reply must not be read as the next one's
                    sock = self._socket()
                self.stop.wait(self.pause_s)
        finally:
            sock.close(linger=0)

    def _one(self, sock: zmq.Socket, case: BadCase, frame: bytes) -> tuple[str, str]:
        if sock.type == zmq.DEALER:
            sock.send_multipart([b"", frame])
        else:
            sock.send(frame)
        wait_s = self.worker_reply_wait_s if case.policed_by == "worker" else self.reply_wait_s
        deadline = time.monotonic() + wait_s
        # not cut short by `stop`: a frame in flight at the end still deserves its full wait
        while time.monotonic() < deadline:
            if not sock.poll(100, zmq.POLLIN):
                continue
            parts = sock.recv_multipart()
            reply = bodies.decode_reply(parts[-1])
            if reply is None:
                return UNTYPED, f"undecodable reply {parts[-1][:60]!r}"
            if reply.get("final") is False:
                continue  # progress was never asked for; the final still decides
            code = reply.get("error_code")
            if reply.get("success"):
                return ACCEPTED, f"{case.name}: accepted ({len(frame)} bytes)"
            if code not in ERROR_CODES:
                return UNTYPED, f"{case.name}: error_code {code!r}"
            if code in case.expect:
                return REFUSED, ""
            return OTHER_CODE, f"{case.name}: {code}: {str(reply.get('error'))[:120]}"
        return NO_REPLY, f"{case.name}: no reply in {wait_s:.0f}s ({len(frame)} bytes)"

    def summary(self) -> dict:
        per_case = {name: dict(c) for name, c in sorted(self.outcomes.items())}
        total = Counter()
        violations = Counter()
        worker_policed_accepted = 0
        for case in CORPUS:
            c = self.outcomes.get(case.name, Counter())
            total.update(c)
            for outcome in VIOLATIONS:
                if not c[outcome]:
                    continue
                if outcome == ACCEPTED and case.policed_by == "worker" and self.simulated_workers:
                    worker_policed_accepted += c[outcome]  # sim workers have no model files
                    continue
                violations[f"bad_input_{outcome}"] += c[outcome]
        return {"sent": sum(total.values()), "outcomes": dict(total), "per_case": per_case,
                "violations": dict(violations),
                "worker_policed_accepted_by_sim": worker_policed_accepted,
                "examples": dict(list(self.examples.items())[:12])}


def send_oversized(ctx: zmq.Context, endpoint: str, size_mb: int) -> None:
    """One frame larger than the broker's --max-message-mb: the socket drops it (and the
    connection); there is no reply to wait for. The caller then checks the broker still answers."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b"", b"{" + b" " * (size_mb * 2**20) + b"}"])
        time.sleep(1.0)
    finally:
        sock.close(linger=0)


def status_once(ctx: zmq.Context, endpoint: str, timeout_s: float = 3.0) -> dict | None:
    """One status_request on a fresh socket; the status_response `data`, or None."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        rid = f"status-{time.monotonic_ns()}"
        sock.send_multipart([b"", bodies.encode(bodies.status_body(rid), "msgpack")])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sock.poll(100, zmq.POLLIN):
                reply = bodies.decode_reply(sock.recv_multipart()[-1])
                if reply and reply.get("request_id") == rid and reply.get("final") is not False:
                    return reply.get("data") if isinstance(reply.get("data"), dict) else {}
        return None
    finally:
        sock.close(linger=0)


class StatusMonitor(threading.Thread):
    """Polls status every `interval_s`: live worker pids for the fault scheduler, restarts
    seen (a worker pid that was not there before), queue depth."""

    def __init__(self, ctx: zmq.Context, endpoint: str, stop: threading.Event,
                 interval_s: float = 1.0):
        super().__init__(name="status-monitor", daemon=True)
        self.ctx, self.endpoint, self.stop, self.interval_s = ctx, endpoint, stop, interval_s
        self._lock = threading.Lock()
        self.workers: list[dict] = []
        self.pids_seen: set[int] = set()
        self.initial_pids: set[int] | None = None
        self.polls = self.unanswered = 0
        self.max_queue_depth = 0
        self.last: dict | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll_once()
            self.stop.wait(self.interval_s)

    def poll_once(self) -> dict | None:
        data = status_once(self.ctx, self.endpoint)
        with self._lock:
            self.polls += 1
            if data is None:
                self.unanswered += 1
                return None
            self.last = data
            workers = [w for w in data.get("workers") or [] if isinstance(w, dict)]
            self.workers = workers
            # the stress tool's own raw peers (raw_worker.py) are no worker processes
            pids = {w.get("pid") for w in workers if isinstance(w.get("pid"), int)
                    and not str(w.get("worker_id", "")).startswith("stress-")}
            if self.initial_pids is None and pids:
                self.initial_pids = set(pids)
            self.pids_seen |= pids
            broker = data.get("broker") or {}
            self.max_queue_depth = max(self.max_queue_depth, int(broker.get("queue_depth") or 0))
        return data

    def live_worker_pids(self) -> list[int]:
        with self._lock:
            return [w["pid"] for w in self.workers
                    if isinstance(w.get("pid"), int) and w.get("state") != "lost"]

    def worker_id_of(self, pid: int) -> str | None:
        with self._lock:
            return next((w.get("worker_id") for w in self.workers if w.get("pid") == pid), None)

    def new_worker_pids(self) -> int:
        with self._lock:
            return len(self.pids_seen - (self.initial_pids or set()))
