"""One client body, bytes in, everything the broker core needs out: its codec, the parsed request
(protocol.parse) and, for a generation request, the duplicate-check fingerprint; or the typed
error to answer it with. A pure function of the bytes and two settings, so it runs the same on
the broker's loop (small bodies) and in a decode process (big ones, broker.decode_stage).

`DecodedBody.to_wire` / `from_wire` carry the outcome between processes as msgpack (the Job as
its own `to_wire` dict): no pickle.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from protocol import codec
from protocol import constants as C
from protocol.errors import FieldError, ProtocolError

FALLBACK_REPLY_TYPE = "error_response"  # a body too broken to tell what it asked for

_parse_module = None


def request_parser():
    """protocol.parse (the one request parser), imported on first use rather than at module
    import, so `sdxl-broker --help` (which imports every command module) does not build its
    schemas; the broker loop and each decode process call this at start so the first request
    does not pay ~0.5 s."""
    global _parse_module
    if _parse_module is None:
        from protocol import parse
        _parse_module = parse
    return _parse_module


@dataclass(slots=True)
class DecodedBody:
    """A decoded, validated client body, or the error it is answered with."""
    codec: str                          # the reply goes back in this codec
    parsed: object = None               # protocol.parse.ParsedRequest when valid
    fingerprint: str | None = None      # generation requests only (parse.body_fingerprint)
    error: ProtocolError | None = None
    # where the error reply goes (parse.peek of whatever decoded), when `error` is set
    reply_type: str = FALLBACK_REPLY_TYPE
    request_id: str | None = None
    body_bytes: int = 0                 # size of the frame it came from
    # what the journal stores instead of the body: a broker.staged_bodies reference to the
    # file a decode process wrote (None: the body itself)
    journal_body: bytes | None = None

    def to_wire(self) -> bytes:
        if self.error is not None:
            out = {"codec": self.codec, "rt": self.reply_type, "rid": self.request_id,
                   "code": self.error.code, "message": self.error.message,
                   "errors": [[e.field, e.message] for e in self.error.errors]}
        else:
            p = self.parsed
            out = {"codec": self.codec, "mt": p.message_type, "rt": p.reply_type,
                   "rid": p.request_id, "job": p.job.to_wire() if p.job is not None else None,
                   "params": p.params, "warnings": list(p.warnings), "fp": self.fingerprint}
        out["size"] = self.body_bytes
        out["jb"] = self.journal_body
        return msgpack.packb(out, use_bin_type=True)

    @classmethod
    def from_wire(cls, frame: bytes) -> "DecodedBody":
        d = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        if "code" in d:
            error = ProtocolError(d["code"], d["message"], [FieldError(f, m) for f, m in d["errors"]])
            return cls(d["codec"], error=error, reply_type=d["rt"], request_id=d["rid"],
                       body_bytes=d["size"])
        parse = request_parser()
        from protocol.job import Job
        job = Job.from_wire(d["job"]) if d["job"] is not None else None
        parsed = parse.ParsedRequest(message_type=d["mt"], reply_type=d["rt"], request_id=d["rid"],
                                     job=job, params=d["params"], warnings=d["warnings"])
        return cls(d["codec"], parsed=parsed, fingerprint=d["fp"], body_bytes=d["size"],
                   journal_body=d.get("jb"))


def decode_body(body: bytes, body_frames: int = 1, *, default_model_base: str | None = None,
                allow_pickle: bool = False) -> DecodedBody:
    """Decode, validate and (for generation) fingerprint one client body. Never raises: every
    failure is a DecodedBody with `error` set (a bug costs this request, never the broker)."""
    parse = request_parser()
    size = len(body)
    if body_frames != 1:
        return DecodedBody(codec.sniff(body) or C.CODEC_JSON, body_bytes=size, error=ProtocolError(
            C.MALFORMED_MESSAGE, f"expected one body frame, got {body_frames}"))
    decoded = None
    name = codec.sniff(body) or C.CODEC_JSON
    try:
        decoded, name = codec.decode(body)
        parsed = parse.parse_request(decoded, default_model_base=default_model_base,
                                     allow_pickle=allow_pickle)
        fingerprint = parse.body_fingerprint(decoded) if parsed.job is not None else None
    except ProtocolError as exc:
        reply_type, request_id = parse.peek(decoded)
        return DecodedBody(name, error=exc, reply_type=reply_type or FALLBACK_REPLY_TYPE,
                           request_id=request_id, body_bytes=size)
    except Exception as exc:   # body_fingerprint or a codec surprise: one request's problem
        reply_type, request_id = parse.peek(decoded)
        return DecodedBody(name, error=ProtocolError(
            C.INTERNAL_ERROR, f"cannot decode request: {type(exc).__name__}"),
            reply_type=reply_type or FALLBACK_REPLY_TYPE, request_id=request_id, body_bytes=size)
    return DecodedBody(name, parsed=parsed, fingerprint=fingerprint, body_bytes=size)
