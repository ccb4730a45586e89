"""`sdxl-broker translate`: check one request body before sending it, and see what it becomes.

Reads JSON or msgpack (told apart by the first byte, as the broker does) from FILE or stdin,
validates it exactly as the broker would, and prints the translation as JSON. Invalid input
prints every problem with its field path and exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from protocol import codec
from protocol import constants as C
from protocol.errors import ProtocolError
from protocol.parse import parse_request
from protocol.translate import job_to_legacy, job_to_nested

log = logging.getLogger(__name__)

TARGETS = ("canonical", "legacy", "nested")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  sdxl-broker translate request.json\n"
        "  sdxl-broker translate --to legacy --default-model-base /models/base.safetensors req.json\n"
        "  cat req.msgpack | sdxl-broker translate --to nested -\n\n"
        "canonical: the broker's internal job (what workers run);\n"
        "legacy:    the first seed's {action: generate, prompt_submission} body;\n"
        "nested:    the Phase 6 C# inference_request body with its defaults filled in.\n"
        "Management messages (load_model, cleanup, ...) print their validated parameters.")
    parser.add_argument("file", metavar="FILE|-", help="request body (JSON or msgpack); - reads stdin")
    parser.add_argument("--to", choices=TARGETS, default="canonical",
                        help="what to print for a generation request (default: canonical)")
    parser.add_argument("--default-model-base", metavar="NAME", default=None,
                        help="base model used when the request names none (the broker's flag of "
                             "the same name); without it a base model is required")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept .ckpt/.bin/.pt/.pth model paths (refused by default)")
    parser.add_argument("--compact", action="store_true", help="one-line JSON output")


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as fh:
        return fh.read()


def translate_body(frame: bytes, target: str = "canonical", *, default_model_base: str | None = None,
                   allow_pickle: bool = False) -> tuple[dict, list[str]]:
    """(translation, warnings) of one encoded body. Raises ProtocolError when it is invalid."""
    body, _codec = codec.decode(frame)
    parsed = parse_request(body, default_model_base=default_model_base, allow_pickle=allow_pickle)
    if parsed.job is None:
        out = {"message_type": parsed.message_type, "reply_type": parsed.reply_type,
               "request_id": parsed.request_id, "params": parsed.params}
    elif target == "legacy":
        out = job_to_legacy(parsed.job)
    elif target == "nested":
        out = job_to_nested(parsed.job)
    else:
        out = parsed.job.to_wire()
    return out, parsed.warnings


def run(args: argparse.Namespace) -> int:
    try:
        frame = _read(args.file)
    except OSError as exc:
        print(f"error: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    try:
        out, warnings = translate_body(frame, args.to, default_model_base=args.default_model_base,
                                       allow_pickle=args.allow_pickle)
    except ProtocolError as exc:
        print(f"invalid request ({exc.code}): {len(exc.errors) or 1} problem(s)", file=sys.stderr)
        if exc.errors:
            for err in exc.errors:
                print(f"  {err.field}: {err.message}", file=sys.stderr)
        else:
            print(f"  {exc.message}", file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    # bytes (msgpack binary images) print as base64, as the broker's JSON replies carry them
    text = codec.encode(out, C.CODEC_JSON).decode("utf-8")
    if not args.compact:
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    print(text)
    return 0
