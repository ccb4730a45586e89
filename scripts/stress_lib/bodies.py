"""Request bodies built by hand from CONTRACT.md and the two seed documents.

Three generation forms (flat C# `generate_sdxl_enhanced`, nested `inference_request`, legacy
`action: generate`), encoded as JSON or msgpack. Deliberately independent of protocol/parse.py:
if the parser and the contract drift apart, the stress run notices.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import msgpack

FORMS = ("flat", "nested", "legacy")
CODECS = ("json", "msgpack")
PRIORITIES = ("high", "normal", "low")

# The reply message_type each request form gets (CONTRACT.md "Message types").
REPLY_TYPE = {
    "flat": "generate_sdxl_enhanced_response",
    "nested": "inference_response",
    "legacy": "generate_response",
}
MANAGEMENT_REPLY_TYPES = frozenset({
    "cancel_response", "status_response", "model_load_response", "initialize_response",
    "cleanup_response",
})

# written into every result a rogue worker forges (raw_worker.py); a client seeing it is a
# contract violation
FORGED_MARK = "forged-by-stress-rogue"

_WORDS = ("lighthouse", "storm", "forest", "neon", "portrait", "river", "castle", "desert",
          "fox", "harbour", "mountain", "city", "watercolour", "sunset", "robot")


@dataclass(frozen=True)
class GenerationSpec:
    """What one generation request asks for, independent of its wire form."""

    request_id: str
    form: str = "flat"
    prompt: str = "a lighthouse in a storm"
    model: str = "tiny-sdxl"
    width: int = 256
    height: int = 256
    steps: int = 4
    seed: int = -1
    priority: str = "normal"
    timeout_s: float = 300.0
    stream: bool = False


def random_prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 6)))


def generation_body(spec: GenerationSpec) -> dict:
    """The request body of `spec` in its form. Legacy bodies have no priority/timeout/stream
    fields in the first seed, so those stay at the broker's defaults there."""
    if spec.form == "flat":
        return {
            "message_type": "generate_sdxl_enhanced",
            "request_id": spec.request_id,
            "prompt": spec.prompt,
            "negative_prompt": "blurry",
            "model_base": spec.model,
            "width": spec.width,
            "height": spec.height,
            "steps": spec.steps,
            "guidance_scale": 7.5,
            "seed": spec.seed,
            "scheduler": "EulerDiscreteScheduler",
            "output_format": "png",
            "return_images": False,
            "priority": spec.priority,
            "timeout": spec.timeout_s,
            "stream": spec.stream,
            "tags": ["stress"],
        }
    if spec.form == "nested":
        return {
            "message_type": "inference_request",
            "request_id": spec.request_id,
            "data": {
                "worker_type": "sdxl_worker",
                "prompt": spec.prompt,
                "negative_prompt": "blurry",
                "model_name": spec.model,
                "hyperparameters": {"num_inference_steps": spec.steps, "guidance_scale": 7.5,
                                    "seed": spec.seed, "strength": 0.8},
                "dimensions": {"width": spec.width, "height": spec.height},
                "scheduler": "DPMSolverMultistepScheduler",
                "models": {"base": spec.model},
                "output": {"format": "png", "quality": 95, "save_path": "outputs/"},
                "batch": {"size": 1, "parallel": False},
                "metadata": {"request_id": spec.request_id, "priority": spec.priority,
                             "timeout": spec.timeout_s, "tags": ["stress"],
                             "stream": spec.stream},
            },
        }
    if spec.form == "legacy":
        return {
            "action": "generate",
            "session_id": spec.request_id,
            "prompt_submission": {
                "model": {"base": spec.model},
                "conditioning": {"prompt": spec.prompt, "negative_prompt": "blurry"},
                "hyperparameters": {"width": spec.width, "height": spec.height,
                                    "steps": spec.steps, "seed": spec.seed},
            },
        }
    raise ValueError(f"unknown form {spec.form!r}")


def big_json_body(spec: GenerationSpec, size_mb: float) -> bytes:
    """A legal flat generation request of about `size_mb` MB of JSON: the bulk is an unknown
    field holding a list of zeros (the contract ignores unknown fields with a warning), the
    body a hostile client sends to make the broker parse 30 M numbers."""
    head = encode(generation_body(spec), "json")[:-1]
    zeros = max(1, int(size_mb * 2**20) // 2)
    return head + b',"stress_padding":[' + b"0," * (zeros - 1) + b"0]}"


def big_msgpack_body(spec: GenerationSpec, size_mb: float) -> bytes:
    """A legal flat img2img request of about `size_mb` MB of msgpack: the bulk is the
    `init_image` as binary (the broker takes image bytes as they are; the worker decodes them,
    and a simulated worker never looks)."""
    body = generation_body(spec)
    body["init_image"] = b"\x89PNG\r\n\x1a\n" + bytes(max(0, int(size_mb * 2**20) - 8))
    body["strength"] = 0.5
    return encode(body, "msgpack")


def status_body(request_id: str) -> dict:
    return {"message_type": "status_request", "request_id": request_id}


def cancel_body(request_id: str) -> dict:
    return {"message_type": "cancel_request", "request_id": request_id}


def encode(body: dict, codec: str) -> bytes:
    if codec == "json":
        return json.dumps(body, separators=(",", ":")).encode("utf-8")
    if codec == "msgpack":
        return msgpack.packb(body, use_bin_type=True)
    raise ValueError(f"unknown codec {codec!r}")


def decode_reply(frame: bytes) -> dict | None:
    """A reply frame as a dict, or None when it is neither a JSON object nor a msgpack map
    (which the ledger then counts as a contract violation)."""
    if not frame:
        return None
    try:
        if frame[:1] == b"{":
            obj = json.loads(frame.decode("utf-8"))
        else:
            obj = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:
        return None
    return obj if isinstance(obj, dict) else None


def reply_codec(frame: bytes) -> str:
    return "json" if frame[:1] == b"{" else "msgpack"
