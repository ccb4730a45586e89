"""Client drivers on raw pyzmq sockets: DEALER and REQ, JSON and msgpack, the three forms.

Each driver is a thread that owns its sockets (one thread per socket, as zmq requires). Every
request goes through the ledger. A request without a final reply after `resend_after_s` is
resent with the same body from a *fresh* socket (lazy-pirate style), so a reply to the old
socket can never be counted twice: what the ledger sees per request is exactly what the contract
promises per request id.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass, replace

import zmq

from . import bodies
from .ledger import Entry, Ledger

FORGED_MARK_BYTES = bodies.FORGED_MARK.encode()

log = logging.getLogger("stress.clients")

# "come back later" answers: a polite client backs off before its next request
BACK_OFF_AFTER = frozenset({"queue_full", "unavailable"})
_NO_PROBE_AFTER = frozenset({"queue_full", "unavailable", "validation_error", "malformed_message",
                             "duplicate_request_id", "unknown_message_type"})


@dataclass(frozen=True)
class LoadConfig:
    phase: str
    window: int = 2                  # requests a DEALER client keeps outstanding
    max_steps: int = 6
    stream_share: float = 0.4        # DEALER requests asking for progress
    req_stream_share: float = 0.2    # REQ requests asking for progress (must get none)
    probe_share: float = 0.08        # requests followed by a duplicate-id probe
    cancel_share: float = 0.04
    short_timeout_share: float = 0.04
    resend_after_s: float = 12.0
    max_resends: int = 4
    think_s: float = 0.0             # pause between a client's requests


def _identity() -> bytes:
    """A random routing identity (never a leading zero byte: ZeroMQ reserves those)."""
    return b"\x01" + os.urandom(15)


class Conn:
    """One DEALER socket and the requests awaiting a final reply on it."""

    def __init__(self, ctx: zmq.Context, endpoint: str, ledger: Ledger, rng: random.Random,
                 socket_type: int = zmq.DEALER, identity: bytes | None = None):
        self.ledger = ledger
        self.socket = ctx.socket(socket_type)
        self.socket.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            # a resend's fresh socket keeps the routing identity (the broker's frontend hands
            # it over): without CURVE the job's owner, so a later cancel is still allowed
            self.socket.setsockopt(zmq.IDENTITY, identity)
        self.identity = identity
        self.socket.connect(endpoint)
        self.delimiter = rng.random() < 0.5  # DEALER may send ["", body] or [body]
        self.routes: dict[tuple[str, str], str] = {}   # (request_id, family) -> ledger key
        self.pending: dict[str, float] = {}             # ledger key -> last send time

    def send(self, entry: Entry, family: str = "gen") -> None:
        self.routes[(entry.request_id, family)] = entry.key
        self.pending[entry.key] = time.monotonic()
        frames = [b"", entry.frame] if self.delimiter else [entry.frame]
        self.socket.send_multipart(frames, copy=False)
        self.ledger.sent(entry.key)

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.socket.poll(timeout_ms, zmq.POLLIN))

    def receive(self) -> tuple[str | None, dict | None]:
        """Read one reply; returns (ledger key, reply) or (None, None) for one that matched
        nothing (counted as a violation)."""
        frames = self.socket.recv_multipart()
        body = frames[-1]
        has_delimiter = len(frames) == 2 and frames[0] == b""
        if has_delimiter != self.delimiter or len(frames) > 2:
            self.ledger.violation("wrong_envelope", f"sent delimiter={self.delimiter}, "
                                  f"got {len(frames)} frames")
        reply = bodies.decode_reply(body)
        if reply is None:
            self.ledger.violation("undecodable_reply", repr(body[:80]))
            return None, None
        if FORGED_MARK_BYTES in body:
            # a rogue peer's forged RESULT/ERROR/PROGRESS reached a client (raw_worker.py)
            self.ledger.violation("forged_message_delivered", repr(body[:200]))
        message_type = reply.get("message_type")
        family = "cancel" if message_type == "cancel_response" else "gen"
        key = self.routes.get((reply.get("request_id"), family))
        if key is None:
            self.ledger.violation("reply_for_unknown_request",
                                  f"{message_type} {reply.get('request_id')!r}")
            return None, None
        entry = self.ledger.get(key)
        if bodies.reply_codec(body) != entry.codec:
            self.ledger.violation("wrong_reply_codec", f"{key}: sent {entry.codec}")
        if reply.get("final") is False:
            if not entry.stream:
                self.ledger.violation("unrequested_progress", key)
            self.ledger.progress(key)
        else:
            self.ledger.final(key, reply)
            self.pending.pop(key, None)
        return key, reply

    def overdue(self, resend_after_s: float) -> bool:
        now = time.monotonic()
        return any(now - t > resend_after_s for t in self.pending.values())

    def close(self) -> None:
        self.socket.close(linger=0)


class _Driver(threading.Thread):
    """Shared parts: ids, request specs, stop events."""

    def __init__(self, name: str, ctx: zmq.Context, endpoint: str, ledger: Ledger,
                 cfg: LoadConfig, seed: int, stop_sending: threading.Event,
                 stop_now: threading.Event):
        super().__init__(name=name, daemon=True)
        self.ctx, self.endpoint, self.ledger, self.cfg = ctx, endpoint, ledger, cfg
        self.rng = random.Random(seed)
        self.stop_sending, self.stop_now = stop_sending, stop_now
        self._n = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.drive()
        except BaseException as exc:  # a bug in the stress tool, not in the broker
            self.error = exc
            log.exception("client %s crashed", self.name)

    def drive(self) -> None:
        raise NotImplementedError

    def new_id(self) -> str:
        self._n += 1
        return f"{self.cfg.phase}-{self.name}-{self._n}"

    def new_spec(self, *, allow_stream: bool, stream_share: float) -> bodies.GenerationSpec:
        rng, cfg = self.rng, self.cfg
        form = rng.choice(bodies.FORMS)
        spec = bodies.GenerationSpec(
            request_id=self.new_id(), form=form, prompt=bodies.random_prompt(rng),
            steps=rng.randint(1, cfg.max_steps), priority=rng.choice(bodies.PRIORITIES),
            seed=-1 if rng.random() < 0.8 else rng.randrange(2**31),
            stream=allow_stream and form != "legacy" and rng.random() < stream_share)
        if form != "legacy" and rng.random() < cfg.short_timeout_share:
            spec = replace(spec, timeout_s=round(rng.uniform(0.05, 0.3), 3), steps=cfg.max_steps * 3)
        return spec

    def new_entry(self, spec: bodies.GenerationSpec, kind: str, codec: str | None = None) -> Entry:
        codec = codec or self.rng.choice(bodies.CODECS)
        return self.ledger.add(Entry(
            key=spec.request_id, request_id=spec.request_id, kind=kind, phase=self.cfg.phase,
            frame=bodies.encode(bodies.generation_body(spec), codec), codec=codec,
            expected_reply_type=bodies.REPLY_TYPE[spec.form], stream=spec.stream))


class DealerClient(_Driver):
    """Keeps `window` requests in flight; sometimes cancels one, sometimes probes an id again
    from a second socket (same body: must attach or replay; changed body: must be refused)."""

    def drive(self) -> None:
        self.main = Conn(self.ctx, self.endpoint, self.ledger, self.rng, identity=_identity())
        self.probe = Conn(self.ctx, self.endpoint, self.ledger, self.rng)
        self.specs: dict[str, bodies.GenerationSpec] = {}
        self.cancel_due: list[tuple[float, str]] = []
        self.probed: set[str] = set()
        self.backoff_until = 0.0
        try:
            while not self.stop_now.is_set():
                sending = not self.stop_sending.is_set()
                if sending and time.monotonic() >= self.backoff_until:
                    while len(self.main.pending) < self.cfg.window:
                        self._send_new()
                elif not self.main.pending and not self.probe.pending:
                    break
                self._pump(100)
                self._due_cancels(sending)
                self.main = self._resend_if_overdue(self.main)
                self.probe = self._resend_if_overdue(self.probe)
                if sending and self.cfg.think_s:
                    time.sleep(self.rng.uniform(0, self.cfg.think_s))
        finally:
            self.main.close()
            self.probe.close()

    def _send_new(self) -> None:
        spec = self.new_spec(allow_stream=True, stream_share=self.cfg.stream_share)
        entry = self.new_entry(spec, "dealer")
        self.specs[entry.key] = spec
        self.main.send(entry)
        if self.rng.random() < self.cfg.cancel_share:
            self.cancel_due.append((time.monotonic() + self.rng.uniform(0.0, 0.5), entry.key))

    def _pump(self, timeout_ms: int) -> None:
        for conn in (self.main, self.probe):
            wait = timeout_ms if conn is self.main else 0
            while conn.poll(wait):
                wait = 0
                key, reply = conn.receive()
                if key and reply.get("error_code") in BACK_OFF_AFTER:
                    # as a polite client would: back off instead of hammering a full queue
                    # or a broker whose journal's disk is full
                    self.backoff_until = time.monotonic() + self.rng.uniform(0.2, 1.0)
                if key and conn is self.main and not self.stop_sending.is_set():
                    self._maybe_probe(key, reply)

    def _maybe_probe(self, key: str, reply: dict) -> None:
        entry = self.ledger.get(key)
        if entry.kind != "dealer" or key in self.probed or self.rng.random() >= self.cfg.probe_share:
            return
        is_final = reply.get("final") is not False
        if is_final and reply.get("error_code") in _NO_PROBE_AFTER:
            return  # the broker never took this id, so there is nothing to attach to
        self.probed.add(key)
        # in flight: same body only (a changed body racing the original is not a fair test)
        kind = "probe_same" if not is_final or self.rng.random() < 0.5 else "probe_diff"
        spec = self.specs[key]
        if kind == "probe_diff":
            spec = replace(spec, prompt=spec.prompt + " (changed)")
        probe = self.ledger.add(Entry(
            key=f"{key}#probe", request_id=entry.request_id, kind=kind, phase=entry.phase,
            frame=entry.frame if kind == "probe_same" else bodies.encode(
                bodies.generation_body(spec), entry.codec),
            codec=entry.codec, expected_reply_type=entry.expected_reply_type,
            stream=entry.stream, parent=key))
        self.probe.send(probe)

    def _due_cancels(self, sending: bool) -> None:
        now = time.monotonic()
        due = [c for c in self.cancel_due if c[0] <= now]
        self.cancel_due = [c for c in self.cancel_due if c[0] > now]
        for _, key in due:
            if not sending or key not in self.main.pending:
                continue
            entry = self.ledger.get(key)
            cancel = self.ledger.add(Entry(
                key=f"{key}#cancel", request_id=entry.request_id, kind="cancel",
                phase=entry.phase, frame=bodies.encode(bodies.cancel_body(entry.request_id),
                                                       entry.codec),
                codec=entry.codec, expected_reply_type="cancel_response", parent=key))
            self.main.send(cancel, family="cancel")

    def _resend_if_overdue(self, conn: Conn) -> Conn:
        if not conn.overdue(self.cfg.resend_after_s):
            return conn
        keys = list(conn.pending)
        conn.close()
        fresh = Conn(self.ctx, self.endpoint, self.ledger, self.rng, identity=conn.identity)
        for key in keys:
            entry = self.ledger.get(key)
            if entry.sends > self.cfg.max_resends:
                continue  # left for the end-of-run resend
            self.ledger.event("client_resends")
            fresh.send(entry, family="cancel" if entry.kind == "cancel" else "gen")
        return fresh


class ReqClient(_Driver):
    """One request at a time on a REQ socket; a REQ peer must only ever get the final reply,
    even when its body asks for progress."""

    def drive(self) -> None:
        while not self.stop_sending.is_set() and not self.stop_now.is_set():
            spec = self.new_spec(allow_stream=True, stream_share=self.cfg.req_stream_share)
            entry = self.new_entry(spec, "req")
            self._one(entry)
            if entry.finals and entry.finals[0].error_code in BACK_OFF_AFTER:
                self.stop_sending.wait(self.rng.uniform(0.2, 1.0))  # back off, politely
            if self.cfg.think_s:
                time.sleep(self.rng.uniform(0, self.cfg.think_s))

    def _one(self, entry: Entry) -> None:
        for _attempt in range(self.cfg.max_resends + 1):
            sock = self.ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
            try:
                sock.send(entry.frame)
                self.ledger.sent(entry.key)
                deadline = time.monotonic() + self.cfg.resend_after_s
                while time.monotonic() < deadline:
                    if self.stop_now.is_set():
                        return
                    if sock.poll(100, zmq.POLLIN):
                        self._handle(entry, sock.recv())
                        return
                self.ledger.event("client_resends")
            finally:
                sock.close(linger=0)

    def _handle(self, entry: Entry, frame: bytes) -> None:
        reply = bodies.decode_reply(frame)
        if reply is None:
            self.ledger.violation("undecodable_reply", repr(frame[:80]))
            return
        if bodies.reply_codec(frame) != entry.codec:
            self.ledger.violation("wrong_reply_codec", f"{entry.key}: sent {entry.codec}")
        if reply.get("final") is False:
            # a REQ socket takes one reply per request: a progress message here ate the slot
            self.ledger.violation("req_got_progress", entry.key)
            return
        if reply.get("request_id") != entry.request_id:
            self.ledger.violation("reply_for_unknown_request", str(reply.get("request_id")))
            return
        self.ledger.final(entry.key, reply)


class VanishingClient(_Driver):
    """Opens a socket, sends a few streaming requests, and disappears mid-job. The broker
    must not care; the end-of-run resend then collects each job's stored reply."""

    interval_s: float = 1.5

    def drive(self) -> None:
        while not self.stop_sending.is_set() and not self.stop_now.is_set():
            conn = Conn(self.ctx, self.endpoint, self.ledger, self.rng)
            try:
                for _ in range(self.rng.randint(1, 3)):
                    spec = self.new_spec(allow_stream=True, stream_share=1.0)
                    conn.send(self.new_entry(spec, "vanish"))
                deadline = time.monotonic() + self.rng.uniform(0.02, 0.6)
                while time.monotonic() < deadline:
                    if conn.poll(20):
                        conn.receive()
            finally:
                for key in conn.pending:
                    self.ledger.get(key).vanished = True
                conn.close()
            self.stop_sending.wait(self.rng.uniform(0.5, 2 * self.interval_s))


def burst(ctx: zmq.Context, endpoint: str, ledger: Ledger, cfg: LoadConfig, count: int,
          seed: int, wait_s: float, stop_now: threading.Event) -> dict:
    """Send `count` requests as fast as one socket can, then collect their finals: the ones
    past --max-queue must come back as queue_full at once, the rest as results."""
    driver = _Driver("burst", ctx, endpoint, ledger, cfg, seed, threading.Event(), stop_now)
    driver._n = int(time.monotonic() * 1000) % 10**9  # ids unique across bursts
    conn = Conn(ctx, endpoint, ledger, driver.rng)
    try:
        for _ in range(count):
            spec = bodies.GenerationSpec(request_id=driver.new_id(), form="flat", steps=1,
                                         priority="low", prompt="burst")
            conn.send(driver.new_entry(spec, "burst", codec="msgpack"))
        deadline = time.monotonic() + wait_s
        while conn.pending and time.monotonic() < deadline and not stop_now.is_set():
            if conn.poll(100):
                conn.receive()
        return {"sent": count, "unanswered_at_burst_end": len(conn.pending)}
    finally:
        conn.close()


def resend_unanswered(ctx: zmq.Context, endpoint: str, ledger: Ledger, phase: str,
                      wait_s: float) -> dict:
    """The end-of-run resend: every request of `phase` still without a final reply is sent
    again, same body, from fresh sockets. Entries sharing a request id (a probe and its
    original) go on different sockets so each gets its own reply."""
    todo = ledger.unanswered(phase)
    if not todo:
        return {"resent": 0, "answered": 0}
    rng = random.Random(len(todo))
    conns: list[Conn] = []
    used: list[set] = []
    for entry in todo:
        entry.resent_at_end = True
        slot = next((i for i, ids in enumerate(used) if entry.request_id not in ids), None)
        if slot is None:
            conns.append(Conn(ctx, endpoint, ledger, rng))
            used.append(set())
            slot = len(conns) - 1
        used[slot].add(entry.request_id)
        conns[slot].send(entry, family="cancel" if entry.kind == "cancel" else "gen")
    # wait while replies keep coming: `wait_s` without any, or 10 x `wait_s` in all (a real
    # worker's backlog can take minutes; a broker that stopped answering cannot)
    hard_deadline = time.monotonic() + 10 * wait_s
    deadline = time.monotonic() + wait_s
    try:
        while (any(c.pending for c in conns) and time.monotonic() < min(deadline, hard_deadline)):
            for conn in conns:
                while conn.poll(50 if conn is conns[0] else 0):
                    key, reply = conn.receive()
                    if key and reply.get("final") is not False:
                        deadline = time.monotonic() + wait_s
        # a little longer: a second final for the same request would show up now
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            for conn in conns:
                while conn.poll(20):
                    conn.receive()
    finally:
        for conn in conns:
            conn.close()
    return {"resent": len(todo), "answered": sum(1 for e in todo if e.finals)}
