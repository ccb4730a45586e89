"""The HTTP and WebSocket gateway: an ASGI app (FastAPI) that is a ZeroMQ client of the broker.

    /sdapi/v1/*     the AUTOMATIC1111 API (gateway/a1111.py does the translation)
    POST /v1/generate  any of the three contract forms as JSON -> the contract's final reply
    WS /v1/ws       progress (with previews) and results per request; the dashboard's feed
    GET /           the dashboard (gateway/static/dashboard.html, no build step, no CDN)

Every generation goes through `JobHub` (one broker exchange per request id), so an
`Idempotency-Key` retried over HTTP, or a WebSocket that reconnects, meets the same job.
Errors: the contract's final reply as the body, with an HTTP status from its `error_code`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import orjson
from fastapi import Body, FastAPI, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic.json_schema import models_json_schema

from clients.client import AsyncBrokerClient, BrokerUnavailable
from gateway import a1111
from gateway.hub import JobHub, TrackedJob
from gateway.security import BodyLimitMiddleware, BearerTokenMiddleware
from protocol import constants as C
from protocol import models as M
from protocol import normalize
from protocol import reply_models as R
from protocol.parse import peek

log = logging.getLogger(__name__)

# error_code -> HTTP status
HTTP_STATUS = {
    C.MALFORMED_MESSAGE: 400, C.UNKNOWN_MESSAGE_TYPE: 400, C.VALIDATION_ERROR: 422,
    C.MODEL_NOT_FOUND: 404, C.UNSUPPORTED_FEATURE: 422, C.QUEUE_FULL: 503, C.TIMEOUT: 504,
    C.CANCELLED: 409, C.WORKER_LOST: 503, C.OUT_OF_MEMORY: 507, C.DUPLICATE_REQUEST_ID: 409,
    C.INTERNAL_ERROR: 500, C.UNAVAILABLE: 503, C.FORBIDDEN: 403,
}
STATUS_POLL_S = 1.0      # how often the dashboard's workers, queue and history are refreshed
DASHBOARD_HISTORY = 12   # finished jobs the dashboard shows
CATALOGUE_TTL_S = 5.0    # model listings are cached this long
ERROR_RESPONSES: dict = {
    "4XX": {"model": R.FinalReply, "description": "the contract's error reply (error_code, errors[])"},
    "5XX": {"model": R.FinalReply, "description": "the contract's error reply (error_code)"},
}


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate echoed from a client's input is escaped
    (\\udXXX) instead of failing to encode as UTF-8 (a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode("ascii")


def unencodable(body: Any) -> Optional[str]:
    """Why a body cannot go on the wire (strings must be valid Unicode: JSON allows lone
    surrogates, UTF-8 and msgpack do not), or None."""
    try:
        orjson.dumps(body)
    except (TypeError, orjson.JSONEncodeError) as exc:
        return f"the body cannot be encoded: {exc}"
    return None


@dataclass
class GatewaySettings:
    broker_endpoint: str = "tcp://127.0.0.1:5555"
    output_dir: Optional[str] = None   # images are served from here only (same host as workers)
    token: Optional[str] = None        # Bearer token every request must carry
    cors_origins: list[str] = field(default_factory=list)  # empty: CORS off
    max_body_mb: float = 64.0
    default_model: Optional[str] = None  # A1111's sd_model_checkpoint until /options sets one
    client_timeout_s: float = 30.0
    # CURVE to the broker's frontend (clients.client.connection_from_args loads them from the
    # --curve-server-key / --curve-client-key files); None: a plain connection
    curve_server_key: Optional[bytes] = None
    curve_client_keys: Optional[tuple[bytes, bytes]] = None


# --- helpers -------------------------------------------------------------------------------------

def jsonable(value: Any) -> Any:
    """A broker message with its bytes (images, previews) as base64 strings."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def error_body(code: str, message: str, request_id: Optional[str] = None,
               errors: Optional[list[dict]] = None, message_type: str = "error_response") -> dict:
    return {"message_type": message_type, "request_id": request_id, "final": True,
            "success": False, "error": message, "error_code": code, "errors": errors or [],
            "warnings": [], "execution_time": 0.0, "timestamp": time.time(), "data": None}


def reply_response(reply: dict) -> JSONResponse:
    status = 200 if reply.get("success") else HTTP_STATUS.get(reply.get("error_code"), 500)
    return AsciiJSONResponse(jsonable(reply), status_code=status)


def _set_request_id(body: dict, request_id: str) -> dict:
    """Put an Idempotency-Key where each form keeps its id (the legacy form: session_id; a
    request_id beside it gets the same value, so every reader of the body agrees)."""
    body = dict(body)
    if body.get("action") == C.GENERATE_LEGACY_ACTION and body.get("message_type") in (None, "generate"):
        body["session_id"] = request_id
        if "request_id" in body:
            body["request_id"] = request_id
    else:
        body["request_id"] = request_id
    return body


def _request_id_of(body: dict) -> Optional[str]:
    """The id the broker will use for this body (protocol.parse.peek: the legacy form's
    session_id first, the nested form's metadata.request_id as a fallback)."""
    return peek(body)[1]


def _names_by_kind(data: dict) -> dict[str, list[str]]:
    """list_models' reply -> {kind: [names]}, whatever its exact nesting (a list of entries
    with a kind, or a mapping of kind to entries)."""
    out: dict[str, list[str]] = {}
    models = data.get("models", data)
    entries: list = []
    if isinstance(models, dict):
        for kind, items in models.items():
            for item in items if isinstance(items, list) else []:
                entries.append((kind, item))
    elif isinstance(models, list):
        entries = [(item.get("kind") if isinstance(item, dict) else None, item) for item in models]
    for kind, item in entries:
        name = item.get("name") if isinstance(item, dict) else item
        kind = (item.get("kind") if isinstance(item, dict) else None) or kind
        if isinstance(name, str) and isinstance(kind, str):
            names = out.setdefault(kind.rstrip("s") if kind.endswith("s") and kind != "vaes" else kind, [])
            if name not in names:
                names.append(name)
    if "vaes" in out:
        out.setdefault("vae", []).extend(out.pop("vaes"))
    return out


def _names(items) -> list[str]:
    return [i if isinstance(i, str) else i.get("name") for i in items or ()
            if isinstance(i, str) or (isinstance(i, dict) and isinstance(i.get("name"), str))]


class Gateway:
    """The app's state: the broker client, the job hub, options, cached listings."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.client = AsyncBrokerClient(settings.broker_endpoint, timeout_s=settings.client_timeout_s,
                                        codec_name=C.CODEC_MSGPACK,
                                        curve_server_key=settings.curve_server_key,
                                        curve_client_keys=settings.curve_client_keys)
        self.hub = JobHub(self.client)
        self.options: dict[str, Any] = {"sd_model_checkpoint": settings.default_model or "",
                                        "sd_vae": "Automatic", "samples_format": "png",
                                        "show_progress_every_n_steps": 1,
                                        "live_previews_enable": True}
        self.status: Optional[dict] = None
        self.status_error: Optional[str] = None
        self.listings: dict[str, Optional[dict]] = {}  # the last list_queue / list_history data
        self._catalogue: tuple[float, dict] | None = None
        self._poller: Optional[asyncio.Task] = None
        self.catalogue_source = "none"

    async def start(self) -> None:
        self._poller = asyncio.create_task(self._poll_status(), name="status poller")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._poller
        await self.hub.close()
        self.client.close()

    async def _poll_status(self) -> None:
        """Broker status once a second while a dashboard watches (and for /v1/status), with
        the broker's queue and recent history: every client's jobs, not only this gateway's."""
        while True:
            try:
                if self.hub.watchers or self.status is None:
                    reply, queue, history = await asyncio.gather(
                        self.client.request({"message_type": C.STATUS}, timeout_s=5, retries=0),
                        self._listing({"message_type": C.LIST_QUEUE, "data": {"include_prompts": True}}),
                        self._listing({"message_type": C.LIST_HISTORY,
                                       "data": {"limit": DASHBOARD_HISTORY}}))
                    if reply and reply.get("success"):
                        self.status, self.status_error = reply.get("data") or {}, None
                        self.hub._notify_watchers(self.status_event(queue, history))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker being away must not end the poller
                self.status_error = str(exc)
            await asyncio.sleep(STATUS_POLL_S)

    async def _listing(self, body: dict) -> Optional[dict]:
        """A list_queue / list_history answer's data, or None where the broker does not give
        it (an older broker: unknown_message_type; a broker that keeps it for admins): the
        dashboard then shows this gateway's own jobs."""
        try:
            reply = await self.client.request(body, timeout_s=5, retries=0)
        except BrokerUnavailable:
            return None
        if reply and reply.get("success"):
            self.listings = {**self.listings, body["message_type"]: reply.get("data") or {}}
            return reply.get("data") or {}
        self.listings = {**self.listings, body["message_type"]: None}
        return None

    def status_event(self, queue: Optional[dict] = None, history: Optional[dict] = None) -> dict:
        """The dashboard's periodic event: workers, this gateway's jobs, and (None when the
        broker does not answer them) the broker's queue and recent history of every client."""
        return {"type": "status", "status": jsonable(self.status or {}),
                "jobs": [t.summary() for t in self.hub.jobs.values()][-50:],
                "queue": queue, "history": history}

    async def catalogue(self) -> dict[str, list[str]]:
        """{kind: [model names]} from the broker's list_models; where the broker does not
        answer it, what `initialize` tells: the loaded models and the scheduler names."""
        now = time.monotonic()
        if self._catalogue is not None and now - self._catalogue[0] < CATALOGUE_TTL_S:
            return self._catalogue[1]
        out: dict[str, list[str]] = {}
        reply = await self.client.request({"message_type": "list_models"}, timeout_s=10, retries=0)
        if reply and reply.get("success"):
            out = _names_by_kind(reply.get("data") or {})
            schedulers = (reply.get("data") or {}).get("schedulers")
            if isinstance(schedulers, list):
                out["scheduler"] = [s for s in schedulers if isinstance(s, str)]
            self.catalogue_source = "list_models"
        else:  # a broker without list_models: what its workers have loaded, from status
            status = await self.client.request({"message_type": C.STATUS}, timeout_s=10, retries=0)
            init = await self.client.request({"message_type": C.INITIALIZE}, timeout_s=10, retries=0)
            kinds: dict[str, set] = {"base": set(), "lora": set(), "controlnet": set()}
            for worker in ((status or {}).get("data") or {}).get("workers") or []:
                loras, controlnets = set(_names(worker.get("loras_cached"))), set(_names(worker.get("controlnets_cached")))
                kinds["lora"] |= loras
                kinds["controlnet"] |= controlnets
                kinds["base"] |= set(_names(worker.get("models_loaded"))) - loras - controlnets
            out = {kind: sorted(names) for kind, names in kinds.items()}
            out["scheduler"] = list((((init or {}).get("data") or {}).get("schedulers")) or [])
            self.catalogue_source = "status (loaded models only; the broker has no list_models)"
        default = self.options.get("sd_model_checkpoint")
        if default and default not in out.setdefault("base", []):
            out["base"].insert(0, default)
        self._catalogue = (now, out)
        return out

    def default_model(self) -> Optional[str]:
        return self.options.get("sd_model_checkpoint") or self.settings.default_model or None

    def latest_a1111_job(self) -> Optional[TrackedJob]:
        jobs = [t for t in self.hub.jobs.values() if t.source == "a1111"]
        running = [t for t in jobs if t.final is None]
        return (running or jobs or [None])[0 if running else -1]


# --- the app -------------------------------------------------------------------------------------

DESCRIPTION = """
An A1111-compatible HTTP API and a WebSocket feed in front of the sdxl-broker pool.

**WebSocket `/v1/ws`** (JSON text frames). Send `{"type": "generate", "request": BODY}` (any of
the three contract forms; its request id, or a fresh one, names the job), `{"type": "attach",
"request_id": ID}` (after a reconnect: the job's latest progress, then the rest and its result),
`{"type": "cancel", "request_id": ID}` or `{"type": "watch"}` (the dashboard feed: broker status
once a second and every job's progress). You receive `{"type": "accepted", "request_id"}`, then
`{"type": "progress", "request_id", "event": {...progress, preview (base64 JPEG), eta_s}}` and
exactly one `{"type": "result", "request_id", "reply": {...the contract's final reply}}`.
Closing the socket never cancels a job. With `--http-token`, send `Authorization: Bearer TOKEN`
(browsers: `?token=TOKEN` on the page and the socket).
"""


def create_app(settings: GatewaySettings) -> FastAPI:
    gw = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(title="sdxl-broker gateway", version="1", description=DESCRIPTION,
                  lifespan=lifespan, default_response_class=AsciiJSONResponse)
    app.state.gateway = gw
    app.add_middleware(BodyLimitMiddleware, max_bytes=int(settings.max_body_mb * 1024 * 1024))
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["*"], allow_headers=["*"])
    if settings.token:
        app.add_middleware(BearerTokenMiddleware, token=settings.token)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        code = C.MALFORMED_MESSAGE if exc.status_code in (400, 413) else C.VALIDATION_ERROR
        return AsciiJSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(BrokerUnavailable)
    async def _broker_unavailable(_request, exc: BrokerUnavailable):
        # nothing answered after every resend: what the socket saw (nothing listening, a
        # refused CURVE key, ...), as the job hub reports it for generations
        return AsciiJSONResponse(error_body(C.TIMEOUT, f"broker unavailable: {exc}"), status_code=504)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        errors = [{"field": ".".join(str(p) for p in e.get("loc", ())[1:]) or "body",
                   "message": str(e.get("msg"))} for e in exc.errors()]
        return AsciiJSONResponse(error_body(C.VALIDATION_ERROR, f"{len(errors)} invalid field(s)",
                                       errors=errors), status_code=422)

    # --- A1111 ---------------------------------------------------------------------------------
    async def _a1111_generate(params: a1111.GenerationParams, request_id: str, **images) -> JSONResponse:
        body, warnings = a1111.to_inference_request(params, request_id=request_id,
                                                    default_model=gw.default_model(),
                                                    options=gw.options, **images)
        if not body["data"]["models"]["base"]:
            return AsciiJSONResponse(error_body(C.VALIDATION_ERROR, "no model: set sd_model_checkpoint "
                                           "(POST /sdapi/v1/options or override_settings)",
                                           request_id, [{"field": "override_settings.sd_model_checkpoint",
                                                         "message": "is required"}]), status_code=422)
        problem = unencodable(body)
        if problem:
            return AsciiJSONResponse(error_body(C.MALFORMED_MESSAGE, problem), status_code=400)
        tracked = gw.hub.submit(request_id, body, "a1111")
        reply = await gw.hub.wait(tracked)
        if not reply.get("success"):
            return reply_response(reply)
        return AsciiJSONResponse(a1111.to_response(params, body, reply, warnings))

    @app.post("/sdapi/v1/txt2img", response_model=a1111.GenerationResponse, responses=ERROR_RESPONSES,
              tags=["A1111"])
    async def txt2img(params: a1111.Txt2ImgRequest,
                      idempotency_key: Optional[str] = Header(None, max_length=C.MAX_ID_CHARS)):
        return await _a1111_generate(params, idempotency_key or uuid.uuid4().hex)

    @app.post("/sdapi/v1/img2img", response_model=a1111.GenerationResponse, responses=ERROR_RESPONSES,
              tags=["A1111"])
    async def img2img(params: a1111.Img2ImgRequest,
                      idempotency_key: Optional[str] = Header(None, max_length=C.MAX_ID_CHARS)):
        return await _a1111_generate(params, idempotency_key or uuid.uuid4().hex,
                                     init_images=params.init_images, mask=params.mask,
                                     invert_mask=bool(params.inpainting_mask_invert))

    @app.get("/sdapi/v1/progress", response_model=a1111.ProgressResponse, tags=["A1111"])
    async def progress(skip_current_image: bool = False):
        queued = len([t for t in gw.hub.running() if t.source == "a1111"]) - 1
        return a1111.progress_response(gw.latest_a1111_job(), skip_current_image=skip_current_image,
                                       queued=max(0, queued))

    @app.post("/sdapi/v1/interrupt", tags=["A1111"])
    async def interrupt() -> dict:
        """Cancel the running A1111 job(s) of this gateway (as A1111's Interrupt button)."""
        cancelled = []
        for tracked in [t for t in gw.hub.running() if t.source == "a1111"]:
            reply = await gw.hub.cancel(tracked.request_id)   # on the job's own exchange
            if reply and reply.get("success"):
                cancelled.append(tracked.request_id)
        return {"cancelled": cancelled}

    @app.post("/sdapi/v1/skip", tags=["A1111"])
    async def skip() -> dict:
        return await interrupt()

    @app.get("/sdapi/v1/sd-models", tags=["A1111"])
    async def sd_models() -> list[dict]:
        catalogue = await gw.catalogue()
        names = [*catalogue.get("base", []),
                 *(n for n in catalogue.get("refiner", []) if n not in catalogue.get("base", []))]
        return [{"title": n, "model_name": n, "hash": None, "sha256": None, "filename": n,
                 "config": None} for n in names]

    @app.get("/sdapi/v1/sd-vae", tags=["A1111"])
    async def sd_vae() -> list[dict]:
        return [{"model_name": n, "filename": n} for n in (await gw.catalogue()).get("vae", [])]

    @app.get("/sdapi/v1/loras", tags=["A1111"])
    async def loras() -> list[dict]:
        return [{"name": n, "alias": n, "path": n, "metadata": {}}
                for n in (await gw.catalogue()).get("lora", [])]

    @app.get("/sdapi/v1/samplers", tags=["A1111"])
    async def samplers() -> list[dict]:
        names = (await gw.catalogue()).get("scheduler") or list(normalize.SCHEDULER_NAMES)
        return [{"name": n, "aliases": [], "options": {}} for n in names]

    @app.get("/sdapi/v1/schedulers", tags=["A1111"])
    async def schedulers() -> list[dict]:
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                 "need_inner_model": False},
                {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                 "need_inner_model": False}]

    @app.get("/sdapi/v1/upscalers", tags=["A1111"])
    async def upscalers() -> list[dict]:
        names = ["None", "Lanczos", *(await gw.catalogue()).get("upscaler", [])]
        return [{"name": n, "model_name": None if n in ("None", "Lanczos") else n, "model_path": None,
                 "model_url": None, "scale": 4.0 if n not in ("None", "Lanczos") else None} for n in names]

    @app.get("/sdapi/v1/scripts", tags=["A1111"])
    async def scripts() -> dict:
        return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}

    @app.get("/sdapi/v1/options", tags=["A1111"])
    async def get_options() -> dict:
        return dict(gw.options)

    @app.post("/sdapi/v1/options", tags=["A1111"], responses=ERROR_RESPONSES)
    async def set_options(options: dict[str, Any] = Body(...)):
        """Sets the default checkpoint (sd_model_checkpoint) for A1111 calls; other options are
        stored and echoed."""
        checkpoint = options.get("sd_model_checkpoint")
        if checkpoint is not None and not isinstance(checkpoint, str):
            return AsciiJSONResponse(error_body(C.VALIDATION_ERROR, "sd_model_checkpoint must be a string",
                                           errors=[{"field": "sd_model_checkpoint",
                                                    "message": "must be a string"}]), status_code=422)
        for key, value in options.items():
            gw.options[key] = a1111._strip_hash(value) if key == "sd_model_checkpoint" else value
        return None

    # --- the product's own API ----------------------------------------------------------------
    @app.post("/v1/generate", tags=["sdxl-broker"], response_model=R.GenerationReply,
              responses=ERROR_RESPONSES, openapi_extra={"requestBody": {
                  "required": True, "content": {"application/json": {"schema": {"oneOf": [
                      {"$ref": "#/components/schemas/FlatGenerateRequest"},
                      {"$ref": "#/components/schemas/NestedGenerateRequest"},
                      {"$ref": "#/components/schemas/LegacyGenerateRequest"}]}}}}})
    async def generate(request: Request,
                       idempotency_key: Optional[str] = Header(None, max_length=C.MAX_ID_CHARS)):
        """Any of the three contract forms as JSON; the contract's final reply back (images
        base64 when `return_images`). `Idempotency-Key` becomes the request id."""
        try:
            body = await request.json()
        except StarletteHTTPException:  # the body cap (gateway.security)
            raise
        except Exception:
            return AsciiJSONResponse(error_body(C.MALFORMED_MESSAGE, "the body is not JSON"), status_code=400)
        if not isinstance(body, dict):
            return AsciiJSONResponse(error_body(C.MALFORMED_MESSAGE, "the body must be a JSON object"),
                                status_code=400)
        mt = body.get("message_type") or body.get("action")
        if mt not in C.GENERATION_TYPES:
            return AsciiJSONResponse(error_body(C.UNKNOWN_MESSAGE_TYPE, "POST /v1/generate takes "
                                           "generate_sdxl_enhanced, inference_request or action "
                                           "generate bodies"), status_code=400)
        problem = unencodable(body)
        if problem:
            return AsciiJSONResponse(error_body(C.MALFORMED_MESSAGE, problem), status_code=400)
        request_id = idempotency_key or _request_id_of(body) or uuid.uuid4().hex
        body = _set_request_id(body, request_id)
        reply = await gw.hub.wait(gw.hub.submit(request_id, body, "v1"))
        return reply_response(reply)

    @app.get("/v1/jobs/{request_id}", tags=["sdxl-broker"], responses=ERROR_RESPONSES)
    async def job(request_id: str) -> dict:
        """A job this gateway ran: its latest progress, and its final reply once done."""
        tracked = gw.hub.get(request_id)
        if tracked is None:
            return AsciiJSONResponse(error_body(C.VALIDATION_ERROR, f"no job {request_id!r} here",
                                           request_id), status_code=404)
        return {"job": tracked.summary(), "reply": jsonable(tracked.final)}

    @app.get("/v1/jobs/{request_id}/preview", tags=["sdxl-broker"], responses={
        200: {"content": {"image/jpeg": {}}, "description": "the latest preview"}, **ERROR_RESPONSES})
    async def job_preview(request_id: str):
        tracked = gw.hub.get(request_id)
        if tracked is None or tracked.preview is None:
            return AsciiJSONResponse(error_body(C.VALIDATION_ERROR, "no preview for this job", request_id),
                                status_code=404)
        return Response(tracked.preview, media_type="image/jpeg")

    @app.get("/v1/jobs/{request_id}/images/{index}", tags=["sdxl-broker"], responses={
        200: {"content": {"image/*": {}}, "description": "a final image"}, **ERROR_RESPONSES})
    async def job_image(request_id: str, index: int):
        tracked = gw.hub.get(request_id)
        images = ((tracked.final or {}).get("data") or {}).get("generated_images") or [] if tracked else []
        if 0 <= index < len(images) and not images[index].get("image"):
            on_disk = _under_output_root(images[index].get("path") or "")
            if on_disk is not None:  # not returned inline: the worker's file, when it is here
                return FileResponse(on_disk)
        if not 0 <= index < len(images) or not images[index].get("image"):
            return AsciiJSONResponse(error_body(C.VALIDATION_ERROR, "no such image", request_id),
                                status_code=404)
        item = images[index]
        data = item["image"]
        raw = bytes(data) if isinstance(data, (bytes, bytearray)) else base64.b64decode(data)
        return Response(raw, media_type=f"image/{item.get('format') or 'png'}")

    def _under_output_root(path: str) -> Optional[Path]:
        """`path` (absolute or relative to the output root) if it is an image file inside the
        root, else None: nothing outside the output root is ever served."""
        if not settings.output_dir or not path:
            return None
        root_path = Path(settings.output_dir).resolve()
        target = (root_path / path).resolve()
        if not target.is_relative_to(root_path) or not target.is_file() \
                or target.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
            return None
        return target

    @app.get("/v1/status", tags=["sdxl-broker"], responses=ERROR_RESPONSES)
    async def status() -> dict:
        """The broker's status_response data (workers, queue), as the dashboard shows it."""
        reply = await gw.client.request({"message_type": C.STATUS}, timeout_s=5, retries=0)
        if not reply or not reply.get("success"):
            return reply_response(reply or error_body(C.INTERNAL_ERROR, "no status"))
        return jsonable(reply.get("data") or {})

    @app.get("/v1/images/{path:path}", tags=["sdxl-broker"], responses={
        200: {"content": {"image/*": {}}, "description": "an image file"}, **ERROR_RESPONSES})
    async def image_file(path: str):
        """An image under the output root (--output-dir), nothing outside it."""
        target = _under_output_root(path)
        if target is None:
            return AsciiJSONResponse(error_body(C.VALIDATION_ERROR, "no such image under the output root"),
                                status_code=404)
        return FileResponse(target)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard():
        return HTMLResponse(resources.files("gateway").joinpath("static/dashboard.html").read_text("utf-8"))

    @app.websocket("/v1/ws")
    async def websocket(ws: WebSocket):
        await ws_session(gw, ws)

    _install_openapi(app)
    return app


def _install_openapi(app: FastAPI) -> None:
    """/openapi.json with the three contract request forms as components (for /v1/generate)."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        _, defs = models_json_schema(
            [(M.FlatGenerateRequest, "validation"), (M.NestedGenerateRequest, "validation"),
             (M.LegacyGenerateRequest, "validation")], ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        return schema

    app.openapi = openapi


# --- the WebSocket session -------------------------------------------------------------------------

async def ws_session(gw: Gateway, ws: WebSocket) -> None:
    await ws.accept()
    outbox: asyncio.Queue = asyncio.Queue()
    forwarders: dict[str, asyncio.Task] = {}
    watch_queue: Optional[asyncio.Queue] = None

    async def forward(tracked: TrackedJob) -> None:
        queue = gw.hub.listen(tracked)
        try:
            while True:
                message = await queue.get()
                if message.get("message_type") == C.PROGRESS:
                    await outbox.put({"type": "progress", "request_id": tracked.request_id,
                                      "event": jsonable(message)})
                else:
                    await outbox.put({"type": "result", "request_id": tracked.request_id,
                                      "reply": jsonable(message)})
                    return
        finally:
            gw.hub.unlisten(tracked, queue)

    def follow(tracked: TrackedJob) -> None:
        if tracked.request_id not in forwarders or forwarders[tracked.request_id].done():
            forwarders[tracked.request_id] = asyncio.create_task(forward(tracked))

    async def pump_watch(queue: asyncio.Queue) -> None:
        while True:
            await outbox.put(jsonable(await queue.get()))

    async def sender() -> None:
        while True:
            await ws.send_text(json.dumps(await outbox.get()))  # ASCII: lone surrogates escaped

    send_task = asyncio.create_task(sender())
    watch_task: Optional[asyncio.Task] = None
    try:
        while True:
            try:
                message = await ws.receive_json()
            except (ValueError, KeyError):
                await outbox.put({"type": "error", "error_code": C.MALFORMED_MESSAGE,
                                  "error": "send JSON objects"})
                continue
            if not isinstance(message, dict):
                await outbox.put({"type": "error", "error_code": C.MALFORMED_MESSAGE,
                                  "error": "send JSON objects"})
                continue
            kind = message.get("type")
            if kind == "generate":
                body = message.get("request")
                if not isinstance(body, dict) or (body.get("message_type") or body.get("action")) \
                        not in C.GENERATION_TYPES:
                    await outbox.put({"type": "error", "error_code": C.UNKNOWN_MESSAGE_TYPE,
                                      "error": "request must be a generation body in one of the "
                                               "three contract forms"})
                    continue
                problem = unencodable(body)
                if problem:
                    await outbox.put({"type": "error", "error_code": C.MALFORMED_MESSAGE, "error": problem})
                    continue
                request_id = _request_id_of(body) or uuid.uuid4().hex
                body = _set_request_id(body, request_id)
                tracked = gw.hub.submit(request_id, body, "ws")
                await outbox.put({"type": "accepted", "request_id": request_id})
                follow(tracked)
            elif kind == "attach":
                request_id = str(message.get("request_id") or "")
                tracked = gw.hub.get(request_id)
                if tracked is None:
                    await outbox.put({"type": "error", "request_id": request_id,
                                      "error_code": C.VALIDATION_ERROR,
                                      "error": "this gateway has no job with that id; send "
                                               "generate with the same body and id to reach the "
                                               "broker's stored reply"})
                    continue
                await outbox.put({"type": "accepted", "request_id": request_id})
                follow(tracked)
            elif kind == "cancel":
                request_id = str(message.get("request_id") or "")
                reply = await gw.hub.cancel(request_id)
                await outbox.put({"type": "cancel", "request_id": request_id, "reply": jsonable(reply)})
            elif kind == "watch":
                if watch_queue is None:
                    watch_queue = asyncio.Queue()
                    gw.hub.watchers.add(watch_queue)
                    watch_task = asyncio.create_task(pump_watch(watch_queue))
                    if gw.status is not None:
                        await outbox.put(gw.status_event(gw.listings.get(C.LIST_QUEUE),
                                                         gw.listings.get(C.LIST_HISTORY)))
            else:
                await outbox.put({"type": "error", "error_code": C.UNKNOWN_MESSAGE_TYPE,
                                  "error": "type must be generate, attach, cancel or watch"})
    except WebSocketDisconnect:
        pass  # the jobs go on; a reconnect attaches again
    finally:
        if watch_queue is not None:
            gw.hub.watchers.discard(watch_queue)
        for task in (send_task, watch_task, *forwarders.values()):
            if task is not None:
                task.cancel()
