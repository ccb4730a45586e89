"""BrokerCore: all of the broker's state and every handler, without sockets, threads or clock.

Each entry point takes one decoded input and the time, changes the state, and returns what to
send as a list of outputs (ToClient: a reply dict for a client peer; ToWorkers: one worker
message for one or more worker identities). broker/server.py's loop owns the ROUTER sockets:
it decodes what arrives, calls the core, sends what comes back, and calls tick() for timers.
bench/replay.py drives the same core in simulated time.

State: accepted jobs not yet finished (`jobs`, broker.jobs.JobState), the queue
(broker.job_queue), the worker registry (broker.registry: records are changed only through its
methods), the journal (broker.journal), management operations waiting for workers
(broker.management.PendingOps). Every accepted request gets exactly one final reply per peer.

Entry points (each returns the outputs):
    open(journal, now, wall_now)              start with this journal; re-queue its pending jobs
    on_client(request, now)                   a frontend message (generation or management)
    on_decoded_client(request, decoded, now)  the same, its body decoded off the loop
    on_worker(identity, message, now)         a decoded backend message (worker_protocol)
    on_bad_worker_frame(identity, error, now) a backend frame that did not decode
    tick(now)                                 timers (heartbeats + liveness, job deadlines,
                                              management timeouts, journal expiry) and dispatch
    close(now)                                the broker stops: answer what cannot survive it
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Union

from protocol import codec
from protocol import constants as C
from protocol import rule_texts as R
from protocol import worker_protocol as W
from protocol.errors import FieldError, ProtocolError, worker_field_errors
from protocol.job import Job
from protocol.replies import error_reply, final_reply, progress_message

from broker import access, job_log, listings, management, routing, watchdog
from broker.access import LOCAL_PEER, PeerFacts
from broker.bad_frames import BadFrames
from broker.client_decode import FALLBACK_REPLY_TYPE, DecodedBody, decode_body, request_parser
from broker.eta import queued_eta_s
from broker.job_queue import JobQueue
from broker.journal import JournalError, UnstoredReplies
from broker.jobs import QUEUED, RUNNING, JobState, Peer
from broker.metrics import BrokerMetrics
from broker.registry import WorkerRecord, WorkerRegistry

log = logging.getLogger("broker.server")   # the broker's log lines keep their logger name

# queued jobs the dispatcher looks at per pass (in serving order): a job waiting for its best
# worker does not block the ones behind it, but a pass stays bounded with a long queue
DISPATCH_LOOKAHEAD = 64
JOURNAL_EXPIRE_EVERY_S = 60.0
STORE_RETRY_EVERY_S = 2.0   # a reply the journal could not store is tried again this often
FORBIDDEN_LOG_EVERY_S = 10.0   # refusals of what a peer may not do: one log line per this


@dataclass
class BrokerConfig:
    frontend: str = "tcp://127.0.0.1:5555"
    backend: str = "tcp://127.0.0.1:5556"
    state_dir: str | None = None       # SQLite journal lives here; None -> in-memory journal
    journal_reserve_mb: float = 16.0   # disk set aside beside it for replies when the disk fills
    max_queue: int = 1000
    max_queue_mb: float = 2048.0       # request bytes queued jobs may hold; beyond: queue_full
    max_timeout_s: float = 3600.0      # a request's timeout above this is lowered to it (warned)
    max_attempts: int = 2
    heartbeat_interval_s: float = 1.0
    heartbeat_liveness: int = 3
    routing: str = "smart"             # smart | round-robin | least-loaded | tiered
    max_message_mb: int = C.DEFAULT_MAX_MESSAGE_MB
    default_model_base: str | None = None
    allow_pickle: bool = False
    reply_ttl_s: float = 3600.0
    curve_secret_key: str | None = None    # broker's .key_secret file: CURVE on both sockets
    curve_allowed_keys: str | None = None  # dir of the public .key files of allowed clients
    curve_worker_keys: str | None = None   # dir of the public .key files of allowed workers
    curve_admin_keys: str | None = None    # dir of client keys that may manage and cancel any job
    curve_local_worker_keys: tuple = ()    # public .key files of serve's own workers (backend)
    # without CURVE: every peer is an admin (manages workers), not only the ones on this
    # machine (broker.access); no effect on a CURVE socket
    allow_remote_management: bool = False
    # without CURVE: an admin peer (see above) may also cancel any job, not only its own;
    # off, only the owner, an admin key or the local frontend may (the contract's rule)
    allow_local_cancel: bool = False
    local_frontend: str | None = None      # a second, NULL-security client endpoint (loopback only)
    # jobs one worker may hold (one running + one prefetched); bench/replay.py varies it
    max_jobs_per_worker: int = W.MAX_JOBS_PER_WORKER
    # a job waits this long for a first worker when none is registered (a pool starting up, a
    # broker restarted before its workers), then fails unsupported_feature; with workers
    # registered, a job none of them can ever run fails at once
    no_worker_grace_s: float = 60.0
    queue_position_interval_s: float = 1.0  # queue_position updates: at most one per this
    # a worker holding jobs without progress this long: its jobs are aborted there and re-run
    # elsewhere, and it is unhealthy until it finishes one (broker/watchdog.py); 0: off
    stuck_job_s: float = watchdog.DEFAULT_STUCK_JOB_S
    # bodies over broker.decode_stage.INLINE_DECODE_MAX_BYTES are decoded, validated and
    # fingerprinted in this many processes off the loop (0: on the loop, as small ones are)
    decode_processes: int = 1
    decode_backlog_mb: int = 512   # undecoded big bodies held; beyond it, queue_full


# --- what goes in and out ------------------------------------------------------------------------
def _not_req() -> bool:
    return False


@dataclass(slots=True)
class ClientRequest:
    """One frontend message as the loop read it."""
    envelope: tuple[bytes, ...]        # (identity,) or (identity, b"") as the request came
    body: bytes                        # the last frame (a memoryview of it when big)
    body_frames: int = 1               # frames after the envelope (exactly 1 is valid)
    local: bool = False                # came in on the local (NULL-security) frontend
    # whether the peer is a REQ socket (asked only for streaming jobs: it costs a metadata call)
    is_req_peer: Callable[[], bool] = _not_req
    peer_facts: PeerFacts = LOCAL_PEER  # its CURVE key and address: who owns, who may manage


@dataclass(slots=True)
class ToClient:
    peer: Peer
    message: dict                      # encoded by the loop in the peer's codec


@dataclass(slots=True)
class ToWorkers:
    identities: list[bytes]            # ROUTER identities of the workers' DEALERs
    message: W.Message                 # encoded once by the loop, sent to each


Output = Union[ToClient, ToWorkers]

def _mb(size_bytes: float) -> str:
    return f"{size_bytes / 2**20:.1f}"


class BrokerCore:
    def __init__(self, config: BrokerConfig, now: float, metrics: BrokerMetrics | None = None,
                 first_dispatch_id: int | None = None):
        if config.routing not in routing.POLICIES:
            raise ValueError(f"unknown routing policy {config.routing!r}; one of {routing.POLICIES}")
        for name in ("max_queue_mb", "max_timeout_s"):
            if not getattr(config, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be above 0, "
                                 f"not {getattr(config, name)!r}")
        if config.stuck_job_s < 0 or 0 < config.stuck_job_s < 2 * config.heartbeat_interval_s:
            raise ValueError(f"--stuck-job-s must be 0 (off) or at least two heartbeat intervals "
                             f"({2 * config.heartbeat_interval_s:g} s), not {config.stuck_job_s!r}")
        self.config = config
        self.metrics = metrics or BrokerMetrics()
        self._now = now
        # the registry reads the time of the input being handled
        self.registry = WorkerRegistry(config.heartbeat_interval_s, config.heartbeat_liveness,
                                       clock=lambda: self._now)
        self.queue = JobQueue()   # its size limit is checked here, at acceptance
        self.jobs: dict[str, JobState] = {}     # accepted, not finished
        self.journal = None                     # set by open()
        self._unstored = UnstoredReplies()      # final replies the journal failed to store
        self._next_store_retry = now
        self._bad_frames = BadFrames()
        # answers for jobs a worker no longer runs: a rogue worker forges thousands; one log
        # line per connection per window, the rest only counted (never a disconnect: a slow
        # real worker sends these after a re-queue too)
        self._discarded_answers = BadFrames(limit=2**62)
        self.counters = {"completed": 0, "failed": 0, "accepted": 0, "malformed": 0}
        self._ops = management.PendingOps()
        self._rr = routing.RoundRobin()
        self._deadlines: list[tuple[float, str]] = []   # heap of (deadline, request_id)
        self._dirty = False      # something changed that may let a queued job dispatch
        self._pool_changed = False   # a worker came or went: re-check what queued jobs can run
        self._pool_empty_since = now   # when the last live worker went (or the broker started)
        self._positions_changed = False  # the queue moved: queue_position updates may be due
        self._next_position_update = now
        self._out: list[Output] = []
        self._next_forbidden_log = now
        self._started_at = now
        self._stopping = False
        self._drain_deadline: float | None = None
        self._next_heartbeat = now + config.heartbeat_interval_s
        self._next_journal_expire = now + JOURNAL_EXPIRE_EVERY_S
        # unique across broker restarts, so a worker's answer to a dispatch of the previous
        # broker process is never mistaken for one of this process
        self._dispatch_ids: Iterator[int] = itertools.count(
            time.time_ns() if first_dispatch_id is None else first_dispatch_id)
        # message type -> handler(worker record, message), for registered workers (READY is
        # handled before the sender is looked up)
        self._worker_handlers: dict[type, Callable] = {
            W.WorkerHeartbeat: self._on_heartbeat, W.JobProgress: self._on_progress,
            W.JobResult: self._on_job_done, W.JobFailed: self._on_job_done,
            W.ManageReply: self._on_manage_reply, W.Disconnect: self._on_disconnect}
        # management message_type -> handler(peer, parsed)
        self._manage_handlers: dict[str, Callable] = {
            C.STATUS: self._on_status, C.STATUS_LEGACY: self._on_status,
            C.INITIALIZE: self._on_initialize, C.MODEL_LOAD: self._on_model_load,
            C.MODEL_LOAD_LEGACY: self._on_model_load, C.CLEANUP: self._on_cleanup,
            C.CANCEL: self._on_cancel, C.LIST_MODELS: self._on_list_models,
            C.LIST_QUEUE: self._on_list_queue, C.LIST_HISTORY: self._on_list_history}

    # --- entry points --------------------------------------------------------------------------
    def open(self, journal, now: float, wall_now: float) -> list[Output]:
        """Start with `journal`: re-queue the jobs it holds from before a restart."""
        self.journal = journal
        self._started_at = now
        self._next_heartbeat = now + self.config.heartbeat_interval_s
        self._next_journal_expire = now + JOURNAL_EXPIRE_EVERY_S
        return self._handle(now, self._restore_from_journal, wall_now)

    def on_client(self, request: ClientRequest, now: float) -> list[Output]:
        """A client message; its body is decoded here (the loop does so for small bodies)."""
        return self._handle(now, self._on_client, request)

    def on_decoded_client(self, request: ClientRequest, decoded: DecodedBody,
                          now: float) -> list[Output]:
        """A client message whose body was already decoded off the loop (broker.decode_stage)."""
        return self._handle(now, self._on_client, request, decoded)

    def on_worker(self, identity: bytes, message: W.FromWorker, now: float) -> list[Output]:
        return self._handle(now, self._on_worker, identity, message)

    def on_bad_worker_frame(self, identity: bytes, error: W.WorkerProtocolError,
                            now: float) -> list[Output]:
        if isinstance(error, W.WorkerVersionError) and error.kind == W.READY:
            return self._handle(now, self._refuse_version, identity, error.worker_id, error.version)
        return self._handle(now, self._on_bad_worker_frame, identity, error)

    def tick(self, now: float) -> list[Output]:
        """Fire what is due: heartbeats and liveness, job deadlines, management timeouts,
        journal expiry; then dispatch if anything changed."""
        return self._handle(now, self._tick, now)

    def close(self, now: float) -> list[Output]:
        """The broker stops: answer pending management requests; without a journal on disk,
        fail the open jobs (they would be lost silently); with one they run after the next start."""
        return self._handle(now, self._answer_unfinished_on_stop)

    def stop_accepting(self, drain_deadline: float) -> None:
        """No new jobs from now on; running ones get until `drain_deadline`."""
        self._stopping = True
        self._drain_deadline = drain_deadline

    def drained(self, now: float) -> bool:
        """Nothing is running any more, or the drain time is over."""
        running = any(j.state == RUNNING for j in self.jobs.values())
        return not running or (self._drain_deadline is not None and now >= self._drain_deadline)

    @property
    def busy(self) -> bool:
        """A job or a management operation is in flight (worker messages need prompt reading)."""
        return bool(self.jobs) or bool(self._ops)

    def liveness_due(self, now: float) -> bool:
        """The next tick judges liveness: the loop first reads every queued worker message."""
        return now >= self._next_heartbeat

    def seconds_to_next_timer(self, now: float) -> float:
        wait_s = self._next_heartbeat - now
        if self._deadlines:
            wait_s = min(wait_s, self._deadlines[0][0] - now)
        return wait_s

    def status(self, now: float) -> dict:
        """The status_response `data`: broker counters and one row per worker."""
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
                "queue_bytes": self.queue.bytes_held,
                "max_queue_mb": self.config.max_queue_mb,
                "unstored_replies": len(self._unstored),
            },
            "workers": [w.status_row(now) for w in self.registry.all()],
        }

    def _handle(self, now: float, handler, *args) -> list[Output]:
        """Run one handler at `now`; a bug in it is logged and never stops the broker; what it
        queued to send before failing is still sent."""
        self._now = now
        try:
            handler(*args)
        except Exception:
            log.exception("error in %s; continuing", getattr(handler, "__name__", handler))
        out, self._out = self._out, []
        return out

    # --- output helpers ------------------------------------------------------------------------
    def _send_to(self, peer: Peer, message: dict) -> None:
        self._out.append(ToClient(peer, message))

    def _send_to_workers(self, workers: list[WorkerRecord], message: W.Message) -> None:
        self._out.append(ToWorkers([w.identity for w in workers], message))

    def _send_error(self, peer: Peer, reply_type: str, rid, exc: ProtocolError) -> None:
        self.metrics.request_rejected(exc.code)   # every caller refuses a request outright
        self._send_to(peer, error_reply(reply_type, rid, exc))

    def _send_duplicate(self, peer: Peer, reply_type: str, rid: str) -> None:
        self._send_error(peer, reply_type, rid, ProtocolError(
            C.DUPLICATE_REQUEST_ID, f"request_id {rid!r} is already used by a different request"))

    # --- clients ---------------------------------------------------------------------------------
    def _on_client(self, request: ClientRequest, decoded: DecodedBody | None = None) -> None:
        if decoded is None:   # a small body: decoded here, on the loop (big ones arrive decoded)
            decoded = decode_body(request.body, request.body_frames,
                                  default_model_base=self.config.default_model_base,
                                  allow_pickle=self.config.allow_pickle)
        peer = Peer(request.envelope, decoded.codec, local=request.local,
                    facts=request.peer_facts)
        if decoded.error is not None:
            if decoded.error.code == C.MALFORMED_MESSAGE:
                self.counters["malformed"] += 1
            self._send_error(peer, decoded.reply_type, decoded.request_id, decoded.error)
            return
        parsed = decoded.parsed
        if parsed.job is not None:
            # this peer's own request decides whether it gets progress, not the job's first peer
            peer.streams = parsed.job.stream and not request.is_req_peer()
            self._on_generate(peer, request.body, decoded.fingerprint, parsed,
                              journal_body=decoded.journal_body)
            return
        handler = self._manage_handlers.get(parsed.message_type)
        if handler is None:
            self._send_to(peer, error_reply(parsed.reply_type or FALLBACK_REPLY_TYPE, parsed.request_id,
                                            ProtocolError(C.UNKNOWN_MESSAGE_TYPE,
                                                          f"unknown message type {parsed.message_type!r}")))
            return
        if (parsed.message_type in access.MANAGEMENT_TYPES
                and not access.may_manage(peer.facts, self.config.allow_remote_management)):
            self._refuse_management(peer, parsed)
            return
        handler(peer, parsed)

    def _on_generate(self, peer: Peer, body: bytes, fingerprint: str, parsed,
                     journal_body: bytes | None = None) -> None:
        job: Job = parsed.job
        rid = parsed.request_id   # decided by protocol.parse (== job.request_id)
        active = self.jobs.get(rid)
        if active is not None:
            if active.fingerprint != fingerprint:
                self._send_duplicate(peer, parsed.reply_type, rid)
                return
            active.attach(peer)
            if active.owner is None:   # restored from the journal: its first resender owns it
                active.owner = peer.owner
            log.info("request %s resent while %s: attached", rid, active.state)
            if peer.streams:
                # answered at once, so a client checking on a quiet job (a long model load, a
                # long queue) hears the broker is alive and never has to warn
                if active.state == QUEUED or active.last_progress is None:
                    stage = "queued" if active.state == QUEUED else "loading"
                    self._send_to(peer, progress_message(rid, stage, queue_position=self.queue.position(rid),
                                                         worker_id=active.worker_id))
                else:
                    self._send_to(peer, active.last_progress)
            return
        try:
            stored = self._stored_reply(rid)
        except JournalError as exc:
            self._journal_unavailable(peer, parsed.reply_type, rid, "read", exc)
            return
        if stored is not None:
            if stored.fingerprint != fingerprint:
                self._send_duplicate(peer, parsed.reply_type, rid)
            else:
                log.info("request %s resent after it finished: stored reply", rid)
                self._send_to(peer, stored.reply)
            return
        if self._stopping:
            self._send_error(peer, parsed.reply_type, rid, ProtocolError(
                C.INTERNAL_ERROR, "broker is shutting down; not accepting new jobs"))
            return
        refusal = self._queue_refusal(len(body))
        if refusal is not None:
            self._send_error(peer, parsed.reply_type, rid, refusal)
            return
        now = self._now
        warnings = list(parsed.warnings or [])
        job = self._bounded_timeout(job, warnings)
        state = JobState(request_id=rid, job=job, reply_type=parsed.reply_type,
                         fingerprint=fingerprint, accepted_at=now, deadline=now + job.timeout_s,
                         body_bytes=len(body), peers=[peer], warnings=warnings, owner=peer.owner)
        try:
            # a big body the decode stage wrote to a file: the row holds its reference
            self.journal.accept(rid, journal_body if journal_body is not None else body,
                                fingerprint)
        except JournalError as exc:   # never accepted silently without a journal row
            self._journal_unavailable(peer, parsed.reply_type, rid, "accept", exc)
            return
        self._enqueue(state)
        self.counters["accepted"] += 1
        if self._refuse_if_no_worker_can_run(state):
            return
        if state.wants_progress:
            position = self.queue.position(rid)
            self._progress(state, "queued", queue_position=position,
                           eta_s=queued_eta_s(job, position, self.registry.live()))

    # --- the journal's failures (a full or failing --state-dir disk) ---------------------------
    def _journal_unavailable(self, peer: Peer, reply_type: str, rid: str, operation: str,
                             exc: JournalError) -> None:
        """The request cannot be taken while the journal fails: `unavailable`, nothing queued."""
        self.metrics.journal_error(operation)
        log.error("request %s refused (unavailable): %s", rid, exc)
        self._send_error(peer, reply_type, rid, ProtocolError(
            C.UNAVAILABLE, f"the broker cannot take jobs right now: {exc}. Nothing was queued; "
                           f"send the same request again later"))

    def _stored_reply(self, rid: str):
        """The final reply of a finished job: one the journal could not store yet, else the
        journal's (JournalError when the journal cannot be read)."""
        return self._unstored.get(rid) or self.journal.stored_reply(rid)

    def _store_reply(self, state: JobState, reply: dict) -> None:
        """Into the journal; when it fails, kept in memory and stored again by the timer."""
        codec_name = state.peers[0].codec if state.peers else C.CODEC_JSON
        if not self._unstored:
            try:
                self.journal.finish(state.request_id, state.fingerprint, codec_name, reply)
                return
            except JournalError as exc:
                self.metrics.journal_error("finish")
                log.error("job %s: %s; its reply is kept in memory and stored again every "
                          "%g s (a resend gets it meanwhile)", state.request_id, exc,
                          STORE_RETRY_EVERY_S)
                self._next_store_retry = self._now + STORE_RETRY_EVERY_S
        # behind earlier unstored replies, so they are stored in the order they finished
        self._unstored.keep(state.request_id, state.fingerprint, codec_name, reply)

    def _retry_unstored(self, why: str) -> None:
        try:
            stored = self._unstored.store_into(self.journal)
        except JournalError as exc:
            self.metrics.journal_error("retry")
            if why != "timer":
                log.error("%d final repl(ies) still not stored (%s): %s", len(self._unstored),
                          why, exc)
            return
        if stored:
            log.info("journal: stored %d final repl(ies) kept in memory since the journal failed",
                     stored)

    # --- admission bounds ----------------------------------------------------------------------
    def _queue_refusal(self, body_bytes: int) -> ProtocolError | None:
        """queue_full when a new job of `body_bytes` would pass --max-queue jobs or
        --max-queue-mb of request bytes held by queued jobs (re-queued jobs are never refused)."""
        if len(self.queue) >= self.config.max_queue:
            return ProtocolError(C.QUEUE_FULL, f"queue is full ({self.config.max_queue} jobs "
                                               f"waiting, --max-queue); retry later")
        limit_bytes = self.config.max_queue_mb * 2**20
        if body_bytes > limit_bytes:
            return ProtocolError(C.QUEUE_FULL, f"this request alone holds {_mb(body_bytes)} MB, "
                                               f"more than this broker's --max-queue-mb "
                                               f"{self.config.max_queue_mb:g}: it can never be queued")
        if self.queue.bytes_held + body_bytes > limit_bytes:
            return ProtocolError(C.QUEUE_FULL, f"queue is full: queued jobs hold "
                                               f"{_mb(self.queue.bytes_held)} MB and this request "
                                               f"{_mb(body_bytes)} MB, over --max-queue-mb "
                                               f"{self.config.max_queue_mb:g}; retry later")
        return None

    def _bounded_timeout(self, job: Job, warnings: list[str]) -> Job:
        """The job with its timeout lowered to --max-timeout-s when it asked for more (a warning
        in its reply says so), so unroutable jobs cannot hold queue places for a day."""
        limit_s = self.config.max_timeout_s
        if job.timeout_s <= limit_s:
            return job
        warnings.append(f"timeout {job.timeout_s:g} s is above this broker's limit "
                        f"(--max-timeout-s {limit_s:g}); the job times out after {limit_s:g} s")
        return job.model_copy(update={"timeout_s": limit_s})   # shares the image bytes

    def _enqueue(self, state: JobState, front: bool = False) -> None:
        self.jobs[state.request_id] = state
        state.state, state.worker_id, state.last_progress, state.stage = QUEUED, None, None, None
        state.step = state.total_steps = 0
        if front:
            self.queue.push_front(state.request_id, state.job.priority, None, state.body_bytes)
        else:
            self.queue.push(state.request_id, state.job.priority, None, state.body_bytes)
        if len(self._deadlines) > 4 * len(self.jobs) + 1024:
            # finished jobs leave their entries behind until their deadline; drop them
            self._deadlines = [(d, rid) for d, rid in self._deadlines
                               if rid in self.jobs and self.jobs[rid].deadline == d]
            heapq.heapify(self._deadlines)
        heapq.heappush(self._deadlines, (state.deadline, state.request_id))
        self._dirty = True

    # --- management requests ----------------------------------------------------------------------
    def _on_status(self, peer: Peer, parsed) -> None:
        self._send_to(peer, final_reply(parsed.reply_type, parsed.request_id, success=True,
                                        data=self.status(self._now), warnings=parsed.warnings or ()))

    def _on_initialize(self, peer: Peer, parsed) -> None:
        live = self.registry.live()
        warnings = list(parsed.warnings or [])
        if not live:
            warnings.append("no worker is registered yet")
        self._send_to(peer, final_reply(parsed.reply_type, parsed.request_id, success=True,
                                        data=management.initialize_data(live), warnings=warnings))

    def _refuse_request(self, peer: Peer, parsed, exc: ProtocolError) -> None:
        self._send_to(peer, error_reply(parsed.reply_type, parsed.request_id, exc,
                                        warnings=parsed.warnings or ()))

    def _refuse_management(self, peer: Peer, parsed) -> None:
        how = ("an admin key (--curve-admin-keys)" if peer.facts.curve_key is not None
               else "a peer on the broker's machine (or --allow-remote-management)")
        self._forbid(peer, parsed, parsed.message_type, f"{parsed.message_type} changes the "
                     f"workers for every client and needs {how}")

    def _forbid(self, peer: Peer, parsed, what: str, message: str) -> None:
        """Refuse what this peer may not do (broker.access): `forbidden`, counted, and logged
        at most once per FORBIDDEN_LOG_EVERY_S (a peer repeating it must not flood the log)."""
        self.metrics.request_rejected(C.FORBIDDEN)
        if self._now >= self._next_forbidden_log:
            self._next_forbidden_log = self._now + FORBIDDEN_LOG_EVERY_S
            log.warning("refused %s from a client with %s: not allowed (more refusals within "
                        "%.0f s are only counted)", what, peer.facts.describe(), FORBIDDEN_LOG_EVERY_S)
        self._refuse_request(peer, parsed, ProtocolError(C.FORBIDDEN, message))

    def _on_model_load(self, peer: Peer, parsed) -> None:
        target = management.load_target(parsed, self.registry.live())
        if isinstance(target, ProtocolError):
            self._refuse_request(peer, parsed, target)
            return
        self._start_op(peer, parsed, W.MANAGE_LOAD_MODEL, [target], management.load_args(parsed),
                       management.LOAD_TIMEOUT_S)
        self.registry.set_loading(target, True)

    def _on_cleanup(self, peer: Peer, parsed) -> None:
        targets = management.cleanup_targets(parsed, self.registry.live())
        if isinstance(targets, ProtocolError):
            self._refuse_request(peer, parsed, targets)
            return
        if not targets:
            self._send_to(peer, final_reply(parsed.reply_type, parsed.request_id, success=True,
                                            data={"workers": {}}, warnings=["no worker is registered"]))
            return
        self._start_op(peer, parsed, W.MANAGE_CLEANUP, targets, management.cleanup_args(parsed),
                       management.CLEANUP_TIMEOUT_S)

    def _on_list_models(self, peer: Peer, parsed) -> None:
        live = self.registry.live()
        if not live:
            self._send_to(peer, final_reply(parsed.reply_type, parsed.request_id, success=True,
                                            data=listings.models_view({}, {}),
                                            warnings=[*(parsed.warnings or ()), "no worker is registered"]))
            return
        self._start_op(peer, parsed, W.MANAGE_LIST_MODELS, live, W.ManageArgs(),
                       listings.LIST_MODELS_TIMEOUT_S)

    def _on_list_queue(self, peer: Peer, parsed) -> None:
        data = listings.queue_view(
            self.jobs, self.queue, self._now,
            include_prompts=management.param(parsed, "include_prompts", default=False),
            # another client's prompt is its own: shown to whoever may cancel that job
            prompt_visible=lambda state: self._may_cancel(peer, state))
        self._send_to(peer, final_reply(parsed.reply_type, parsed.request_id, success=True,
                                        data=data, warnings=parsed.warnings or ()))

    def _may_cancel(self, peer: Peer, state: JobState) -> bool:
        return access.may_cancel(peer.facts, peer.owner, state.owner, local=peer.local,
                                 allow_local_cancel=self.config.allow_local_cancel,
                                 allow_remote_management=self.config.allow_remote_management)

    def _on_list_history(self, peer: Peer, parsed) -> None:
        limit = management.param(parsed, "limit", default=C.DEFAULT_HISTORY_LIMIT)
        try:
            data = listings.history_view(self.journal, limit)
        except JournalError as exc:
            self._journal_unavailable(peer, parsed.reply_type, parsed.request_id, "read", exc)
            return
        warnings = list(parsed.warnings or ())
        if self._unstored:
            warnings.append(f"{len(self._unstored)} finished job(s) are missing: the journal "
                            f"could not store their replies yet")
        self._send_to(peer, final_reply(parsed.reply_type, parsed.request_id, success=True,
                                        data=data, warnings=warnings))

    def _start_op(self, peer: Peer, parsed, op: str, workers: list[WorkerRecord],
                  args: W.ManageArgs, timeout_s: float) -> None:
        pending = self._ops.start(op, peer, parsed.reply_type, parsed.request_id,
                                  {w.worker_id for w in workers}, self._now, timeout_s)
        self._send_to_workers(workers, W.Manage(op_id=pending.op_id, op=op, args=args))
        log.info("%s %s -> %s", op, args, ", ".join(w.worker_id for w in workers))

    def _complete_ops(self, completed: list[management.ManageOp]) -> None:
        for op in completed:
            self._send_to(op.peer, management.reply_for(op, self._now, self._device_of))

    def _device_of(self, worker_id: str) -> str | None:
        worker = self.registry.get(worker_id)
        return worker.device if worker is not None else None

    def _on_cancel(self, peer: Peer, parsed) -> None:
        target = management.param(parsed, "target_request_id", "cancel_request_id", "request_id",
                                  default=parsed.request_id)
        state = self.jobs.get(str(target)) if target is not None else None
        if state is None:
            self._refuse_request(peer, parsed, ProtocolError(
                C.VALIDATION_ERROR, f"no queued or running job with request_id {target!r}"))
            return
        if not self._may_cancel(peer, state):
            self._forbid(peer, parsed, f"cancel of job {state.request_id}",
                         access.cancel_refusal(peer.facts, state.request_id))
            return
        was = "queued" if state.state == QUEUED else "running"
        self._abort(state, "cancelled")
        self._finish(state, error_reply(state.reply_type, state.request_id, ProtocolError(
            C.CANCELLED, f"cancelled while {was}"), warnings=state.warnings,
            execution_time=self._now - state.accepted_at))
        log.info("job %s cancelled while %s", state.request_id, was)
        self._send_to(peer, final_reply(parsed.reply_type, parsed.request_id, success=True,
                                        data={"request_id": state.request_id, "cancelled": True,
                                              "state": was}))

    # --- workers -------------------------------------------------------------------------------------
    def _on_worker(self, identity: bytes, msg: W.FromWorker) -> None:
        if type(msg) is W.Ready:
            self._on_ready(identity, msg)
            return
        worker = self.registry.by_identity(identity)
        if worker is None:
            if (isinstance(msg, (W.JobResult, W.JobFailed))
                    and self._discarded_answers.strike(identity, self._now)[0]):
                log.warning("discarding late %s for %s from a lost or unknown worker (more "
                            "from this connection within %.0f s are not logged)",
                            type(msg).__name__, msg.request_id, self._discarded_answers.window_s)
            if type(msg) is not W.Disconnect:
                self._out.append(ToWorkers([identity], W.Disconnect(
                    reason="not registered; send READY again")))
            return
        self._worker_handlers[type(msg)](worker, msg)

    def _on_bad_worker_frame(self, identity: bytes, error: W.WorkerProtocolError) -> None:
        """A frame that did not decode: nothing of it was stored. Counted, logged once per
        sender per minute, and too many within a minute disconnect the sender (its jobs are
        re-queued as for a lost worker)."""
        worker = self.registry.by_identity(identity)
        self.metrics.bad_worker_frame(worker.worker_id if worker is not None else "")
        self._strike(identity, worker, f"dropping bad frame: {error}")

    def _strike(self, identity: bytes, worker: WorkerRecord | None, what: str) -> None:
        """One more invalid message from this connection: logged once per minute; the
        bad_frames limit within a minute disconnects it and forgets its worker."""
        worker_id = worker.worker_id if worker is not None else "(unregistered)"
        first, cut = self._bad_frames.strike(identity, self._now)
        if first:
            log.warning("worker %s (connection %s): %s; more this minute are only counted "
                        "(sdxl_broker_bad_worker_frames_total)", worker_id, identity.hex(), what)
        if not cut:
            return
        log.error("disconnecting worker %s (connection %s): %d invalid messages within %.0f s",
                  worker_id, identity.hex(), self._bad_frames.limit, self._bad_frames.window_s)
        self._out.append(ToWorkers([identity], W.Disconnect(
            reason=f"{self._bad_frames.limit} invalid worker-protocol messages within "
                   f"{self._bad_frames.window_s:.0f} s")))
        if worker is not None:
            self._worker_lost(worker, "sent invalid messages")
            self.registry.remove(worker)

    def _refuse_version(self, identity: bytes, worker_id, version) -> None:
        log.error("refusing worker %s: it speaks worker protocol version %s, this broker "
                  "speaks %d", worker_id, version, W.PROTOCOL_VERSION)
        self._out.append(ToWorkers([identity], W.Disconnect(
            fatal=True,
            reason=f"protocol version {version} not supported; broker speaks {W.PROTOCOL_VERSION}")))

    def _on_ready(self, identity: bytes, msg: W.Ready) -> None:
        if msg.v != W.PROTOCOL_VERSION:
            self._refuse_version(identity, msg.worker_id, msg.v)
            return
        holder = self.registry.get(msg.worker_id or identity.hex())
        if (holder is not None and holder.identity != identity and not holder.lost
                and holder.expiry > self._now):
            # a worker id belongs to the connection that registered it until that connection
            # is lost: a second process with the id (a rogue, or a restart racing its old
            # self) is not answered; it reconnects after its own liveness timeout and tries
            # again, by which time a dead holder has been declared lost
            self.metrics.bad_worker_frame("")
            self._strike(identity, None, f"READY for worker id {holder.worker_id!r}, which a "
                                         f"live connection ({holder.identity.hex()}) holds: ignored")
            return
        worker, previous = self.registry.register(identity, msg)
        if previous is not None:
            # a fresh READY for a registered id: the old process (or the old transport) holds
            # nothing any more; its jobs and pending management ops are handled as lost
            self._requeue_jobs_of(previous, "re-registered")
            self._complete_ops(self._ops.worker_lost(previous.worker_id))
        self._out.append(ToWorkers([identity], W.BrokerHeartbeat(registered=True)))
        self._pool_changed = True
        log.info("worker %s registered: %s %s, %.0f MB, pid %d on %s%s", worker.worker_id,
                 worker.device, worker.device_name, worker.memory_total_mb, worker.pid, worker.host,
                 " (SIMULATED)" if worker.simulated else "")
        self._dirty = True

    def _on_heartbeat(self, worker: WorkerRecord, msg: W.WorkerHeartbeat) -> None:
        self.registry.heartbeat(worker, msg)
        if self.queue:
            self._dirty = True   # fresh telemetry can change what fits

    def _on_progress(self, worker: WorkerRecord, msg: W.JobProgress) -> None:
        self.registry.touch(worker)
        state = self._current_job(worker, msg)
        if state is not None:
            self.registry.note_progress(worker)
        if state is not None:
            # list_queue shows them, whether or not a peer streams
            state.stage, state.step, state.total_steps = msg.stage, msg.step, msg.total_steps
        if state is not None and state.wants_progress:
            self._progress(state, msg.stage, step=msg.step, total_steps=msg.total_steps,
                           worker_id=worker.worker_id, eta_s=msg.eta_s, preview=msg.preview)

    def _on_manage_reply(self, worker: WorkerRecord, msg: W.ManageReply) -> None:
        self.registry.touch(worker)
        self.registry.note_progress(worker)   # a job waiting behind a long model load is not stuck
        op = self._ops.answer(worker.worker_id, msg)
        if op is None:
            return
        if op.op == W.MANAGE_LOAD_MODEL:
            self.registry.set_loading(worker, False)
        self._dirty = True
        if op.done:
            self._complete_ops([op])

    def _on_disconnect(self, worker: WorkerRecord, msg: W.Disconnect) -> None:
        log.info("worker %s disconnected: %s", worker.worker_id, msg.reason)
        self._worker_lost(worker, "disconnected")
        self.registry.remove(worker)

    def _current_job(self, worker: WorkerRecord,
                     msg: W.JobProgress | W.JobResult | W.JobFailed) -> JobState | None:
        """The job this message is about, if it still runs on this worker as that dispatch."""
        state = self.jobs.get(msg.request_id)
        if (state is None or state.state != RUNNING or state.worker_id != worker.worker_id
                or state.dispatch_id != msg.dispatch_id):
            return None
        return state

    def _on_job_done(self, worker: WorkerRecord, msg: W.JobResult | W.JobFailed) -> None:
        self.registry.touch(worker)
        rid = msg.request_id
        self.registry.release(worker, rid, msg.dispatch_id)
        self._dirty = True
        state = self._current_job(worker, msg)
        if state is None:
            if self._discarded_answers.strike(worker.identity, now=self._now)[0]:
                log.info("discarding %s for %s (dispatch %s) from %s: job no longer runs there "
                         "(more from this worker within %.0f s are not logged)", type(msg).__name__,
                         rid, msg.dispatch_id, worker.worker_id, self._discarded_answers.window_s)
            return
        now = self._now
        success = type(msg) is W.JobResult
        self.registry.note_progress(worker)
        if self.registry.count_answer(worker, success):
            log.info("worker %s finished job %s: healthy again (the stuck-job watchdog had "
                     "fired on it %d time(s))", worker.worker_id, rid, worker.stalls)
        if success:
            data = msg.data
            metrics = data.get("processing_metrics")
            if isinstance(metrics, dict):
                # from acceptance until the worker started it: the broker's queue, plus the wait
                # of a job prefetched behind another on the worker (so queue + total = elapsed)
                worker_total_s = metrics.get("total_time")
                if isinstance(worker_total_s, (int, float)):
                    queue_s = now - state.accepted_at - worker_total_s
                else:
                    queue_s = state.dispatched_at - state.accepted_at
                metrics["queue_time"] = round(max(queue_s, 0.0), 6)
                metrics.setdefault("worker_id", worker.worker_id)
            self._finish(state, final_reply(
                state.reply_type, rid, success=True, data=data,
                warnings=state.warnings + msg.warnings, execution_time=now - state.accepted_at))
        else:
            code = msg.code if msg.code in C.ERROR_CODES else C.INTERNAL_ERROR
            self._finish(state, error_reply(
                state.reply_type, rid, ProtocolError(code, msg.message or code,
                                                     worker_field_errors(msg.details)),
                warnings=state.warnings, execution_time=now - state.accepted_at))

    # --- liveness -----------------------------------------------------------------------------------
    def _check_liveness(self) -> None:
        """Heartbeat every live worker (one message, encoded once) and declare the silent ones
        lost."""
        self._out.append(ToWorkers([w.identity for w in self.registry.live()], W.BrokerHeartbeat()))
        for worker in self.registry.expire():
            log.warning("worker %s lost: no heartbeat for %.1f s", worker.worker_id,
                        self.registry.expiry_s)
            try:   # a failure for one lost worker must not skip the others' jobs
                self.metrics.heartbeat_missed(worker.worker_id)
                self._worker_lost(worker, "stopped heart-beating")
            except Exception:
                log.exception("error while handling lost worker %s; the orphan sweep re-queues "
                              "its jobs", worker.worker_id)
        self._requeue_orphans()

    def _requeue_orphans(self) -> None:
        """Safety net for "never lost silently": a running job whose dispatch no live worker
        record holds any more (its worker is lost, forgotten or re-registered and a path above
        failed to move it) is re-queued or failed here, once per liveness pass at most."""
        for state in list(self.jobs.values()):
            if state.state != RUNNING:
                continue
            worker = self.registry.get(state.worker_id or "")
            if (worker is not None and not worker.lost
                    and worker.jobs.get(state.request_id) == state.dispatch_id):
                continue
            log.error("job %s was running on worker %s (dispatch %s) which no longer holds it; "
                      "treating it as lost", state.request_id, state.worker_id, state.dispatch_id)
            self._job_lost(state, state.worker_id or "?", "no longer holds it")

    def _check_stuck(self) -> None:
        """The stuck-job watchdog (broker/watchdog.py): a worker alive but holding jobs
        without progress for stuck_job_s has them aborted there and re-queued (or failed with
        worker_lost past max_attempts), and is unhealthy until it finishes a job."""
        for stall in watchdog.stalled(self.registry.live(), self._now, self.config.stuck_job_s):
            worker = stall.worker
            held = dict(worker.jobs)
            log.warning("watchdog: worker %s holds job(s) %s but showed %s; aborting them there "
                        "and re-queueing them; it gets no job a healthy worker could take until "
                        "it finishes one", worker.worker_id, ", ".join(held), stall.reason())
            self.metrics.watchdog_fired(worker.worker_id)
            self.registry.mark_unhealthy(worker, stall.reason())
            for rid, dispatch_id in held.items():
                self._out.append(ToWorkers([worker.identity], W.AbortJob(
                    request_id=rid, dispatch_id=dispatch_id, reason="stuck")))
            self._requeue_jobs_of(worker, f"showed {stall.reason()}")
            self._dirty = True

    def _worker_lost(self, worker: WorkerRecord, why: str) -> None:
        if not worker.lost:
            self.registry.mark_lost(worker)
        self._pool_changed = True
        self._requeue_jobs_of(worker, why)
        self._complete_ops(self._ops.worker_lost(worker.worker_id))

    def _requeue_jobs_of(self, worker: WorkerRecord, why: str) -> None:
        for rid, dispatch_id in self.registry.take_jobs(worker).items():
            state = self.jobs.get(rid)
            if (state is None or state.state != RUNNING or state.worker_id != worker.worker_id
                    or state.dispatch_id != dispatch_id):
                continue
            self._job_lost(state, worker.worker_id, why)

    def _job_lost(self, state: JobState, worker_id: str, why: str) -> None:
        """The worker running `state` is gone: re-queue it, or fail it with worker_lost once
        max_attempts dispatches were used."""
        rid = state.request_id
        state.lost_workers.append(worker_id)
        if state.attempt >= self.config.max_attempts:
            log.warning("job %s: worker %s %s; %d attempt(s) used, giving up", rid,
                        worker_id, why, state.attempt)
            self._finish(state, error_reply(state.reply_type, rid, ProtocolError(
                C.WORKER_LOST, f"worker(s) {', '.join(state.lost_workers)} lost while running "
                               f"the job ({state.attempt} of {self.config.max_attempts} attempts; "
                               f"last: {worker_id} {why})"),
                warnings=state.warnings, execution_time=self._now - state.accepted_at))
        else:
            log.warning("job %s: worker %s %s; re-queued (attempt %d of %d used)", rid,
                        worker_id, why, state.attempt, self.config.max_attempts)
            self._enqueue(state, front=True)

    # --- timers ---------------------------------------------------------------------------------------
    def _tick(self, now: float) -> None:
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_interval_s
            self._check_liveness()
            self._check_stuck()
        if self._deadlines and self._deadlines[0][0] <= now:
            self._expire_deadlines(now)
        if self._ops:
            self._complete_ops(self._ops.expire(now))
        if self._unstored and now >= self._next_store_retry:
            self._next_store_retry = now + STORE_RETRY_EVERY_S
            self._retry_unstored("timer")
        if now >= self._next_journal_expire:
            self._next_journal_expire = now + JOURNAL_EXPIRE_EVERY_S
            try:
                self.journal.expire()
            except JournalError as exc:
                self.metrics.journal_error("expire")
                log.error("%s; trying again in %g s", exc, JOURNAL_EXPIRE_EVERY_S)
        if self._pool_changed or (self.queue and not self.registry.live()):
            self._check_pool(now)
        if self._dirty:
            self._dirty = False
            self._dispatch()
            self._positions_changed = True
        if self._positions_changed and now >= self._next_position_update:
            self._send_queue_positions(now)

    # --- jobs no worker can run; queue positions ---------------------------------------------------
    def _refuse_if_no_worker_can_run(self, state: JobState) -> bool:
        """With workers registered, a job none of them can ever run is answered at once
        (unsupported_feature naming what is missing) instead of waiting out its timeout."""
        live = self.registry.live()
        if not live or routing.can_ever_run(self._needs(state), live):
            return False
        reason = routing.unroutable_reason(state.job, live) or "no registered worker can run it"
        # a reason that is one field's fault names it, as a validation error would
        errors = [FieldError(state.job.client_path(field), reason)
                  for rule, field in ((R.DEVICE, "device"),
                                      (R.UPSCALE_METHOD, "postprocess.upscale_method"))
                  if rule.pattern().match(reason)]
        self._fail_unrunnable(state, f"no worker can run this job: {reason}", errors)
        return True

    def _fail_unrunnable(self, state: JobState, message: str, errors: list) -> None:
        log.info("job %s refused: %s", state.request_id, message)
        self._abort(state, "unsupported")
        self._finish(state, error_reply(state.reply_type, state.request_id, ProtocolError(
            C.UNSUPPORTED_FEATURE, message, errors), warnings=state.warnings,
            execution_time=self._now - state.accepted_at))

    def _check_pool(self, now: float) -> None:
        """After a worker came or went: queued jobs the pool can no longer run fail; with no
        worker at all, jobs wait no_worker_grace_s (from acceptance or the pool emptying)."""
        changed, self._pool_changed = self._pool_changed, False
        live = self.registry.live()
        if live:
            self._pool_empty_since = None
            if changed:
                for rid in [rid for rid, _ in self.queue]:
                    self._refuse_if_no_worker_can_run(self.jobs[rid])
            return
        if self._pool_empty_since is None:
            self._pool_empty_since = now
        grace = self.config.no_worker_grace_s
        for rid in [rid for rid, _ in self.queue]:
            state = self.jobs[rid]
            if now - max(state.accepted_at, self._pool_empty_since) >= grace:
                self._fail_unrunnable(state, f"no worker can run this job: no worker has been "
                                             f"registered for {grace:g} s", [])

    def _send_queue_positions(self, now: float) -> None:
        """queue_position again to every streaming job whose place changed, at most once per
        queue_position_interval_s (a long queue moving fast must not flood its clients)."""
        self._positions_changed = False
        for position, (rid, _) in enumerate(self.queue):
            state = self.jobs.get(rid)
            if state is None or not state.wants_progress:
                continue
            last = state.last_progress
            if last is not None and last.get("stage") == "queued" \
                    and last.get("queue_position") == position:
                continue
            self._progress(state, "queued", queue_position=position,
                           eta_s=queued_eta_s(state.job, position, self.registry.live()))
            # the interval runs from an update actually sent
            self._next_position_update = now + self.config.queue_position_interval_s

    def _expire_deadlines(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, rid = heapq.heappop(self._deadlines)
            state = self.jobs.get(rid)
            if state is None or state.deadline != deadline:
                continue
            if state.state == QUEUED:
                live = self.registry.live()
                reason = routing.unroutable_reason(state.job, live)
                why = (f"no worker can run it: {reason}" if reason
                       else f"still queued (position {self.queue.position(rid)})")
                if not reason and live and not any(w.healthy for w in live):
                    why += "; every worker is unhealthy (the stuck-job watchdog fired on each)"
            else:
                why = f"running on worker {state.worker_id}"
            self._abort(state, "timeout")
            self._finish(state, error_reply(state.reply_type, rid, ProtocolError(
                C.TIMEOUT, f"timed out after {state.job.timeout_s:g} s, {why}"),
                warnings=state.warnings, execution_time=now - state.accepted_at))

    # --- dispatch ---------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        if not len(self.queue):
            return
        max_jobs = self.config.max_jobs_per_worker
        live = self.registry.live()
        if not any(w.calls < max_jobs for w in live):
            return
        window = [self.jobs[rid] for rid, _ in self.queue.head(DISPATCH_LOOKAHEAD)]
        needs = [self._needs(state) for state in window]
        waiting = len(self.queue)
        # models the jobs about to be considered need: smart routing avoids evicting them
        wanted = frozenset(m for n in needs for m in n.models)
        for state, job_needs in zip(window, needs):
            if state.state != QUEUED:   # went along as a batch companion of an earlier job
                continue
            worker = routing.choose_worker(state.job, live, self.config.routing, self._rr,
                                           waiting=waiting, wanted=wanted, live_count=len(live),
                                           needs=job_needs, max_jobs=max_jobs)
            if worker is None:
                continue
            companions = self._batch_companions(state, job_needs, worker, window, needs, live)
            for member, member_needs in [(state, job_needs), *companions]:
                self._send_job(member, worker, member_needs, batch_of=1 + len(companions),
                               companion=member is not state)
            waiting -= 1 + len(companions)
            if not any(w.calls < max_jobs for w in live):
                return

    def _send_job(self, state: JobState, worker: WorkerRecord, job_needs: routing.JobNeeds,
                  batch_of: int = 1, companion: bool = False) -> None:
        rid = state.request_id
        self.queue.remove(rid)
        state.state, state.worker_id = RUNNING, worker.worker_id
        state.attempt += 1
        state.dispatch_id = next(self._dispatch_ids)
        state.dispatched_at = self._now
        estimate = routing.dispatch_estimate(state.job, worker, job_needs)
        self.registry.assign(worker, rid, state.dispatch_id,
                             routing.companion_estimate(estimate) if companion else estimate,
                             companion=companion)
        if state.wire is None:
            state.wire = state.job.to_wire()
        self._out.append(ToWorkers([worker.identity], W.RunJob(
            request_id=rid, attempt=state.attempt, dispatch_id=state.dispatch_id, job=state.wire,
            batch_of=batch_of)))
        log.debug("job %s -> worker %s (attempt %d%s)", rid, worker.worker_id, state.attempt,
                  f", batch of {batch_of}" if batch_of > 1 else "")
        if not worker.healthy:
            log.info("job %s -> unhealthy worker %s as a probe (no healthy worker can take it "
                     "now; a success makes the worker healthy again)", rid, worker.worker_id)

    def _batch_companions(self, lead: JobState, lead_needs: routing.JobNeeds, worker: WorkerRecord,
                          window: list[JobState], needs: list[routing.JobNeeds],
                          live: list[WorkerRecord]) -> list[tuple[JobState, routing.JobNeeds]]:
        """Queued jobs that can share `lead`'s pipeline call on `worker` (dynamic batching:
        protocol.batching.batch_key), sent with it. Up to the worker's max_batch images, and no
        more than an even share of the compatible queued images over the workers that would
        start them soon (a batch of 8 on one worker while another idles is slower than 4+4)."""
        if worker.max_batch <= lead.job.batch_size:
            return []
        key = lead.batch_key()
        if key is None:
            return []
        same = [(state, n) for state, n in zip(window, needs)
                if state is not lead and state.state == QUEUED and state.batch_key() == key]
        if not same:
            return []
        images = lead.job.batch_size + sum(state.job.batch_size for state, _ in same)
        # the workers that would start these jobs soon: the idle ones that can run them, and
        # this one (its prefetch slot) when it is busy
        sharing = sum(1 for w in live if w.calls == 0 and routing.could_run(lead_needs, w)) \
            + (worker.calls > 0)
        room = min(worker.max_batch, -(-images // max(sharing, 1))) - lead.job.batch_size
        chosen = []
        for state, state_needs in same:
            if self._overtakes(state, lead, window, chosen):
                continue
            size = state.job.batch_size
            if size <= room and routing.could_run(state_needs, worker) and \
                    routing.fits_batch(lead_needs, worker, extra_images=sum(
                        s.job.batch_size for s, _ in chosen) + size):
                chosen.append((state, state_needs))
                room -= size
        return chosen

    @staticmethod
    def _overtakes(candidate: JobState, lead: JobState, window: list[JobState],
                   chosen: list) -> bool:
        """Whether taking `candidate` along would let it overtake a queued job of higher
        priority that stays behind (the window is in serving order: priority, then arrival)."""
        taken = {lead.request_id, *(state.request_id for state, _ in chosen)}
        rank = C.PRIORITIES.index
        for state in window:
            if state is candidate:
                return False
            if state.state == QUEUED and state.request_id not in taken and \
                    rank(state.job.priority) < rank(candidate.job.priority):
                return True
        return False

    def _needs(self, state: JobState) -> routing.JobNeeds:
        """The job's routing needs, computed once per job (again only when a worker reports a
        model size that changes its memory estimate)."""
        version = self.registry.model_sizes_version
        if state.needs is None or state.needs_sizes_version != version:
            state.needs = routing.JobNeeds.of(state.job, self.registry.model_sizes)
            state.needs_sizes_version = version
        return state.needs

    def _abort(self, state: JobState, reason: str) -> None:
        """Take a job off the queue, or tell its worker to stop it (it is then forgotten)."""
        if state.state == QUEUED:
            self.queue.remove(state.request_id)
            return
        worker = self.registry.get(state.worker_id or "")
        if worker is not None:
            self.registry.release(worker, state.request_id)
            if not worker.lost:
                self._out.append(ToWorkers([worker.identity], W.AbortJob(
                    request_id=state.request_id, dispatch_id=state.dispatch_id, reason=reason)))
        self._dirty = True

    # --- replies -----------------------------------------------------------------------------------------
    def _finish(self, state: JobState, reply: dict) -> None:
        """The one final reply: to every attached peer once, into the journal, job forgotten."""
        if self.jobs.pop(state.request_id, None) is None:
            return
        self.queue.remove(state.request_id)
        self.counters["completed" if reply.get("success") else "failed"] += 1
        job_log.log_finished(state, reply, now=self._now)
        self.metrics.job_finished(reply, total_s=self._now - state.accepted_at,
                                  queue_s=state.dispatched_at - state.accepted_at if state.attempt else None,
                                  steps=state.job.steps)
        for peer in state.peers:
            self._send_to(peer, reply)
        self._dirty = True
        self._store_reply(state, reply)

    def _progress(self, state: JobState, stage: str, **fields) -> None:
        if stage not in C.STAGES:
            return
        message = progress_message(state.request_id, stage, **fields)
        state.last_progress = message
        for peer in state.peers:
            if peer.streams:
                self._send_to(peer, message)

    # --- start and stop ------------------------------------------------------------------------------------
    def _restore_from_journal(self, wall_now: float) -> None:
        pending = self.journal.pending()
        if not pending:
            return
        parse = request_parser()
        now = self._now
        for row in pending:
            try:
                parsed = parse.parse_request(codec.decode(row.body)[0],
                                             default_model_base=self.config.default_model_base,
                                             allow_pickle=self.config.allow_pickle)
            except ProtocolError as exc:
                log.error("journal: job %s no longer parses (%s); dropping it", row.request_id, exc)
                continue
            if parsed.job is None:
                continue
            age_s = max(wall_now - row.accepted_at, 0.0)
            warnings = list(parsed.warnings or [])
            job = self._bounded_timeout(parsed.job, warnings)
            state = JobState(request_id=row.request_id, job=job, reply_type=parsed.reply_type,
                             fingerprint=row.fingerprint, accepted_at=now - age_s,
                             deadline=now - age_s + job.timeout_s, body_bytes=len(row.body),
                             warnings=warnings)
            self._enqueue(state)
        log.info("journal: re-queued %d unfinished job(s) from before the restart", len(pending))

    def _answer_unfinished_on_stop(self) -> None:
        # management requests are never journaled
        self._complete_ops(self._ops.abandon_all("the broker stopped before the worker answered"))
        if self._unstored and self.journal is not None:
            self._retry_unstored("the broker is stopping")
            if self._unstored:
                log.error("stopping with %d final repl(ies) the journal could not store: their "
                          "jobs (%s) stay in the journal and run again after a restart",
                          len(self._unstored), ", ".join(self._unstored.request_ids()[:20]))
        if self.config.state_dir or self.journal is None:
            return
        for state in list(self.jobs.values()):
            self._abort(state, "cancelled")
            self._finish(state, error_reply(state.reply_type, state.request_id, ProtocolError(
                C.INTERNAL_ERROR, "the broker stopped before the job finished (no --state-dir "
                                  "journal to resume it)"), warnings=state.warnings))
