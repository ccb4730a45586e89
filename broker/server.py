"""The broker: a frontend ROUTER for clients, a backend ROUTER for workers, one loop thread.

The loop thread owns both sockets (they are created and bound in start(), then used only by
it). Each turn it reads a batch from each socket, fires timers (heartbeats, liveness,
job timeouts, journal expiry) and dispatches queued jobs with broker.routing. The worker
side of the loop (backend messages, liveness) is broker.worker_side. Every accepted
request gets exactly one final reply per waiting peer; the journal (broker.journal) keeps
accepted jobs and final replies across restarts. Management messages live in
broker.management. `sdxl-broker broker` and `serve` run one (broker.service).
"""

from __future__ import annotations

import ipaddress
import heapq
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

import zmq

from protocol import codec
from protocol import constants as C
from protocol import worker_protocol as W
from protocol.errors import ProtocolError
from protocol.job import Job
from protocol.replies import error_reply, final_reply, progress_message

from broker import job_log, management, routing
from broker.job_queue import JobQueue
from broker.metrics import BrokerMetrics
from broker.jobs import QUEUED, RUNNING, JobState, Peer
from broker.journal import open_journal
from broker.registry import WorkerRegistry
from broker.worker_side import WorkerSide

log = logging.getLogger(__name__)

_BATCH = 256                # messages read from one socket per loop turn
# queued jobs the dispatcher looks at per pass (in serving order): a job waiting for its best
# worker does not block the ones behind it, but a pass stays bounded with a long queue
_DISPATCH_LOOKAHEAD = 64
# plain ints: pyzmq's enum flag arithmetic shows up in profiles of the hot loop
_NOBLOCK, _EVENTS, _POLLIN = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)
_SNDMORE, _SNDMORE_NOBLOCK = int(zmq.SNDMORE), int(zmq.SNDMORE | zmq.NOBLOCK)
_JOURNAL_EXPIRE_EVERY_S = 60.0
_IDLE_BACKEND_BATCH_S = 0.02   # backend read pace while no job or management op is in flight
_FALLBACK_REPLY_TYPE = "error_response"  # a body too broken to tell what it asked for


_parse_module = None


def _parser():
    """protocol.parse (the one request parser), imported at Broker.start, not at module import,
    so `sdxl-broker --help` (which imports every command module) does not build its schemas."""
    global _parse_module
    if _parse_module is None:
        from protocol import parse
        _parse_module = parse
    return _parse_module


@dataclass
class BrokerConfig:
    frontend: str = "tcp://127.0.0.1:5555"
    backend: str = "tcp://127.0.0.1:5556"
    state_dir: str | None = None       # SQLite journal lives here; None -> in-memory journal
    max_queue: int = 1000
    max_attempts: int = 2
    heartbeat_interval_s: float = 1.0
    heartbeat_liveness: int = 3
    routing: str = "smart"             # smart | round-robin | least-loaded | tiered
    max_message_mb: int = C.DEFAULT_MAX_MESSAGE_MB
    default_model_base: str | None = None
    allow_pickle: bool = False
    reply_ttl_s: float = 3600.0
    curve_secret_key: str | None = None    # broker's .key_secret file: CURVE on both sockets
    curve_allowed_keys: str | None = None  # dir of authorised peers' public .key files
    curve_extra_keys: tuple = ()           # more authorised public .key files (serve's workers)
    local_frontend: str | None = None      # a second, NULL-security client endpoint (loopback only)


class Broker(WorkerSide):
    def __init__(self, config: BrokerConfig, clock: Callable[[], float] = time.monotonic):
        if config.routing not in routing.POLICIES:
            raise ValueError(f"unknown routing policy {config.routing!r}; one of {routing.POLICIES}")
        self.config = config
        self.clock = clock
        self.registry = WorkerRegistry(config.heartbeat_interval_s, config.heartbeat_liveness, clock)
        self.queue = JobQueue(config.max_queue)
        self.jobs: dict[str, JobState] = {}     # accepted, not finished
        self.rr = routing.RoundRobin()
        self.manage_ops: dict[int, management.ManageOp] = {}
        self.journal = None   # broker.journal.Journal or MemoryJournal, opened by start()
        self.frontend_endpoint = ""
        self.local_frontend = None        # zmq ROUTER for config.local_frontend, if any
        self.local_frontend_endpoint = ""
        self.backend_endpoint = ""
        self.counters = {"completed": 0, "failed": 0, "accepted": 0, "malformed": 0}
        self.metrics = BrokerMetrics()   # Prometheus counters/histograms of this broker only
        self._deadlines: list[tuple[float, str]] = []   # heap of (deadline, request_id)
        self._lock = threading.RLock()   # held by the loop while it changes state; status() reads
        self._stopping = threading.Event()
        self._drain_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._started_at = clock()
        self._ctx: zmq.Context | None = None
        self._dirty = False   # something changed that may let a queued job dispatch
        # unique across broker restarts, so a worker's answer to a dispatch of the previous
        # broker process is never mistaken for one of this process
        self._dispatch_ids = itertools.count(time.time_ns())
        self._handlers = self._backend_handlers()

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Bind both sockets, reload the journal, start the loop thread; return when accepting."""
        self._ctx = zmq.Context()
        try:
            self._start_curve_auth()
            self.frontend = self._ctx.socket(zmq.ROUTER)
            self.frontend.setsockopt(zmq.LINGER, 0)
            self.frontend.setsockopt(zmq.MAXMSGSIZE, int(self.config.max_message_mb) * 2**20)
            # a client that retries from a fresh socket with the same identity (a C# DEALER
            # with Options.Identity) takes the identity over instead of being ignored
            self.frontend.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self._secure(self.frontend)
            self.frontend.bind(self.config.frontend)
            self.backend = self._ctx.socket(zmq.ROUTER)
            self.backend.setsockopt(zmq.LINGER, 0)
            self._secure(self.backend)
            self.backend.bind(self.config.backend)
            self.frontend_endpoint = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
            self.backend_endpoint = self.backend.getsockopt_string(zmq.LAST_ENDPOINT)
            if self.config.local_frontend:
                self._bind_local_frontend(self.config.local_frontend)
            self.journal = open_journal(self.config.state_dir, self.config.reply_ttl_s)
            _parser()  # import the request parser now, not on the first request (~0.5 s)
            self._started_at = self.clock()
            self._restore_from_journal()
        except Exception:
            # e.g. an endpoint already in use: release what was bound, leave nothing behind
            self._stop_curve_auth()
            self._ctx.destroy(linger=0)
            self._ctx = None
            if self.journal is not None:
                self.journal.close()
                self.journal = None
            raise
        self._thread = threading.Thread(target=self._loop, name="broker-loop", daemon=True)
        self._thread.start()
        log.info("broker accepting on %s, workers on %s (routing %s)",
                 self.frontend_endpoint, self.backend_endpoint, self.config.routing)

    def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Stop accepting; wait up to drain_timeout_s for running jobs; close everything.
        Queued jobs stay in the journal and run after the next start."""
        with self._lock:
            self._drain_deadline = self.clock() + drain_timeout_s
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=drain_timeout_s + 5.0)
        if self._thread is not None and self._thread.is_alive():
            log.error("broker loop did not stop in time; leaving its sockets to process exit")
        elif self._ctx is not None:
            self._stop_curve_auth()
            self._ctx.term()
            self._ctx = None

    def is_running(self) -> bool:
        """True while the loop thread runs (started and not stopped or crashed)."""
        return self._thread is not None and self._thread.is_alive()

    def _bind_local_frontend(self, endpoint: str) -> None:
        """A plain (NULL-security) client ROUTER beside a CURVE frontend, for tools on this
        machine; refused unless it is loopback, so it never opens the broker to the network."""
        if not is_loopback_endpoint(endpoint):
            raise ValueError(f"--local-frontend {endpoint} is not a loopback endpoint "
                             "(use ipc://, inproc:// or tcp://127.0.0.1:PORT)")
        self.local_frontend = self._ctx.socket(zmq.ROUTER)
        self.local_frontend.setsockopt(zmq.LINGER, 0)
        self.local_frontend.setsockopt(zmq.MAXMSGSIZE, int(self.config.max_message_mb) * 2**20)
        self.local_frontend.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.local_frontend.bind(endpoint)
        self.local_frontend_endpoint = self.local_frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("local frontend (no CURVE, loopback only) on %s", self.local_frontend_endpoint)

    # --- CURVE (runtime.curve): same security on both sockets -----------------------------------
    def _start_curve_auth(self) -> None:
        self._curve_auth = None
        if self.config.curve_allowed_keys and not self.config.curve_secret_key:
            raise ValueError("curve_allowed_keys needs curve_secret_key (the broker's key pair)")
        if not self.config.curve_secret_key:
            return
        from runtime import curve
        curve.load_secret_pair(self.config.curve_secret_key)   # fail early on a bad file
        if self.config.curve_allowed_keys:
            self._curve_auth = curve.start_authenticator(self._ctx, self.config.curve_allowed_keys,
                                                         tuple(self.config.curve_extra_keys))
        else:
            log.warning("CURVE without --curve-allowed-keys: traffic is encrypted but any "
                        "peer that knows the broker's public key may connect")

    def _secure(self, sock: zmq.Socket) -> None:
        if self.config.curve_secret_key:
            from runtime import curve
            curve.make_curve_server(sock, self.config.curve_secret_key)

    def _stop_curve_auth(self) -> None:
        auth, self._curve_auth = getattr(self, "_curve_auth", None), None
        if auth is not None:
            auth.stop()

    def status(self) -> dict:
        """The status_response `data`: broker counters and one row per worker. Thread-safe."""
        with self._lock:
            now = self.clock()
            return {
                "broker": {
                    "uptime_s": round(now - self._started_at, 3),
                    "queue_depth": len(self.queue),
                    "queue_depth_by_priority": self.queue.depth_by_priority(),
                    "inflight": sum(1 for j in self.jobs.values() if j.state == RUNNING),
                    "completed": self.counters["completed"],
                    "failed": self.counters["failed"],
                    "accepted": self.counters["accepted"],
                    "routing": self.config.routing,
                    "max_queue": self.config.max_queue,
                },
                "workers": [w.status_row(now) for w in self.registry.all()],
            }

    # --- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        # Two pollers: with nothing queued or running, worker messages are heartbeats (and
        # READY / DISCONNECT) that need no millisecond answer, so the backend is read in a batch
        # every _IDLE_BACKEND_BATCH_S instead of one wake-up per heartbeat (1,000 workers: a
        # thousand wake-ups a second, each costing ~100 us of CPU mostly in cold caches). Any
        # job or management op in flight makes the backend polled at once again.
        poll_all, poll_clients = zmq.Poller(), zmq.Poller()
        for poller in (poll_all, poll_clients):
            poller.register(self.frontend, zmq.POLLIN)
            if self.local_frontend is not None:
                poller.register(self.local_frontend, zmq.POLLIN)
        poll_all.register(self.backend, zmq.POLLIN)
        interval_s = self.config.heartbeat_interval_s
        next_heartbeat = self.clock() + interval_s
        next_expire = self.clock() + _JOURNAL_EXPIRE_EVERY_S
        next_idle_batch = time.monotonic()   # real time: an I/O pace, not broker logic
        try:
            while True:
                now = self.clock()
                wait_s = min(next_heartbeat - now, 0.05)
                if self._deadlines:
                    wait_s = min(wait_s, self._deadlines[0][0] - now)
                poller = poll_all
                if not (self.jobs or self.manage_ops):   # idle: the backend has its turn
                    until_batch_s = next_idle_batch - time.monotonic()
                    if until_batch_s > 0:
                        poller, wait_s = poll_clients, min(wait_s, until_batch_s)
                    else:   # this poll includes the backend (and waits for it if it is quiet)
                        next_idle_batch = time.monotonic() + _IDLE_BACKEND_BATCH_S
                # whole milliseconds, rounded up: pyzmq truncates, and 0 would spin until the time
                events = dict(poller.poll(math.ceil(max(wait_s, 0.0) * 1000)))
                with self._lock:
                    if self.backend in events:
                        self._drain(self.backend, self._on_backend, copy=True)
                    if self.frontend in events:
                        # Frames (copy=False): a REQ peer is told by the frame's Socket-Type
                        self._drain(self.frontend, self._on_frontend, copy=False)
                    if self.local_frontend is not None and self.local_frontend in events:
                        self._drain(self.local_frontend, self._on_local_frontend, copy=False)
                    now = self.clock()
                    try:
                        if now >= next_heartbeat:
                            next_heartbeat = now + interval_s
                            self._check_liveness()
                        if self._deadlines and self._deadlines[0][0] <= now:
                            self._expire_deadlines(now)
                        if self.manage_ops:
                            management.expire(self, now)
                        if now >= next_expire:
                            next_expire = now + _JOURNAL_EXPIRE_EVERY_S
                            self.journal.expire()
                        if self._dirty:
                            self._dirty = False
                            self._dispatch()
                    except zmq.ContextTerminated:
                        raise
                    except Exception:  # a bug in one timer must not stop the broker
                        log.exception("error in the broker's timers or dispatch; continuing")
                    if self._stopping.is_set() and self._drained(now):
                        break
        except zmq.ContextTerminated:
            pass
        except Exception:
            log.exception("broker loop crashed")
            raise
        finally:
            self._answer_unfinished_on_stop()
            self.frontend.close(linger=500)   # let the last replies leave; bounded wait
            if self.local_frontend is not None:
                self.local_frontend.close(linger=500)
            self.backend.close(linger=0)
            if self.journal is not None:
                self.journal.close()
            log.info("broker stopped")

    def _answer_unfinished_on_stop(self) -> None:
        """Without a journal on disk, jobs still open at stop would be lost silently: fail them.
        With one, they stay journaled and run after the next start (a resend gets the result)."""
        with self._lock:
            for op in list(self.manage_ops.values()):   # management requests are never journaled
                for worker_id in op.waiting:
                    op.failures[worker_id] = "the broker stopped before the worker answered"
                op.waiting.clear()
                management.complete(self, op, C.INTERNAL_ERROR)
        if self.config.state_dir or self.journal is None:
            return
        with self._lock:
            for state in list(self.jobs.values()):
                self.abort(state, "cancelled")
                self._finish(state, error_reply(state.reply_type, state.request_id, ProtocolError(
                    C.INTERNAL_ERROR, "the broker stopped before the job finished (no --state-dir "
                                      "journal to resume it)"), warnings=state.warnings))

    def _drained(self, now: float) -> bool:
        running = any(j.state == RUNNING for j in self.jobs.values())
        return not running or (self._drain_deadline is not None and now >= self._drain_deadline)

    def _drain(self, sock: zmq.Socket, handler, copy: bool) -> None:
        # ask EVENTS instead of reading until zmq.Again: an exception per wake-up costs more
        # than the rest of handling a heartbeat (measured with 1,000 workers)
        for index in range(_BATCH):
            # the poller said readable, so the first read needs no check
            if index and not sock.getsockopt(_EVENTS) & _POLLIN:
                return
            try:
                frames = _recv_message(sock, copy)
            except zmq.Again:
                return
            try:
                handler(frames)
            except Exception:  # one bad message must never stop the broker
                log.exception("error handling a message; continuing")

    # --- frontend ------------------------------------------------------------------------------
    def _on_local_frontend(self, frames: list) -> None:
        self._on_frontend(frames, local=True)

    def _on_frontend(self, frames: list, local: bool = False) -> None:
        identity = frames[0].bytes
        if len(frames) >= 3 and len(frames[1]) == 0:
            envelope, parts = (identity, b""), frames[2:]
        else:
            envelope, parts = (identity,), frames[1:]
        body = parts[-1].bytes if parts else b""
        request_codec = codec.sniff(body) or C.CODEC_JSON
        peer = Peer(envelope, request_codec, is_req=False, local=local)
        parse = _parser()
        if len(parts) != 1:
            self.counters["malformed"] += 1
            self._send_error(peer, _FALLBACK_REPLY_TYPE, None, ProtocolError(
                C.MALFORMED_MESSAGE, f"expected one body frame, got {len(parts)}"))
            return
        decoded = None
        try:
            decoded, request_codec = codec.decode(body)
            peer.codec = request_codec
            parsed = parse.parse_request(decoded, default_model_base=self.config.default_model_base,
                                         allow_pickle=self.config.allow_pickle)
        except ProtocolError as exc:
            if exc.code == C.MALFORMED_MESSAGE:
                self.counters["malformed"] += 1
            reply_type, request_id = parse.peek(decoded)
            self._send_error(peer, reply_type or _FALLBACK_REPLY_TYPE, request_id, exc)
            return
        if parsed.job is not None:
            if parsed.job.stream:
                peer.is_req = _is_req_peer(parts[-1])
            self._on_generate(peer, body, decoded, parsed)
        else:
            management.handle(self, peer, parsed)

    def _on_generate(self, peer: Peer, body: bytes, decoded: dict, parsed) -> None:
        job: Job = parsed.job
        rid = parsed.request_id or job.request_id
        fingerprint = _parser().body_fingerprint(decoded)
        active = self.jobs.get(rid)
        if active is not None:
            if active.fingerprint != fingerprint:
                self._send_duplicate(peer, parsed.reply_type, rid)
                return
            active.attach(peer)
            log.info("request %s resent while %s: attached", rid, active.state)
            if job.stream and not peer.is_req:
                # answered at once, so a client checking on a quiet job (a long model load, a
                # long queue) hears the broker is alive and never has to warn
                if active.state == QUEUED or active.last_progress is None:
                    stage = "queued" if active.state == QUEUED else "loading"
                    self._send_to(peer, progress_message(rid, stage, queue_position=self.queue.position(rid),
                                                         worker_id=active.worker_id))
                else:
                    self._send_to(peer, active.last_progress)
            return
        stored = self.journal.stored_reply(rid)
        if stored is not None:
            if stored.fingerprint != fingerprint:
                self._send_duplicate(peer, parsed.reply_type, rid)
            else:
                log.info("request %s resent after it finished: stored reply", rid)
                self._send_to(peer, stored.reply)
            return
        if self._stopping.is_set():
            self._send_error(peer, parsed.reply_type, rid, ProtocolError(
                C.INTERNAL_ERROR, "broker is shutting down; not accepting new jobs"))
            return
        if len(self.queue) >= self.config.max_queue:
            self._send_error(peer, parsed.reply_type, rid, ProtocolError(
                C.QUEUE_FULL, f"queue is full ({self.config.max_queue} jobs waiting); retry later"))
            return
        now = self.clock()
        state = JobState(request_id=rid, job=job, reply_type=parsed.reply_type,
                         fingerprint=fingerprint, accepted_at=now, deadline=now + job.timeout_s,
                         peers=[peer], warnings=list(parsed.warnings or []))
        self.journal.accept(rid, body, fingerprint)
        self._enqueue(state)
        self.counters["accepted"] += 1
        if state.wants_progress:
            self._progress(state, "queued", queue_position=self.queue.position(rid))

    def _enqueue(self, state: JobState, front: bool = False) -> None:
        self.jobs[state.request_id] = state
        state.state, state.worker_id, state.last_progress = QUEUED, None, None
        if front:
            self.queue.push_front(state.request_id, state.job.priority, None)
        else:
            self.queue.push(state.request_id, state.job.priority, None, force=True)
        if len(self._deadlines) > 4 * len(self.jobs) + 1024:
            # finished jobs leave their entries behind until their deadline; drop them
            self._deadlines = [(d, rid) for d, rid in self._deadlines
                               if rid in self.jobs and self.jobs[rid].deadline == d]
            heapq.heapify(self._deadlines)
        heapq.heappush(self._deadlines, (state.deadline, state.request_id))
        self._dirty = True

    # --- dispatch ------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        if not len(self.queue):
            return
        live = self.registry.live()
        if not any(len(w.jobs) < W.MAX_JOBS_PER_WORKER for w in live):
            return
        window = [self.jobs[rid] for rid, _ in self.queue.head(_DISPATCH_LOOKAHEAD)]
        needs = [self._needs(state) for state in window]
        waiting = len(self.queue)
        # models the jobs about to be considered need: smart routing avoids evicting them
        wanted = frozenset(m for n in needs for m in n.models)
        for state, job_needs in zip(window, needs):
            rid = state.request_id
            worker = routing.choose_worker(state.job, live, self.config.routing, self.rr,
                                           waiting=waiting, wanted=wanted, live_count=len(live),
                                           needs=job_needs)
            if worker is None:
                continue
            self.queue.remove(rid)
            waiting -= 1
            state.state, state.worker_id = RUNNING, worker.worker_id
            state.attempt += 1
            state.dispatch_id = next(self._dispatch_ids)
            state.dispatched_at = self.clock()
            # what routing counts as this worker's backlog until the job is answered
            worker.estimates = {r: e for r, e in worker.estimates.items() if r in worker.jobs}
            worker.estimates[rid] = routing.dispatch_estimate(state.job, worker, job_needs)
            worker.jobs[rid] = state.dispatch_id
            if state.wire is None:
                state.wire = state.job.to_wire()
            self.backend.send(worker.identity, _SNDMORE)
            self.backend.send(W.encode(W.RunJob(request_id=rid, attempt=state.attempt,
                                                dispatch_id=state.dispatch_id, job=state.wire)))
            log.debug("job %s -> worker %s (attempt %d)", rid, worker.worker_id, state.attempt)
            if not any(len(w.jobs) < W.MAX_JOBS_PER_WORKER for w in live):
                return

    def _needs(self, state: JobState) -> routing.JobNeeds:
        """The job's routing needs, computed once per job (again only when a worker reports a
        model size that changes its memory estimate)."""
        version = self.registry.model_sizes_version
        if state.needs is None or state.needs_sizes_version != version:
            state.needs = routing.JobNeeds.of(state.job, self.registry.model_sizes)
            state.needs_sizes_version = version
        return state.needs

    # --- timeouts and cancel ----------------------------------------------------------------------
    def _expire_deadlines(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, rid = heapq.heappop(self._deadlines)
            state = self.jobs.get(rid)
            if state is None or state.deadline != deadline:
                continue
            if state.state == QUEUED:
                reason = routing.unroutable_reason(state.job, self.registry.live())
                why = (f"no worker can run it: {reason}" if reason
                       else f"still queued (position {self.queue.position(rid)})")
            else:
                why = f"running on worker {state.worker_id}"
            self.abort(state, "timeout")
            self._finish(state, error_reply(state.reply_type, rid, ProtocolError(
                C.TIMEOUT, f"timed out after {state.job.timeout_s:g} s, {why}"),
                warnings=state.warnings, execution_time=now - state.accepted_at))

    def abort(self, state: JobState, reason: str) -> None:
        """Take a job off the queue, or tell its worker to stop it (it is then forgotten)."""
        if state.state == QUEUED:
            self.queue.remove(state.request_id)
            return
        worker = self.registry.get(state.worker_id or "")
        if worker is not None:
            worker.jobs.pop(state.request_id, None)
            if not worker.lost:
                self.backend.send_multipart([worker.identity, W.encode(W.AbortJob(
                    request_id=state.request_id, dispatch_id=state.dispatch_id, reason=reason))])
        self._dirty = True

    # --- replies ----------------------------------------------------------------------------------
    def _finish(self, state: JobState, reply: dict) -> None:
        """The one final reply: to every attached peer once, into the journal, job forgotten."""
        if self.jobs.pop(state.request_id, None) is None:
            return
        self.queue.remove(state.request_id)
        self.counters["completed" if reply.get("success") else "failed"] += 1
        job_log.log_finished(state, reply, now=self.clock())
        self.metrics.job_finished(reply, total_s=self.clock() - state.accepted_at,
                                  queue_s=state.dispatched_at - state.accepted_at if state.attempt else None,
                                  steps=state.job.steps)
        for peer in state.peers:
            self._send_to(peer, reply)
        codec_name = state.peers[0].codec if state.peers else C.CODEC_JSON
        self.journal.finish(state.request_id, state.fingerprint, codec_name, reply)
        self._dirty = True

    def finish(self, state: JobState, reply: dict) -> None:
        self._finish(state, reply)

    def _progress(self, state: JobState, stage: str, **fields) -> None:
        if stage not in C.STAGES:
            return
        message = progress_message(state.request_id, stage, **fields)
        state.last_progress = message
        for peer in state.peers:
            if not peer.is_req:
                self._send_to(peer, message)

    def _send_duplicate(self, peer: Peer, reply_type: str, rid: str) -> None:
        self._send_error(peer, reply_type, rid, ProtocolError(
            C.DUPLICATE_REQUEST_ID, f"request_id {rid!r} is already used by a different request"))

    def _send_error(self, peer: Peer, reply_type: str, rid, exc: ProtocolError) -> None:
        self.metrics.request_rejected(exc.code)   # every caller refuses a request outright
        self._send_to(peer, error_reply(reply_type, rid, exc))

    def send_to(self, peer: Peer, message: dict) -> None:
        self._send_to(peer, message)

    def _send_to(self, peer: Peer, message: dict) -> None:
        try:
            body = codec.encode(message, peer.codec)
        except Exception as exc:  # an unencodable reply becomes an internal_error, not a crash
            log.exception("cannot encode reply")
            body = codec.encode(final_reply(message.get("message_type") or _FALLBACK_REPLY_TYPE,
                                            message.get("request_id"), success=False,
                                            error=f"reply could not be encoded: {exc}",
                                            error_code=C.INTERNAL_ERROR), C.CODEC_JSON)
        try:
            sock = self.local_frontend if peer.local else self.frontend
            for frame in peer.envelope:   # send_multipart's flag arithmetic, without enums
                sock.send(frame, _SNDMORE_NOBLOCK)
            sock.send(body, _NOBLOCK)
        except zmq.Again:
            log.warning("client %s is not reading; reply dropped", peer.envelope[0].hex())

    # --- journal restore ----------------------------------------------------------------------------
    def _restore_from_journal(self) -> None:
        pending = self.journal.pending()
        if not pending:
            return
        parse = _parser()
        now, wall = self.clock(), time.time()
        for row in pending:
            try:
                parsed = parse.parse_request(codec.decode(row.body)[0], default_model_base=self.config.default_model_base,
                                             allow_pickle=self.config.allow_pickle)
            except ProtocolError as exc:
                log.error("journal: job %s no longer parses (%s); dropping it", row.request_id, exc)
                continue
            if parsed.job is None:
                continue
            age_s = max(wall - row.accepted_at, 0.0)
            state = JobState(request_id=row.request_id, job=parsed.job, reply_type=parsed.reply_type,
                             fingerprint=row.fingerprint, accepted_at=now - age_s,
                             deadline=now - age_s + parsed.job.timeout_s,
                             warnings=list(parsed.warnings or []))
            self._enqueue(state)
        log.info("journal: re-queued %d unfinished job(s) from before the restart", len(pending))


def _recv_message(sock: zmq.Socket, copy: bool) -> list:
    """One whole message, as recv_multipart(NOBLOCK) gives it, about 2 us faster a message:
    a Frame's `more` instead of a getsockopt(RCVMORE) per frame."""
    frame = sock.recv(_NOBLOCK, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(_NOBLOCK, copy=False)
        frames.append(frame)
    return [f.bytes for f in frames] if copy else frames


def _is_req_peer(frame) -> bool:
    """True when the peer announced ZMTP Socket-Type REQ (ipc/tcp; inproc has no metadata)."""
    try:
        return frame.get("Socket-Type") == "REQ"
    except (zmq.ZMQError, AttributeError):
        return False


def is_loopback_endpoint(endpoint: str) -> bool:
    """ipc:// and inproc:// are local by nature; tcp:// only on a loopback address."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
