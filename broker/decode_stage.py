"""The decode stage: big client bodies are decoded, validated and fingerprinted in child
processes, so the broker's loop (which owns liveness and dispatch) never spends seconds on one
client's bytes.

Why processes: orjson.loads, msgpack.unpackb and the fingerprint's JSON encoding hold the GIL
for the whole call. Measured on a 62 MB body of 31 M zeros: a thread beside a running decode
went 3.7 s (orjson) and 3.4 s (fingerprint) without running once, so a decode *thread* would
stall the loop as much as decoding on it. A body over INLINE_DECODE_MAX_BYTES (a few ms of
work at worst) goes to a decode process instead; smaller ones are decoded on the loop as before.

Ordering: a client's messages reach the core in the order it sent them (a cancel after its
generate, a resend after its request). A peer with a body in the stage has a queue here; its
later messages, big or small, wait in it until everything before them is decoded. Peers never
wait for one another: while one body decodes, other clients' small bodies go straight to the
core, and waiting big bodies are handed to a decode process smallest first; one more decode
process takes only bodies up to SMALL_LANE_MAX_BYTES (4 MB), so requests with ordinary images
never wait behind 60 MB bodies.

Bounds: each decode process holds one body at a time; undecoded bodies held here are capped at
`backlog_mb` (beyond it the body is refused with queue_full without being decoded, so the reply
cannot name its request_id). A decode process that dies (an out-of-memory kill) costs only the
body it held, which is answered internal_error, and is started again for the next.

The loop thread owns the ROUTER the decode processes connect to (ipc:// in a private 0700
directory); results come back as msgpack (client_decode.DecodedBody.to_wire), never pickle.
Run as `python -m broker.decode_stage` only by DecodeStage.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass

import zmq

from protocol import codec
from protocol import constants as C
from protocol.errors import ProtocolError

from broker.client_decode import FALLBACK_REPLY_TYPE, DecodedBody, decode_body, request_parser

log = logging.getLogger("broker.server")

# bodies up to this size are decoded on the loop: the worst case measured (64 KB of msgpack
# zeros, 64 K list items: decode + fingerprint) is ~5 ms on a loaded machine; typical requests
# without images are under 2 KB
INLINE_DECODE_MAX_BYTES = 64 * 1024
# one more decode process takes only bodies up to this size, so a request with an ordinary
# image (or a 68 KB bad frame) never waits behind a 60 MB body that takes seconds to decode
SMALL_LANE_MAX_BYTES = 4 * 2**20
_READY = b"ready"
_SEQ = struct.Struct("!Q")
_CHECK_PROCESSES_EVERY_S = 0.25
_MAX_FAILED_STARTS = 3
# decode processes run at this nice level: on a 2-core box a decode at full CPU beside the loop
# doubled another client's p99 (bench/big_bodies.py)
_NICENESS = 10


def _codec_of(body) -> str:
    """The reply codec of a body that was not decoded (it may be a memoryview of its frame)."""
    return codec.sniff(bytes(body[:64])) or C.CODEC_JSON


@dataclass(slots=True)
class _Entry:
    """One client message held by the stage until it, and every earlier one of its peer, is
    decoded."""
    request: object                  # broker.core.ClientRequest
    peer_key: tuple
    size: int
    frame: object = None             # the body zmq.Frame, until handed to a decode process
    decoded: DecodedBody | None = None


@dataclass(slots=True)
class _Decoder:
    identity: bytes
    process: subprocess.Popen
    small_only: bool = False         # the lane for bodies up to SMALL_LANE_MAX_BYTES
    ready: bool = False
    holding: int | None = None       # seq of the body it is decoding


class DecodeStage:
    """The loop side of the stage. Used only by the broker's loop thread (start() creates the
    ROUTER, as it creates the frontend and backend)."""

    def __init__(self, ctx: zmq.Context, processes: int, backlog_mb: float, *,
                 default_model_base: str | None = None, allow_pickle: bool = False,
                 state_dir: str | None = None):
        self.max_processes = max(int(processes), 1)
        self.backlog_bytes = int(backlog_mb * 2**20)
        self._settings = {"default_model_base": default_model_base, "allow_pickle": allow_pickle}
        self._state_dir = os.path.abspath(state_dir) if state_dir else None
        self._dir = tempfile.mkdtemp(prefix="sdxl-decode-")   # 0700: only this user connects
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)   # a send to a dead decoder raises
        try:
            self.socket.bind(f"ipc://{self._dir}/decode")
        except zmq.ZMQError as exc:   # a platform without ipc://: loopback tcp instead
            log.warning("decode stage: no ipc:// here (%s); using loopback tcp", exc)
            self.socket.bind("tcp://127.0.0.1:*")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._decoders: dict[bytes, _Decoder] = {}
        self._names = itertools.count()
        self._seqs = itertools.count()
        self._by_peer: dict[tuple, deque[_Entry]] = {}   # peers with a message in the stage
        self._waiting: list[tuple[int, int, _Entry]] = []   # heap (size, seq, entry): smallest first
        self._in_decoder: dict[int, _Entry] = {}
        self.held_bytes = 0          # undecoded bodies, waiting or in a decode process
        self._next_check = 0.0
        self._failed_starts = 0      # decode processes in a row that exited before "ready"
        self.decoded_count = 0       # bodies decoded off the loop (tests and logs)

    # --- what the loop calls ---------------------------------------------------------------------
    def wants(self, local: bool, identity: bytes, size: int) -> bool:
        """This message goes through the stage: a big body, or its peer already has one here."""
        return size > INLINE_DECODE_MAX_BYTES or (
            bool(self._by_peer) and (local, identity) in self._by_peer)

    def submit(self, request, frame) -> list[tuple[object, DecodedBody]]:
        """Take one message the loop read; returns (request, decoded) pairs ready for the core
        now (a refusal), usually none: they come from on_readable() once decoded."""
        key = (request.local, request.envelope[0])
        size = len(frame)
        if size <= INLINE_DECODE_MAX_BYTES:   # small, behind its peer's big body: decoded now
            entry = _Entry(request, key, size, decoded=decode_body(
                request.body, request.body_frames, **self._settings))
            self._by_peer[key].append(entry)
            return []
        if self.held_bytes + size > self.backlog_bytes:
            log.warning("decode backlog full (%.0f MB held, limit %.0f MB): refusing a %.1f MB "
                        "body from %s", self.held_bytes / 2**20, self.backlog_bytes / 2**20,
                        size / 2**20, request.envelope[0].hex())
            return [(request, DecodedBody(
                _codec_of(request.body), body_bytes=size,
                reply_type=FALLBACK_REPLY_TYPE, error=ProtocolError(
                    C.QUEUE_FULL, f"the broker is decoding {self.held_bytes / 2**20:.0f} MB of "
                                  "other large requests; retry later")))]
        entry = _Entry(request, key, size, frame=frame)
        self._by_peer.setdefault(key, deque()).append(entry)
        heapq.heappush(self._waiting, (size, next(self._seqs), entry))
        self.held_bytes += size
        self._hand_out()
        return []

    def on_readable(self) -> list[tuple[object, DecodedBody]]:
        """Read what the decode processes sent; the messages now ready, in each peer's order."""
        ready: list[tuple[object, DecodedBody]] = []
        while self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = self.socket.recv_multipart(zmq.NOBLOCK)
            decoder = self._decoders.get(frames[0])
            if decoder is None:
                continue
            if frames[1:] == [_READY]:
                decoder.ready = True
                self._failed_starts = 0
                continue
            seq = _SEQ.unpack(frames[1])[0]
            if decoder.holding == seq:
                decoder.holding = None
            entry = self._in_decoder.pop(seq, None)
            if entry is None:
                continue
            try:
                entry.decoded = DecodedBody.from_wire(frames[2])
            except Exception as exc:   # a bug in the round trip costs this request only
                log.exception("cannot read a decode result")
                entry.decoded = DecodedBody(_codec_of(entry.request.body),
                                            body_bytes=entry.size, error=ProtocolError(
                                                C.INTERNAL_ERROR, f"cannot decode request: {exc}"))
            self.held_bytes -= entry.size
            self.decoded_count += 1
            ready += self._release(entry.peer_key)
        self._hand_out()
        return ready

    def check(self, now: float) -> list[tuple[object, DecodedBody]]:
        """Every _CHECK_PROCESSES_EVERY_S while bodies are held: a decode process that died
        answers its body internal_error (the rest wait for a new process)."""
        if not self._by_peer or now < self._next_check:
            return []
        self._next_check = now + _CHECK_PROCESSES_EVERY_S
        ready: list[tuple[object, DecodedBody]] = []
        for decoder in list(self._decoders.values()):
            code = decoder.process.poll()
            if code is None:
                continue
            del self._decoders[decoder.identity]
            if not decoder.ready:
                self._failed_starts += 1
            entry = self._in_decoder.pop(decoder.holding, None) if decoder.holding is not None else None
            log.error("decode process %s (pid %d) exited with %s%s", decoder.identity.decode(),
                      decoder.process.pid, code,
                      f" while decoding a {entry.size / 2**20:.1f} MB body" if entry else "")
            if entry is not None:
                entry.decoded = DecodedBody(
                    _codec_of(entry.request.body), body_bytes=entry.size,
                    error=ProtocolError(C.INTERNAL_ERROR, f"the decode process died (exit {code}) "
                                                          "while decoding this request"))
                self.held_bytes -= entry.size
                ready += self._release(entry.peer_key)
        if self._failed_starts >= _MAX_FAILED_STARTS:
            ready += self._refuse_waiting(f"{self._failed_starts} decode processes in a row "
                                          "exited before they were ready (see the log)")
            self._failed_starts = 0
        self._hand_out()
        return ready

    def _refuse_waiting(self, why: str) -> list[tuple[object, DecodedBody]]:
        ready: list[tuple[object, DecodedBody]] = []
        waiting, self._waiting = self._waiting, []
        for _, _, entry in waiting:
            entry.frame = None
            entry.decoded = DecodedBody(_codec_of(entry.request.body),
                                        body_bytes=entry.size, error=ProtocolError(
                                            C.INTERNAL_ERROR, f"cannot decode request: {why}"))
            self.held_bytes -= entry.size
        for _, _, entry in waiting:
            ready += self._release(entry.peer_key)
        return ready

    @property
    def busy(self) -> bool:
        return bool(self._by_peer)

    def close(self) -> None:
        for decoder in self._decoders.values():
            if decoder.process.poll() is None:
                decoder.process.kill()
        for decoder in self._decoders.values():
            try:
                decoder.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.error("decode process %d did not exit", decoder.process.pid)
        self._decoders.clear()
        self.socket.close(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)

    # --- inside --------------------------------------------------------------------------------------
    def _release(self, key: tuple) -> list[tuple[object, DecodedBody]]:
        queue = self._by_peer.get(key)
        out = []
        while queue and queue[0].decoded is not None:
            entry = queue.popleft()
            out.append((entry.request, entry.decoded))
        if queue is not None and not queue:
            del self._by_peer[key]
        return out

    def _hand_out(self) -> None:
        """Waiting bodies (smallest first) to idle decode processes; start processes as needed."""
        if not self._waiting:
            return
        lanes = [d.small_only for d in self._decoders.values()]
        if lanes.count(False) < self.max_processes:
            self._start_decoder(small_only=False)
        if True not in lanes:   # started with the first: ready before a small body comes
            self._start_decoder(small_only=True)
        for decoder in self._decoders.values():
            if not self._waiting:
                return
            if not decoder.ready or decoder.holding is not None:
                continue
            if decoder.small_only and self._waiting[0][0] > SMALL_LANE_MAX_BYTES:
                continue
            _, seq, entry = heapq.heappop(self._waiting)
            try:
                self.socket.send_multipart([decoder.identity, _SEQ.pack(seq),
                                            struct.pack("!I", entry.request.body_frames),
                                            entry.frame], copy=False)
            except zmq.ZMQError:   # gone (ROUTER_MANDATORY): check() answers for it
                heapq.heappush(self._waiting, (entry.size, seq, entry))
                decoder.ready = False
                continue
            entry.frame = None
            decoder.holding = seq
            self._in_decoder[seq] = entry

    def _start_decoder(self, small_only: bool) -> None:
        identity = f"decode-{next(self._names)}{'-small' if small_only else ''}".encode()
        argv = [sys.executable, "-m", "broker.decode_stage", "--connect", self.endpoint,
                "--identity", identity.decode(), "--parent-pid", str(os.getpid())]
        if self._settings["default_model_base"]:
            argv += ["--default-model-base", self._settings["default_model_base"]]
        if self._settings["allow_pickle"]:
            argv.append("--allow-pickle")
        if self._state_dir:
            argv += ["--state-dir", self._state_dir]
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        self._decoders[identity] = _Decoder(identity, process, small_only)
        log.info("decode process %s started (pid %d) for bodies over %d KB%s",
                 identity.decode(), process.pid, INLINE_DECODE_MAX_BYTES // 1024,
                 f" up to {SMALL_LANE_MAX_BYTES // 2**20} MB" if small_only else "")


# --- the decode process ------------------------------------------------------------------------------
def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL when the thread that started us ends (Linux, runtime.parent_watch); elsewhere
    the poll loop checks the parent pid."""
    from runtime.parent_watch import set_parent_death_signal

    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:
        sys.exit(0)


def _stage_for_journal(state_dir: str, name: str, body: bytes,
                       decoded: DecodedBody) -> DecodedBody:
    """Write a valid generation body for the journal (broker.staged_bodies), here rather than
    on the loop; a full disk refuses the request as the journal would (`unavailable`)."""
    from broker import staged_bodies
    try:
        decoded.journal_body = staged_bodies.write(state_dir, name, body)
    except OSError as exc:
        log.error("cannot stage a %.1f MB body for the journal: %s", len(body) / 2**20, exc)
        parsed = decoded.parsed
        return DecodedBody(decoded.codec, body_bytes=decoded.body_bytes,
                           reply_type=parsed.reply_type, request_id=parsed.request_id,
                           error=ProtocolError(C.UNAVAILABLE, (
                               f"the broker cannot take jobs right now: its journal could not "
                               f"store the request ({exc}). Nothing was queued; send the same "
                               f"request again later")))
    return decoded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a broker decode process (started by the broker)")
    parser.add_argument("--connect", required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--default-model-base")
    parser.add_argument("--allow-pickle", action="store_true")
    parser.add_argument("--state-dir", help="write valid generation bodies here for the journal")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s decode %(levelname)s %(message)s")
    _die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the broker stops us (Ctrl-C reaches the group)
    try:   # background work: on a busy machine the broker loop and the workers come first
        os.nice(_NICENESS)
    except (OSError, AttributeError):   # no os.nice on Windows
        pass
    request_parser()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, args.identity.encode())
    sock.connect(args.connect)
    sock.send(_READY)
    settings = {"default_model_base": args.default_model_base, "allow_pickle": args.allow_pickle}
    try:
        while True:
            if not sock.poll(1000):
                if os.getppid() != args.parent_pid:
                    return 0
                continue
            seq, frames, body = sock.recv_multipart()
            started = time.monotonic()
            decoded = decode_body(body, struct.unpack("!I", frames)[0], **settings)
            if args.state_dir and decoded.parsed is not None and decoded.parsed.job is not None:
                decoded = _stage_for_journal(args.state_dir, f"{args.identity}-{os.getpid()}-"
                                             f"{_SEQ.unpack(seq)[0]}-{time.time_ns()}", body, decoded)
            del body
            sock.send_multipart([seq, decoded.to_wire()])
            took_s = time.monotonic() - started
            if took_s > 1.0:
                log.warning("decoding a %.1f MB body took %.1f s", decoded.body_bytes / 2**20, took_s)
    finally:
        sock.close(linger=1000)
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
