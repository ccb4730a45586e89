"""Python client for the sdxl-broker frontend (CONTRACT.md), sync and asyncio.

    with BrokerClient("tcp://127.0.0.1:5555") as client:
        result = client.generate(prompt="a red fox", model_base="tiny-sdxl", steps=4,
                                 width=256, height=256, on_progress=print)
        result.images[0].pil().save("fox.png")

Sends any of the three generation forms as a ready-made body (`client.request(body)`), or a
plain keyword call (`generate(prompt=..., ...)`, flat `generate_sdxl_enhanced` field names).

Reliability is the Lazy Pirate pattern: each request gets its own DEALER socket; when nothing
arrives from the broker for `timeout_s`, the socket is closed (linger 0) and reopened and the
*same* body, with the same `request_id`, is sent again, up to `retries` times in a row. The
broker attaches a resend to the running job or answers it from its stored reply (and after a
restart, from its journal), so a broker restart costs the caller nothing. Any message from the
broker (a progress event too) resets the silence timer, so generations longer than
`timeout_s` are fine; `generate` asks for progress (`stream: true`) to get those messages.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import zmq
import zmq.asyncio

from protocol import codec
from protocol import constants as C

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = os.environ.get("SDXL_BROKER_ENDPOINT", "tcp://127.0.0.1:5555")
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
    return body.get("request_id") or body.get("session_id")


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


class _Exchange:
    """One request's Lazy Pirate bookkeeping, shared by the sync and asyncio clients: the
    encoded frame, which replies belong to it, and the count of silent time-outs."""

    def __init__(self, client: "BrokerClient", body: dict, timeout_s: float | None,
                 retries: int | None):
        body = _ensure_request_id(body)
        self.endpoint = client.endpoint
        self.request_id = _request_id_of(body)
        self.frame = codec.encode(body, client.codec_name)
        self.timeout_s = client.timeout_s if timeout_s is None else timeout_s
        self.retries = client.retries if retries is None else retries
        self.silent_timeouts = 0

    def accept(self, payload: bytes) -> dict | None:
        """The decoded reply if it answers this request, else None (a broken frame or another
        request's late reply is logged or skipped, never raised)."""
        try:
            message, _ = codec.decode(payload)
        except Exception as exc:  # a broken reply must not kill the caller's loop
            log.warning("ignoring undecodable reply frame: %s", exc)
            return None
        if not _matches(message, self.request_id):
            return None
        self.silent_timeouts = 0
        return message

    def silence(self) -> None:
        """No reply within timeout_s: raise BrokerUnavailable once the resends are used up;
        else the caller opens a fresh socket (it may be stuck on a dead peer) and resends
        the same frame, same request_id."""
        self.silent_timeouts += 1
        if self.silent_timeouts > self.retries:
            raise BrokerUnavailable(
                f"no reply from {self.endpoint} for request {self.request_id} after "
                f"{self.retries} resends, {self.timeout_s:.1f}s apart")
        log.warning("no reply from %s in %.1fs; resending request %s (%d/%d)", self.endpoint,
                    self.timeout_s, self.request_id, self.silent_timeouts, self.retries)


def _matches(message: dict, request_id: str | None) -> bool:
    # an attach to a job may echo the job's id; a reply without id is still for us (one
    # request per socket), e.g. malformed_message
    rid = message.get("request_id")
    return request_id is None or rid is None or rid == request_id


# --- the sync client ------------------------------------------------------------------------
class BrokerClient:
    """Blocking client. Thread-safe: every request uses its own socket."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, timeout_s: float = 30.0,
                 retries: int = 3, codec_name: str = C.CODEC_MSGPACK,
                 curve_server_key: bytes | None = None,
                 curve_client_keys: tuple[bytes, bytes] | None = None,
                 context: zmq.Context | None = None):
        if codec_name not in (C.CODEC_JSON, C.CODEC_MSGPACK):
            raise ValueError(f"codec_name must be json or msgpack, not {codec_name!r}")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retries = retries
        self.codec_name = codec_name
        self._curve_server_key = curve_server_key
        self._curve_client_keys = curve_client_keys
        self._own_context = context is None
        self._context = context or zmq.Context()

    @classmethod
    def with_curve(cls, endpoint: str, server_public_file: str, client_secret_file: str,
                   **kwargs: Any):
        """A client that talks CURVE to a broker, from files made by `sdxl-broker keys`."""
        from broker.curve import client_keys

        server_key, pair = client_keys(server_public_file, client_secret_file)
        return cls(endpoint, curve_server_key=server_key, curve_client_keys=pair, **kwargs)

    # --- socket handling (shared with the async client) ---------------------------------
    def _configure(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve_server_key is not None:
            public, secret = self._curve_client_keys or zmq.curve_keypair()
            sock.curve_serverkey = self._curve_server_key
            sock.curve_publickey = public
            sock.curve_secretkey = secret

    def _open(self) -> zmq.Socket:
        sock = self._context.socket(zmq.DEALER)
        self._configure(sock)
        sock.connect(self.endpoint)
        return sock

    # --- the core exchange ------------------------------------------------------------------
    def stream(self, body: dict, *, timeout_s: float | None = None,
               retries: int | None = None) -> Iterator[dict]:
        """Send one request; yield every progress event, then the final reply (last item).
        Raises BrokerUnavailable after `retries` silent time-outs in a row."""
        exchange = _Exchange(self, body, timeout_s, retries)
        sock = self._open()
        try:
            sock.send_multipart([b"", exchange.frame])
            while True:
                if sock.poll(exchange.timeout_s * 1000, zmq.POLLIN):
                    message = exchange.accept(sock.recv_multipart()[-1])
                    if message is not None:
                        yield message
                        if _is_final(message):
                            return
                    continue
                exchange.silence()   # raises BrokerUnavailable when the resends are used up
                sock.close(linger=0)
                sock = self._open()
                sock.send_multipart([b"", exchange.frame])
        finally:
            sock.close(linger=0)

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

    # --- conveniences ---------------------------------------------------------------------
    def generate(self, body: dict | None = None, /, *, on_progress: ProgressCallback | None = None,
                 raise_on_error: bool = True, timeout_s: float | None = None,
                 **fields: Any) -> GenerationResult:
        """Generate from a ready body (any of the three forms) or keyword fields (flat form).
        Raises RequestFailed when the broker reports a failure (unless raise_on_error=False)."""
        if body is None:
            body = generation_body(**fields)
        elif fields:
            raise TypeError("pass either a body or keyword fields, not both")
        reply = self.request(_with_stream(body), on_progress=on_progress, timeout_s=timeout_s)
        if raise_on_error and not reply.get("success"):
            raise RequestFailed(reply)
        return GenerationResult.from_reply(reply)

    def status(self) -> dict:
        return _data_or_raise(self.request({"message_type": C.STATUS}))

    def initialize(self) -> dict:
        return _data_or_raise(self.request({"message_type": C.INITIALIZE}))

    def load_model(self, model_name: str, device: str | None = None, *,
                   timeout_s: float | None = None) -> dict:
        return _data_or_raise(self.request(load_body(model_name, device), timeout_s=timeout_s))

    def cleanup(self, workers: list[str] | None = None, models: list[str] | None = None) -> dict:
        return _data_or_raise(self.request(cleanup_body(workers, models)))

    def cancel(self, request_id: str) -> dict:
        return _data_or_raise(self.request(cancel_body(request_id)))

    def close(self) -> None:
        if self._own_context:
            self._context.destroy(linger=0)  # closes any socket an abandoned stream left open

    def __enter__(self) -> "BrokerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _data_or_raise(reply: dict) -> dict:
    if not reply.get("success"):
        raise RequestFailed(reply)
    return reply.get("data") or {}


# --- the asyncio client -----------------------------------------------------------------------
class AsyncBrokerClient(BrokerClient):
    """The same client for asyncio: `await client.generate(...)`, `async for m in client.stream(b)`.
    Many requests may run concurrently (one socket each)."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, context: zmq.asyncio.Context | None = None,
                 **kwargs: Any):
        super().__init__(endpoint, context=context or zmq.asyncio.Context(), **kwargs)
        self._own_context = context is None

    async def stream(self, body: dict, *, timeout_s: float | None = None,  # type: ignore[override]
                     retries: int | None = None) -> AsyncIterator[dict]:
        exchange = _Exchange(self, body, timeout_s, retries)
        sock = self._open()
        try:
            await sock.send_multipart([b"", exchange.frame])
            while True:
                if await sock.poll(exchange.timeout_s * 1000, zmq.POLLIN):
                    message = exchange.accept((await sock.recv_multipart())[-1])
                    if message is not None:
                        yield message
                        if _is_final(message):
                            return
                    continue
                exchange.silence()
                sock.close(linger=0)
                sock = self._open()
                await sock.send_multipart([b"", exchange.frame])
        finally:
            sock.close(linger=0)

    async def request(self, body: dict, *, on_progress: ProgressCallback | None = None,  # type: ignore[override]
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

    async def generate(self, body: dict | None = None, /, *,  # type: ignore[override]
                       on_progress: ProgressCallback | None = None, raise_on_error: bool = True,
                       timeout_s: float | None = None, **fields: Any) -> GenerationResult:
        if body is None:
            body = generation_body(**fields)
        elif fields:
            raise TypeError("pass either a body or keyword fields, not both")
        reply = await self.request(_with_stream(body), on_progress=on_progress, timeout_s=timeout_s)
        if raise_on_error and not reply.get("success"):
            raise RequestFailed(reply)
        return GenerationResult.from_reply(reply)

    async def status(self) -> dict:  # type: ignore[override]
        return _data_or_raise(await self.request({"message_type": C.STATUS}))

    async def initialize(self) -> dict:  # type: ignore[override]
        return _data_or_raise(await self.request({"message_type": C.INITIALIZE}))

    async def load_model(self, model_name: str, device: str | None = None, *,  # type: ignore[override]
                         timeout_s: float | None = None) -> dict:
        return _data_or_raise(await self.request(load_body(model_name, device), timeout_s=timeout_s))

    async def cleanup(self, workers: list[str] | None = None,  # type: ignore[override]
                      models: list[str] | None = None) -> dict:
        return _data_or_raise(await self.request(cleanup_body(workers, models)))

    async def cancel(self, request_id: str) -> dict:  # type: ignore[override]
        return _data_or_raise(await self.request(cancel_body(request_id)))

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


def client_from_args(args, **kwargs: Any) -> BrokerClient:
    endpoint = args.endpoint or DEFAULT_ENDPOINT
    server_key = args.curve_server_key or os.environ.get("SDXL_BROKER_CURVE_SERVER_KEY")
    client_key = args.curve_client_key or os.environ.get("SDXL_BROKER_CURVE_CLIENT_KEY")
    if server_key and client_key:
        return BrokerClient.with_curve(endpoint, server_key, client_key, **kwargs)
    if server_key or client_key:
        raise ValueError("CURVE needs both --curve-server-key and --curve-client-key")
    return BrokerClient(endpoint, **kwargs)
