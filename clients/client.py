"""Python client for the sdxl-broker frontend (CONTRACT.md), sync and asyncio.

    with BrokerClient("tcp://127.0.0.1:5555") as client:
        result = client.generate(prompt="a red fox", model_base="tiny-sdxl", steps=4,
                                 width=256, height=256, on_progress=print)
        result.images[0].pil().save("fox.png")

Sends any of the three generation forms as a ready-made body (`client.request(body)`), or a
plain keyword call (`generate(prompt=..., ...)`, flat `generate_sdxl_enhanced` field names).

Reliability, the same for both clients (`_Exchange` holds the rules, the two clients only do
the socket calls):
- First contact fails fast. A broker answers a query at once and acknowledges an accepted
  generation at once with a `queued` progress event (`generate` always asks for progress). So
  when nothing arrives within `connect_timeout_s` (default 5 s, $SDXL_BROKER_CONNECT_TIMEOUT_S),
  the request fails with BrokerUnavailable naming the endpoint and what the socket saw: nothing
  listening, or a refused CURVE handshake. When the socket did connect (a peer is there, maybe
  a loaded broker), it waits up to `timeout_s` in all before failing as "connected but silent". A body a
  broker may take minutes to answer (a model load) is preceded by a status query for that check.
- After that, Lazy Pirate: each request has its own DEALER socket; after `timeout_s` without
  any message from the broker, the socket is closed (linger 0) and the *same* frame, same
  `request_id`, goes again on a fresh one. The broker attaches a resend to the running job and
  answers it at once with the job's current stage (or the stored reply, after a restart from
  its journal), so a queued job never looks dead and a broker restart costs the caller nothing.
  Only resends that go unanswered are warned about; `retries` of them in a row give up.
- Every attempt of one request uses the same random routing identity (the broker's frontend
  hands an identity over to its newest connection), so a resend is still the connection that
  submitted the job. Without CURVE that connection owns the job: only it may cancel it, which
  `submit(...).cancel()` / `generation(...).cancel()` do on the request's own socket.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from protocol import codec
from protocol import constants as C
from protocol.request_ids import request_id_of

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = os.environ.get("SDXL_BROKER_ENDPOINT", "tcp://127.0.0.1:5555")
# how long a first contact may stay unanswered before the request fails with a diagnosis
DEFAULT_CONNECT_TIMEOUT_S = float(os.environ.get("SDXL_BROKER_CONNECT_TIMEOUT_S", "5"))
ProgressCallback = Callable[[dict], None]


class ClientError(Exception):
    """Base class of the client's exceptions."""


class BrokerUnavailable(ClientError):
    """No message from the broker after every retry."""


class RequestFailed(ClientError):
    """The broker answered with success: false."""

    def __init__(self, reply: dict):
        self.reply = reply
        self.code: str | None = reply.get("error_code")
        self.errors: list[dict] = list(reply.get("errors") or [])
        super().__init__(f"{self.code}: {reply.get('error')}")


# --- results --------------------------------------------------------------------------------
@dataclass
class GeneratedImage:
    index: int
    seed: int | None
    width: int | None
    height: int | None
    format: str | None
    path: str | None          # where the worker saved it (on the broker's host)
    sha256: str | None
    data: bytes | None = None  # the encoded image, when return_images was true

    def bytes(self) -> bytes:
        """The encoded image: returned inline, else read from `path` (same host only)."""
        if self.data is not None:
            return self.data
        if self.path and os.path.exists(self.path):
            return Path(self.path).read_bytes()
        raise ClientError(f"image {self.index} was not returned inline and {self.path!r} is not "
                          "readable here; ask with return_images=True")

    def pil(self):
        from PIL import Image

        image = Image.open(io.BytesIO(self.bytes()))
        image.load()
        return image


@dataclass
class GenerationResult:
    reply: dict
    images: list[GeneratedImage] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.reply.get("request_id")

    @property
    def metrics(self) -> dict:
        return (self.reply.get("data") or {}).get("processing_metrics") or {}

    @property
    def warnings(self) -> list[str]:
        return list(self.reply.get("warnings") or [])

    @classmethod
    def from_reply(cls, reply: dict) -> "GenerationResult":
        images = []
        for item in (reply.get("data") or {}).get("generated_images") or []:
            data = item.get("image")
            if isinstance(data, str):  # JSON replies carry base64
                data = base64.b64decode(data)
            images.append(GeneratedImage(
                index=item.get("index", len(images)), seed=item.get("seed"),
                width=item.get("width"), height=item.get("height"), format=item.get("format"),
                path=item.get("path"), sha256=item.get("sha256"), data=data))
        return cls(reply=reply, images=images)


# --- building bodies ------------------------------------------------------------------------
_IMAGE_FIELDS = ("init_image", "mask_image")


def image_input(value: Any) -> bytes | str:
    """An image input as the wire wants it: bytes stay bytes (msgpack binary), a PIL image is
    PNG-encoded, a pathlib.Path is read here (a local file), a str is left alone (a path under
    the broker's input root, or base64)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, Path):
        return value.read_bytes()
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(value, str):
        return value
    raise TypeError(f"cannot send {type(value).__name__} as an image")


def generation_body(**fields: Any) -> dict:
    """A flat `generate_sdxl_enhanced` body from keyword fields (CONTRACT.md field names).
    Image fields accept bytes, PIL images, pathlib.Path (read locally) or str."""
    body: dict = {"message_type": C.GENERATE_FLAT}
    for key, value in fields.items():
        if value is None:
            continue
        if key in _IMAGE_FIELDS:
            value = image_input(value)
        elif key == "controlnet_images":
            value = [image_input(v) for v in value]
        body[key] = value
    body.setdefault("request_id", fields.get("session_id") or uuid.uuid4().hex)
    return body


def load_body(model_name: str, device: str | None = None) -> dict:
    data = {"model_name": model_name}
    if device:
        data["device"] = device
    return {"message_type": C.MODEL_LOAD, "data": data}


def cleanup_body(workers: list[str] | None = None, models: list[str] | None = None) -> dict:
    data: dict = {}
    if workers:
        data["workers"] = list(workers)
    if models:
        data["models"] = list(models)
    return {"message_type": C.CLEANUP, "data": data}


def cancel_body(request_id: str) -> dict:
    # the target in data; the envelope's own request_id is fresh so it never clashes with the job's
    return {"message_type": C.CANCEL, "request_id": uuid.uuid4().hex,
            "data": {"request_id": request_id}}


def _request_id_of(body: dict) -> str | None:
    """The id the broker will answer this body with (one decider for both sides)."""
    return request_id_of(body)


def _ensure_request_id(body: dict) -> dict:
    """Every request needs a stable id so a resend is recognised as the same request."""
    if _request_id_of(body):
        return body
    body = dict(body)
    body["request_id"] = uuid.uuid4().hex
    return body


def _wants_stream(body: dict) -> bool:
    if body.get("stream"):
        return True
    data = body.get("data")
    if isinstance(data, dict) and isinstance(data.get("metadata"), dict):
        return bool(data["metadata"].get("stream"))
    return False


def _with_stream(body: dict) -> dict:
    """Ask for progress unless the caller decided. Progress keeps the silence timer alive."""
    if "stream" in body or _wants_stream(body):
        return body
    if body.get("message_type") == C.GENERATE_NESTED and isinstance(body.get("data"), dict):
        data = dict(body["data"])
        metadata = dict(data.get("metadata") or {})
        if "stream" in metadata:
            return body
        metadata["stream"] = True
        data["metadata"] = metadata
        return {**body, "data": data}
    return {**body, "stream": True}


def _is_final(message: dict) -> bool:
    return message.get("final", True) and message.get("message_type") != C.PROGRESS


# management queries a live broker answers at once; anything else (a model load, cleanup, a
# generation that does not ask for progress) may take minutes before its one reply
_ANSWERED_AT_ONCE = frozenset({C.STATUS, C.STATUS_LEGACY, C.INITIALIZE, C.CANCEL,
                               C.LIST_MODELS, C.LIST_QUEUE, C.LIST_HISTORY})


def _answered_at_once(body: dict) -> bool:
    """True when a live broker answers this body within moments: a query replies at once, and
    an accepted generation that asks for progress is acknowledged with a `queued` event."""
    kind = body.get("message_type") or body.get("action")
    if kind in C.GENERATION_TYPES:
        return _wants_stream(body)
    return kind in _ANSWERED_AT_ONCE


_HANDSHAKE_FAILED = frozenset({zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                               zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                               zmq.EVENT_HANDSHAKE_FAILED_AUTH})
_WATCHED_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                   | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                   | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class _Exchange:
    """One request's reliability rules, without sockets: the sync and asyncio clients tell it
    what happened (a frame arrived, a socket event, silence) and do what it says.

    - First contact: until the broker has said anything, the wait is `connect_timeout_s`; then
      the request fails at once with what the socket saw (nothing listening, a refused CURVE
      handshake, a silent peer), never after minutes of resends.
    - Once the broker has answered, the wait is `timeout_s` of silence since its last message.
      Then the same frame goes again on a fresh socket (Lazy Pirate): a live broker answers a
      resent generation at once with its current stage, so only a resend that also goes
      unanswered is worth a warning, and `retries` of those in a row give up."""

    def __init__(self, client: "_ClientBase", body: dict, timeout_s: float | None,
                 retries: int | None):
        body = _ensure_request_id(body)
        self.body = body
        self.endpoint = client.endpoint
        self.uses_curve = client.uses_curve
        self.request_id = _request_id_of(body)
        self.frame = codec.encode(body, client.codec_name)
        self.timeout_s = client.timeout_s if timeout_s is None else timeout_s
        self.retries = client.retries if retries is None else retries
        self.connect_timeout_s = client.connect_timeout_s
        # the routing identity of every attempt: random (a hostile client cannot guess it, as it
        # can ZeroMQ's counter-made ones), never starting with a zero byte (reserved by ZeroMQ)
        self.identity = b"\x01" + os.urandom(15)
        self.heard = False          # the broker has answered this request (or a ping before it)
        self.patient = False        # connected, so a slow first answer gets up to timeout_s
        self.unanswered = 0         # resends in a row that got nothing back
        self.events: set[int] = set()   # socket events seen while making first contact

    @property
    def needs_ping(self) -> bool:
        """A body a live broker may take minutes to answer is preceded by a status query, so
        first contact is still checked within connect_timeout_s."""
        return not self.heard and not _answered_at_once(self.body)

    @property
    def watching(self) -> bool:
        return not self.heard

    def wait_s(self) -> float:
        if self.heard:
            return self.timeout_s
        if self.patient:
            return max(self.timeout_s - self.connect_timeout_s, 0.0)
        return self.connect_timeout_s

    def accept(self, payload: bytes) -> dict | None:
        """The decoded reply if it answers this request, else None (a broken frame or another
        request's late reply is logged or skipped, never raised)."""
        message = _decode_reply(payload)
        if message is None or not self.owns(message):
            return None
        return message

    def owns(self, message: dict) -> bool:
        """True (and the broker counts as heard) when a decoded message answers this request."""
        if not _matches(message, self.request_id):
            return False
        self.heard = True
        self.unanswered = 0
        return True

    def note_event(self, event: int) -> None:
        self.events.add(event)

    def silence(self) -> str:
        """wait_s passed with nothing from the broker. Raises BrokerUnavailable when it was
        never reached, or stopped answering. Returns "wait" when the socket did connect (a
        loaded broker may answer late: keep waiting, up to timeout_s in all, same socket), else
        "resend" (the caller resends on a fresh socket)."""
        if not self.heard:
            if (zmq.EVENT_HANDSHAKE_SUCCEEDED in self.events and not self.patient
                    and self.timeout_s > self.connect_timeout_s):
                self.patient = True
                log.debug("connected to %s but no answer in %.1fs; waiting up to %.1fs",
                          self.endpoint, self.connect_timeout_s, self.timeout_s)
                return "wait"
            raise BrokerUnavailable(self.first_contact_failure())
        if self.unanswered >= self.retries:
            raise BrokerUnavailable(
                f"the broker at {self.endpoint} stopped answering request {self.request_id}: "
                f"nothing for {self.timeout_s:g}s, then no answer to {self.retries} resends "
                f"(is it still running?)")
        self.unanswered += 1
        # the first resend is the routine "still there?" after a quiet spell (a long model
        # load): a live broker answers it at once, so only later ones deserve a warning
        level = logging.DEBUG if self.unanswered == 1 else logging.WARNING
        log.log(level, "no message from %s for %.1fs; resending request %s (%d/%d)",
                self.endpoint, self.timeout_s, self.request_id, self.unanswered, self.retries)
        return "resend"

    def first_contact_failure(self) -> str:
        where = self.endpoint
        waited = f"{max(self.timeout_s, self.connect_timeout_s) if self.patient else self.connect_timeout_s:g}s"
        if zmq.EVENT_HANDSHAKE_FAILED_AUTH in self.events:
            return (f"the broker at {where} refused this client's CURVE key: copy the client's "
                    "public key (client.key) into the broker's --curve-allowed-keys folder")
        if self.events & _HANDSHAKE_FAILED:
            if self.uses_curve:
                return (f"the CURVE handshake with {where} failed: --curve-server-key is not this "
                        "broker's public key, or the broker does not use CURVE")
            return (f"{where} refused a plain connection: the broker probably uses CURVE; pass "
                    "--curve-server-key FILE --curve-client-key FILE (made by `sdxl-broker keys`)")
        if self.events & {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_CONNECTED}:
            return (f"{where} accepted the connection but did not answer within {waited}: is it "
                    "the broker's frontend (not its --backend, not another program), and is the "
                    "broker overloaded? (--timeout-s waits longer)")
        if zmq.EVENT_CONNECT_RETRIED in self.events:
            return (f"nothing is listening at {where}: is `sdxl-broker serve` (or `broker`) "
                    "running, and is --endpoint / $SDXL_BROKER_ENDPOINT right?")
        return (f"no answer from {where} within {waited} and no connection made: is the host "
                "reachable (address, firewall)? is a broker running there? if it uses CURVE, "
                "pass --curve-server-key and --curve-client-key")


def _decode_reply(payload: bytes) -> dict | None:
    try:
        message, _ = codec.decode(payload)
    except Exception as exc:  # a broken reply must not kill the caller's loop
        log.warning("ignoring undecodable reply frame: %s", exc)
        return None
    return message if isinstance(message, dict) else None


def _matches(message: dict, request_id: str | None) -> bool:
    # an attach to a job may echo the job's id; a reply without id is still for us (one
    # request per socket), e.g. malformed_message
    rid = message.get("request_id")
    return request_id is None or rid is None or rid == request_id


class _Connection:
    """One DEALER for one attempt of one request, plus a monitor socket while first contact is
    not made yet (its events explain a failure), and the deadline of the current wait."""

    def __init__(self, client: "_ClientBase", exchange: _Exchange, poller_class):
        self.sock = client._context.socket(zmq.DEALER)
        client._configure(self.sock)
        self.sock.setsockopt(zmq.IDENTITY, exchange.identity)
        self.monitor = self.sock.get_monitor_socket(_WATCHED_EVENTS) if exchange.watching else None
        self.sock.connect(client.endpoint)
        self.poller = poller_class()
        self.poller.register(self.sock, zmq.POLLIN)
        if self.monitor is not None:
            self.poller.register(self.monitor, zmq.POLLIN)
        self.deadline = time.monotonic() + exchange.wait_s()

    def remaining_ms(self) -> int:
        return max(int((self.deadline - time.monotonic()) * 1000), 0)

    def heard(self, exchange: _Exchange) -> None:
        """The broker answered: stop watching the socket, and wait timeout_s from now."""
        self.deadline = time.monotonic() + exchange.wait_s()
        self._stop_monitor()

    def _stop_monitor(self) -> None:
        if self.monitor is not None:
            self.poller.unregister(self.monitor)
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None

    def close(self) -> None:
        self._stop_monitor()
        self.sock.close(linger=0)


def _event_of(frames: list) -> int:
    return parse_monitor_message(frames)["event"]


# --- what both clients offer ----------------------------------------------------------------
class _ClientBase:
    """Configuration and socket set-up shared by the sync and asyncio clients."""

    def __init__(self, endpoint: str, *, timeout_s: float, retries: int,
                 connect_timeout_s: float, codec_name: str,
                 curve_server_key: bytes | None, curve_client_keys: tuple[bytes, bytes] | None,
                 context: zmq.Context):
        if codec_name not in (C.CODEC_JSON, C.CODEC_MSGPACK):
            raise ValueError(f"codec_name must be json or msgpack, not {codec_name!r}")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retries = retries
        self.connect_timeout_s = connect_timeout_s
        self.codec_name = codec_name
        self._curve_server_key = curve_server_key
        self._curve_client_keys = curve_client_keys
        self._context = context

    @property
    def uses_curve(self) -> bool:
        return self._curve_server_key is not None

    @classmethod
    def with_curve(cls, endpoint: str, server_public_file: str, client_secret_file: str,
                   **kwargs: Any):
        """A client that talks CURVE to a broker, from files made by `sdxl-broker keys`."""
        from runtime.curve import client_keys

        server_key, pair = client_keys(server_public_file, client_secret_file)
        return cls(endpoint, curve_server_key=server_key, curve_client_keys=pair, **kwargs)

    def _configure(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve_server_key is not None:
            public, secret = self._curve_client_keys or zmq.curve_keypair()
            sock.curve_serverkey = self._curve_server_key
            sock.curve_publickey = public
            sock.curve_secretkey = secret

    # --- the conveniences: each builds a body and says how to read the reply; `_call` is
    # synchronous in BrokerClient and returns an awaitable in AsyncBrokerClient ---------------
    def generate(self, body: dict | None = None, /, *, on_progress: ProgressCallback | None = None,
                 raise_on_error: bool = True, timeout_s: float | None = None, **fields: Any):
        """Generate from a ready body (any of the three forms) or keyword fields (flat form).
        Raises RequestFailed when the broker reports a failure (unless raise_on_error=False)."""
        def result(reply: dict) -> GenerationResult:
            if raise_on_error and not reply.get("success"):
                raise RequestFailed(reply)
            return GenerationResult.from_reply(reply)
        return self._call(_generation_request(body, fields), result, on_progress=on_progress,
                          timeout_s=timeout_s)

    def status(self):
        return self._call({"message_type": C.STATUS}, _data_or_raise)

    def initialize(self):
        return self._call({"message_type": C.INITIALIZE}, _data_or_raise)

    def load_model(self, model_name: str, device: str | None = None, *,
                   timeout_s: float | None = None):
        return self._call(load_body(model_name, device), _data_or_raise, timeout_s=timeout_s)

    def cleanup(self, workers: list[str] | None = None, models: list[str] | None = None):
        return self._call(cleanup_body(workers, models), _data_or_raise)

    def cancel(self, request_id: str, *, timeout_s: float | None = None):
        """Cancel a job from a new connection: allowed under CURVE for the job's key or an admin
        key, and on the broker's --local-frontend; without CURVE the broker refuses another
        connection's job (`forbidden`) unless it runs with --allow-local-cancel. The connection
        that submitted a job cancels it with `generation(...).cancel()` / `submit(...).cancel()`."""
        return self._call(cancel_body(request_id), _data_or_raise, timeout_s=timeout_s)

    def list_models(self):
        """Every model each worker can load, by kind, with sizes and whether loaded; the pool's
        view by kind; scheduler names (reply.list_models.json)."""
        return self._call({"message_type": C.LIST_MODELS}, _data_or_raise)

    def list_queue(self, include_prompts: bool = False):
        """Queued and running jobs: request id, priority, position, worker, stage, step, age;
        with `include_prompts`, the first 200 characters of each job's prompt."""
        body: dict = {"message_type": C.LIST_QUEUE}
        if include_prompts:
            body["data"] = {"include_prompts": True}
        return self._call(body, _data_or_raise)

    def list_history(self, limit: int = C.DEFAULT_HISTORY_LIMIT):
        """Recent finished jobs, newest first, within the broker's reply TTL."""
        return self._call({"message_type": C.LIST_HISTORY, "data": {"limit": int(limit)}},
                          _data_or_raise)

    def _call(self, body: dict, read: Callable[[dict], Any], **options: Any):
        raise NotImplementedError


def _generation_request(body: dict | None, fields: dict) -> dict:
    """A generation body from a ready body or flat keyword fields, asking for progress."""
    if body is None:
        body = generation_body(**fields)
    elif fields:
        raise TypeError("pass either a body or keyword fields, not both")
    return _with_stream(body)


def _data_or_raise(reply: dict) -> dict:
    if not reply.get("success"):
        raise RequestFailed(reply)
    return reply.get("data") or {}


def _ping_body() -> dict:
    return {"message_type": C.STATUS, "request_id": uuid.uuid4().hex}


# --- one request in flight, able to cancel itself -------------------------------------------
class _SubmissionState:
    """What a submission has read, shared by the sync and asyncio forms: the request's own
    messages in order, the final reply once seen, and the replies to cancels it sent."""

    def __init__(self, client: "_ClientBase", body: dict, timeout_s: float | None,
                 retries: int | None):
        self._client = client
        self.exchange = _Exchange(client, body, timeout_s, retries)
        self.request_id = self.exchange.request_id
        self.final: dict | None = None      # the request's final reply, once read
        self._link: _Connection | None = None
        self._inbox: deque[dict] = deque()  # the request's messages not handed out yet
        self._cancels: dict[str, dict | None] = {}   # cancel request id -> its reply, once read
        self._closed = False

    def _dispatch(self, link: _Connection, payload: bytes) -> None:
        message = _decode_reply(payload)
        if message is None:
            return
        rid = message.get("request_id")
        if rid is not None and rid in self._cancels:
            self._cancels[rid] = message
            link.heard(self.exchange)
        elif self.exchange.owns(message):
            link.heard(self.exchange)
            self._inbox.append(message)
            if _is_final(message):
                self.final = message

    def _cancel_frame(self) -> tuple[str, bytes]:
        body = cancel_body(self.request_id)
        self._cancels[body["request_id"]] = None
        return body["request_id"], codec.encode(body, self._client.codec_name)

    def _cancel_done(self, cancel_id: str, timeout_s: float | None) -> dict:
        """The cancel's reply, forgotten here; BrokerUnavailable when none came (timeout_s None:
        the wait was given up on for another error, which the caller raises)."""
        reply = self._cancels.pop(cancel_id, None)
        if self._closed and not self._cancels:
            self._close_link()
        if reply is None and timeout_s is not None:
            raise BrokerUnavailable(f"the broker at {self.exchange.endpoint} did not answer the "
                                    f"cancel of request {self.request_id} within {timeout_s:g}s")
        return reply

    @property
    def open(self) -> bool:
        """Not closed: it can still be read and cancelled."""
        return not self._closed

    def close(self) -> None:
        """Close the socket (at once, or when the cancels still waiting for a reply are done)."""
        self._closed = True
        if not self._cancels:
            self._close_link()

    def _close_link(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    @staticmethod
    def _wait_ms(link: _Connection, deadline: float | None) -> int:
        if deadline is None:
            return link.remaining_ms()
        return min(link.remaining_ms(), max(int((deadline - time.monotonic()) * 1000), 0))

    def _after_silence(self) -> bool:
        """The link's wait ran out: True when the request goes again on a fresh socket (Lazy
        Pirate; raises BrokerUnavailable to give up), False to keep waiting on this one."""
        if self.final is not None:   # only a cancel's reply is awaited: its caller's deadline
            return False
        if self.exchange.silence() == "wait":
            self._link.deadline = time.monotonic() + self.exchange.wait_s()
            return False
        self._link.close()
        self._link = _Connection(self._client, self.exchange, self._poller_class)
        return True

    _poller_class: Any = zmq.Poller


class Submission(_SubmissionState):
    """One request in flight on its own DEALER socket (`BrokerClient.submit`), open until closed.
    Iterate it for the progress events and then the final reply (with the Lazy Pirate resends
    of `BrokerClient.stream`); `cancel()` sends a cancel_request for it on the same socket,
    which the broker lets the submitting connection do without CURVE. Not thread-safe: use it
    from one thread (a Ctrl-C handler in that thread is fine)."""

    def _ensure_link(self) -> _Connection:
        if self._closed:
            raise ClientError(f"request {self.request_id}: the submission is closed")
        if self._link is None:
            if self.exchange.needs_ping:
                self._client.request(_ping_body(), timeout_s=self.exchange.timeout_s,
                                     retries=self.exchange.retries)
                self.exchange.heard = True
            self._link = _Connection(self._client, self.exchange, zmq.Poller)
            self._link.sock.send_multipart([b"", self.exchange.frame])
        return self._link

    def __iter__(self) -> "Submission":
        return self

    def __next__(self) -> dict:
        while not self._inbox:
            if self.final is not None or self._closed:
                raise StopIteration
            self._step(None)
        return self._inbox.popleft()

    def _step(self, deadline: float | None) -> None:
        """Wait for one thing (a message, a socket event, the end of a wait) and handle it."""
        link = self._ensure_link()
        ready = dict(link.poller.poll(self._wait_ms(link, deadline)))
        if link.monitor is not None and link.monitor in ready:
            self.exchange.note_event(_event_of(link.monitor.recv_multipart()))
        elif link.sock in ready:
            self._dispatch(link, link.sock.recv_multipart()[-1])
        elif link.remaining_ms() <= 0 and self._after_silence():
            self._link.sock.send_multipart([b"", self.exchange.frame])

    def cancel(self, timeout_s: float = 5.0) -> dict:
        """Cancel this request on its own socket; return the broker's cancel_response (check
        `success`: a job that had just finished is `validation_error`). The request's own
        messages read meanwhile (its `cancelled` final reply) stay for iteration. Raises
        BrokerUnavailable when no answer comes within timeout_s."""
        link = self._ensure_link()
        cancel_id, frame = self._cancel_frame()
        deadline = time.monotonic() + timeout_s
        try:
            link.sock.send_multipart([b"", frame])
            while self._cancels.get(cancel_id) is None and time.monotonic() < deadline:
                self._step(deadline)
        except BaseException:
            self._cancel_done(cancel_id, None)
            raise
        return self._cancel_done(cancel_id, timeout_s)

    def __enter__(self) -> "Submission":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncSubmission(_SubmissionState):
    """`Submission` for asyncio (`AsyncBrokerClient.submit`): `async for` its messages in one
    task while another task may `await cancel()`; whichever waits reads the socket (one at a
    time) and hands the other what is its."""

    _poller_class = zmq.asyncio.Poller

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._reading = asyncio.Lock()   # one coroutine reads the socket at a time
        self._opening = asyncio.Lock()

    async def _ensure_link(self) -> _Connection:
        if self._closed and not self._cancels:
            raise ClientError(f"request {self.request_id}: the submission is closed")
        async with self._opening:
            if self._link is None:
                if self.exchange.needs_ping:
                    await self._client.request(_ping_body(), timeout_s=self.exchange.timeout_s,
                                               retries=self.exchange.retries)
                    self.exchange.heard = True
                self._link = _Connection(self._client, self.exchange, zmq.asyncio.Poller)
                await self._link.sock.send_multipart([b"", self.exchange.frame])
        return self._link

    def __aiter__(self) -> "AsyncSubmission":
        return self

    async def __anext__(self) -> dict:
        while not self._inbox:
            if self.final is not None or self._closed:
                raise StopAsyncIteration
            async with self._reading:
                if not self._inbox and self.final is None:
                    await self._step(None)
        return self._inbox.popleft()

    async def _step(self, deadline: float | None) -> None:
        link = await self._ensure_link()
        ready = dict(await link.poller.poll(self._wait_ms(link, deadline)))
        if link.monitor is not None and link.monitor in ready:
            self.exchange.note_event(_event_of(await link.monitor.recv_multipart()))
        elif link.sock in ready:
            self._dispatch(link, (await link.sock.recv_multipart())[-1])
        elif link.remaining_ms() <= 0 and self._after_silence():
            await self._link.sock.send_multipart([b"", self.exchange.frame])

    async def cancel(self, timeout_s: float = 5.0) -> dict:
        """As Submission.cancel. A task iterating this submission meanwhile gets the request's
        messages as usual (its `cancelled` final reply among them)."""
        link = await self._ensure_link()
        cancel_id, frame = self._cancel_frame()
        deadline = time.monotonic() + timeout_s
        try:
            await link.sock.send_multipart([b"", frame])
            while self._cancels.get(cancel_id) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:   # a reader holding the socket hands the reply over, or lets go of it
                    await asyncio.wait_for(self._reading.acquire(), remaining)
                except asyncio.TimeoutError:
                    break
                try:
                    if self._cancels.get(cancel_id) is None:
                        await self._step(deadline)
                finally:
                    self._reading.release()
        except BaseException:
            self._cancel_done(cancel_id, None)
            raise
        return self._cancel_done(cancel_id, timeout_s)


# --- the sync client ------------------------------------------------------------------------
class BrokerClient(_ClientBase):
    """Blocking client. Thread-safe: every request uses its own socket."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, timeout_s: float = 30.0,
                 retries: int = 3, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 codec_name: str = C.CODEC_MSGPACK, curve_server_key: bytes | None = None,
                 curve_client_keys: tuple[bytes, bytes] | None = None,
                 context: zmq.Context | None = None):
        self._own_context = context is None
        super().__init__(endpoint, timeout_s=timeout_s, retries=retries,
                         connect_timeout_s=connect_timeout_s, codec_name=codec_name,
                         curve_server_key=curve_server_key, curve_client_keys=curve_client_keys,
                         context=context or zmq.Context())

    def submit(self, body: dict, *, timeout_s: float | None = None,
               retries: int | None = None) -> Submission:
        """Send one request and keep its socket: iterate the Submission for its messages (the
        final reply last), `cancel()` it on that socket, close it (or use `with`)."""
        return Submission(self, body, timeout_s, retries)

    def generation(self, body: dict | None = None, /, *, timeout_s: float | None = None,
                   **fields: Any) -> Submission:
        """`submit` for a generation (a body or flat keyword fields, asking for progress as
        `generate` does): the handle to follow it and to cancel it, e.g. on Ctrl-C."""
        return self.submit(_generation_request(body, fields), timeout_s=timeout_s)

    def stream(self, body: dict, *, timeout_s: float | None = None,
               retries: int | None = None) -> Iterator[dict]:
        """Send one request; yield every progress event, then the final reply (last item).
        Raises BrokerUnavailable when the broker cannot be reached or stops answering."""
        with self.submit(body, timeout_s=timeout_s, retries=retries) as submission:
            yield from submission

    def request(self, body: dict, *, on_progress: ProgressCallback | None = None,
                timeout_s: float | None = None, retries: int | None = None) -> dict:
        """Send any request body (any form, any message type); return its final reply dict."""
        final = None
        for message in self.stream(body, timeout_s=timeout_s, retries=retries):
            if message.get("message_type") == C.PROGRESS:
                if on_progress is not None:
                    on_progress(message)
            else:
                final = message
        return final

    def _call(self, body: dict, read: Callable[[dict], Any], *,
              on_progress: ProgressCallback | None = None, timeout_s: float | None = None):
        return read(self.request(body, on_progress=on_progress, timeout_s=timeout_s))

    def close(self) -> None:
        if self._own_context:
            self._context.destroy(linger=0)  # closes any socket an abandoned stream left open

    def __enter__(self) -> "BrokerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the asyncio client -----------------------------------------------------------------------
class AsyncBrokerClient(_ClientBase):
    """The same client for asyncio: `await client.generate(...)`, `await client.status()`,
    `async for m in client.stream(body)`. Many requests may run concurrently (one socket each)."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, timeout_s: float = 30.0,
                 retries: int = 3, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 codec_name: str = C.CODEC_MSGPACK, curve_server_key: bytes | None = None,
                 curve_client_keys: tuple[bytes, bytes] | None = None,
                 context: zmq.asyncio.Context | None = None):
        self._own_context = context is None
        super().__init__(endpoint, timeout_s=timeout_s, retries=retries,
                         connect_timeout_s=connect_timeout_s, codec_name=codec_name,
                         curve_server_key=curve_server_key, curve_client_keys=curve_client_keys,
                         context=context or zmq.asyncio.Context())

    def submit(self, body: dict, *, timeout_s: float | None = None,
               retries: int | None = None) -> AsyncSubmission:
        """As BrokerClient.submit: `async for` its messages, `await cancel()`, `close()`."""
        return AsyncSubmission(self, body, timeout_s, retries)

    def generation(self, body: dict | None = None, /, *, timeout_s: float | None = None,
                   **fields: Any) -> AsyncSubmission:
        return self.submit(_generation_request(body, fields), timeout_s=timeout_s)

    async def stream(self, body: dict, *, timeout_s: float | None = None,
                     retries: int | None = None) -> AsyncIterator[dict]:
        submission = self.submit(body, timeout_s=timeout_s, retries=retries)
        try:
            async for message in submission:
                yield message
        finally:
            submission.close()

    async def request(self, body: dict, *, on_progress: ProgressCallback | None = None,
                      timeout_s: float | None = None, retries: int | None = None) -> dict:
        final = None
        async for message in self.stream(body, timeout_s=timeout_s, retries=retries):
            if message.get("message_type") == C.PROGRESS:
                if on_progress is not None:
                    result = on_progress(message)
                    if asyncio.iscoroutine(result):
                        await result
            else:
                final = message
        return final

    def _call(self, body: dict, read: Callable[[dict], Any], *,
              on_progress: ProgressCallback | None = None, timeout_s: float | None = None):
        async def call():
            return read(await self.request(body, on_progress=on_progress, timeout_s=timeout_s))
        return call()

    def close(self) -> None:
        if self._own_context:
            self._context.destroy(linger=0)

    async def __aenter__(self) -> "AsyncBrokerClient":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


# --- for the command-line tools -------------------------------------------------------------
def add_connection_arguments(parser) -> None:
    """--endpoint and the CURVE key flags every client command shares."""
    parser.add_argument("--endpoint", default=None,
                        help="broker frontend (default $SDXL_BROKER_ENDPOINT or tcp://127.0.0.1:5555)")
    parser.add_argument("--curve-server-key", default=None, metavar="FILE",
                        help="the broker's public key file (server.key from `sdxl-broker keys`) "
                             "to talk CURVE; default $SDXL_BROKER_CURVE_SERVER_KEY")
    parser.add_argument("--curve-client-key", default=None, metavar="FILE",
                        help="this client's secret key file (client.key_secret); default "
                             "$SDXL_BROKER_CURVE_CLIENT_KEY")
    parser.add_argument("--connect-timeout-s", type=float, default=DEFAULT_CONNECT_TIMEOUT_S,
                        help="fail when the broker has not answered at all within this time "
                             f"(default {DEFAULT_CONNECT_TIMEOUT_S:g}, "
                             "$SDXL_BROKER_CONNECT_TIMEOUT_S)")


def connection_from_args(args) -> dict[str, Any]:
    """The keyword arguments of BrokerClient / AsyncBrokerClient that add_connection_arguments'
    flags (and their environment variables) name: endpoint, connect timeout, CURVE keys
    (loaded from the files). ValueError for half a CURVE configuration or an unusable key file."""
    server_key = args.curve_server_key or os.environ.get("SDXL_BROKER_CURVE_SERVER_KEY")
    client_key = args.curve_client_key or os.environ.get("SDXL_BROKER_CURVE_CLIENT_KEY")
    out: dict[str, Any] = {"endpoint": args.endpoint or DEFAULT_ENDPOINT,
                           "connect_timeout_s": args.connect_timeout_s}
    if server_key or client_key:
        if not (server_key and client_key):
            raise ValueError("CURVE needs both --curve-server-key and --curve-client-key")
        from runtime.curve import client_keys

        try:
            out["curve_server_key"], out["curve_client_keys"] = client_keys(server_key, client_key)
        except OSError as exc:
            raise ValueError(f"cannot read a CURVE key file: {exc}") from None
    return out


def client_from_args(args, **kwargs: Any) -> BrokerClient:
    connection = connection_from_args(args)
    kwargs.setdefault("connect_timeout_s", connection.pop("connect_timeout_s"))
    return BrokerClient(connection.pop("endpoint"), **connection, **kwargs)
