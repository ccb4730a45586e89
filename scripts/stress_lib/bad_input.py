"""The bad-input corpus: frames a broker must refuse with a typed error reply and survive.

Each case builds a fresh frame (random parts drawn from the run's seeded RNG) and names the
error codes that count as a correct refusal. `policed_by="worker"` marks cases only a worker
that resolves model files can refuse (e.g. '..' in a model name): a SIMULATED worker has no
model files, so in --sim runs those are reported, not counted as violations.
The oversized frame is not here: the socket drops it and sends no reply (see faults.py).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable

import msgpack

MALFORMED = "malformed_message"
VALIDATION = "validation_error"
UNKNOWN_TYPE = "unknown_message_type"
NOT_FOUND = "model_not_found"

TEN_MB = 10 * 1024 * 1024


@dataclass(frozen=True)
class BadCase:
    name: str
    build: Callable[[random.Random, str], bytes]  # (rng, request_id) -> frame
    expect: frozenset[str]
    policed_by: str = "broker"   # broker | worker
    heavy: bool = False          # 10 MB frames: sent at a limited rate


def _flat(request_id: str, **fields) -> dict:
    body = {"message_type": "generate_sdxl_enhanced", "request_id": request_id,
            "prompt": "bad input probe", "model_base": "tiny-sdxl", "width": 256, "height": 256,
            "steps": 2}
    body.update(fields)
    return body


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _mp(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _random_bytes(rng: random.Random, _rid: str) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 512)))


def _random_not_a_body(rng: random.Random, _rid: str) -> bytes:
    # first byte neither '{' nor a msgpack map: can never decode to an object
    first = rng.choice([b for b in range(256) if b not in range(0x80, 0x90) and b not in
                        (0xDE, 0xDF, ord("{"), 0x20, 0x09, 0x0A, 0x0D, 0xEF)])
    return bytes([first]) + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 256)))


def _truncated_msgpack(rng: random.Random, rid: str) -> bytes:
    full = _mp(_flat(rid))
    return full[: rng.randint(1, len(full) - 1)]


def _truncated_json(rng: random.Random, rid: str) -> bytes:
    full = _json(_flat(rid))
    return full[: rng.randint(1, len(full) - 2)]


def _json_not_object(rng: random.Random, _rid: str) -> bytes:
    return rng.choice([b"[1,2,3]", b'"generate_sdxl_enhanced"', b"42", b"null", b"true",
                       b'[{"message_type":"status_request"}]'])


def _msgpack_not_map(rng: random.Random, _rid: str) -> bytes:
    return _mp(rng.choice([[1, 2, 3], "status_request", 42, None, b"\x00\x01"]))


def _deep_json(rng: random.Random, rid: str) -> bytes:
    depth = rng.randint(1000, 100_000)
    prefix = _json(_flat(rid))[:-1] + b',"tags":'
    return prefix + b"[" * depth + b"]" * depth + b"}"


def _deep_msgpack(rng: random.Random, rid: str) -> bytes:
    depth = rng.randint(1000, 50_000)
    # the body's map packed by hand with one more key, "tags": a fixarray of one element
    # nested `depth` times (msgpack-python refuses to pack that deep itself)
    body = _flat(rid)
    n = len(body) + 1
    out = bytearray(b"\xde" + n.to_bytes(2, "big"))
    for k, v in body.items():
        out += _mp(k) + _mp(v)
    out += _mp("tags") + b"\x91" * depth + b"\xc0"
    return bytes(out)


def _ten_mb_scheduler(rng: random.Random, rid: str) -> bytes:
    body = _flat(rid, scheduler="S" * TEN_MB)
    return _json(body) if rng.random() < 0.5 else _mp(body)


def _ten_mb_with_bad_width(rng: random.Random, rid: str) -> bytes:
    body = _flat(rid, prompt_2="p" * TEN_MB, width=-256)
    return _json(body) if rng.random() < 0.5 else _mp(body)


def _wrong_types(rng: random.Random, rid: str) -> bytes:
    bad = rng.choice([
        {"width": "wide"}, {"steps": [4]}, {"prompt": 5}, {"guidance_scale": {"x": 1}},
        {"lora_names": "a", "lora_weights": "x"}, {"seed": "lucky"}, {"batch_size": 1.5},
        {"return_images": "maybe-later"}, {"priority": 3}, {"width": "256px"},
    ])
    body = _flat(rid, **bad)
    return _json(body) if rng.random() < 0.5 else _mp(body)


def _nan_json(rng: random.Random, rid: str) -> bytes:
    # Python's json writes the non-standard NaN / Infinity literals; the broker must refuse them
    field_name = rng.choice(["guidance_scale", "strength", "refiner_switch"])
    return json.dumps(_flat(rid, **{field_name: rng.choice([float("nan"), float("inf"),
                                                            float("-inf")])})).encode()


def _nan_msgpack(rng: random.Random, rid: str) -> bytes:
    field_name = rng.choice(["guidance_scale", "strength", "steps", "width"])
    return _mp(_flat(rid, **{field_name: rng.choice([float("nan"), float("inf"), float("-inf")])}))


def _bad_sizes(rng: random.Random, rid: str) -> bytes:
    bad = rng.choice([
        {"width": -512}, {"height": 0}, {"width": 10**30}, {"height": 2**63}, {"steps": -1},
        {"steps": 10**9}, {"batch_size": 10**6}, {"width": 257}, {"output_quality": 1000},
        {"lora_names": ["tiny-lora-a"], "lora_weights": [1e308]},
    ])
    body = _flat(rid, **bad)
    # huge ints do not fit msgpack: send those as JSON
    if any(isinstance(v, int) and abs(v) >= 2**63 for v in bad.values()):
        return _json(body)
    return _json(body) if rng.random() < 0.5 else _mp(body)


def _save_path_traversal(rng: random.Random, rid: str) -> bytes:
    path = rng.choice(["../../etc", "/etc/cron.d", "outputs/../../..", "..", "/tmp/x", "a/../../b"])
    body = _flat(rid, save_path=path)
    return _json(body) if rng.random() < 0.5 else _mp(body)


def _nested_save_path_traversal(rng: random.Random, rid: str) -> bytes:
    body = {"message_type": "inference_request", "request_id": rid,
            "data": {"prompt": "x", "model_name": "tiny-sdxl",
                     "output": {"format": "png", "save_path": rng.choice(["../up", "/abs"])}}}
    return _json(body) if rng.random() < 0.5 else _mp(body)


def _pickle_checkpoint(rng: random.Random, rid: str) -> bytes:
    bad = rng.choice([
        {"model_base": "evil.ckpt"}, {"model_base": "models/evil.pt"},
        {"lora_names": ["x"], "lora_paths": ["loras/x.bin"], "lora_weights": [0.5]},
        {"model_vae": "vae.pth"},
        {"textual_inversion_names": ["t"], "textual_inversion_paths": ["emb/t.pt"],
         "textual_inversion_tokens": ["<t>"]},
    ])
    body = _flat(rid, **bad)
    return _json(body) if rng.random() < 0.5 else _mp(body)


def _model_traversal(rng: random.Random, rid: str) -> bytes:
    bad = rng.choice([{"model_base": "../../../../etc/passwd"},
                      {"model_base": "/etc/shadow"},
                      {"lora_names": ["../../secret"], "lora_weights": [1.0]}])
    return _json(_flat(rid, **bad))


def _parallel_arrays(rng: random.Random, rid: str) -> bytes:
    body = _flat(rid, lora_names=["tiny-lora-a", "tiny-lora-b"], lora_weights=[0.5])
    return _json(body) if rng.random() < 0.5 else _mp(body)


def _unknown_type(rng: random.Random, rid: str) -> bytes:
    body = {"message_type": rng.choice(["generate_sdxl_ultra", "rm -rf", "", "status"]),
            "request_id": rid}
    return _json(body) if rng.random() < 0.5 else _mp(body)


def _no_type(rng: random.Random, rid: str) -> bytes:
    return _json({"request_id": rid, "prompt": "no message_type, no action"})


CORPUS: tuple[BadCase, ...] = (
    BadCase("random_bytes", _random_not_a_body, frozenset({MALFORMED})),
    BadCase("random_bytes_any_first_byte", _random_bytes,
            frozenset({MALFORMED, UNKNOWN_TYPE})),  # 0x80 alone is an empty msgpack map
    BadCase("empty_frame", lambda rng, rid: b"", frozenset({MALFORMED})),
    BadCase("truncated_msgpack", _truncated_msgpack, frozenset({MALFORMED})),
    BadCase("truncated_json", _truncated_json, frozenset({MALFORMED})),
    BadCase("invalid_utf8_json", lambda rng, rid: b'{"message_type":"\xff\xfe"}',
            frozenset({MALFORMED})),
    BadCase("json_not_object", _json_not_object, frozenset({MALFORMED})),
    BadCase("msgpack_not_map", _msgpack_not_map, frozenset({MALFORMED})),
    BadCase("deep_nesting_json", _deep_json, frozenset({MALFORMED, VALIDATION})),
    BadCase("deep_nesting_msgpack", _deep_msgpack, frozenset({MALFORMED, VALIDATION})),
    BadCase("ten_mb_scheduler", _ten_mb_scheduler, frozenset({VALIDATION}), heavy=True),
    BadCase("ten_mb_prompt_bad_width", _ten_mb_with_bad_width, frozenset({VALIDATION}),
            heavy=True),
    BadCase("wrong_types", _wrong_types, frozenset({VALIDATION})),
    BadCase("nan_inf_json", _nan_json, frozenset({MALFORMED, VALIDATION})),
    BadCase("nan_inf_msgpack", _nan_msgpack, frozenset({VALIDATION})),
    BadCase("negative_and_huge_sizes", _bad_sizes, frozenset({VALIDATION})),
    BadCase("save_path_traversal", _save_path_traversal, frozenset({VALIDATION})),
    BadCase("nested_save_path_traversal", _nested_save_path_traversal, frozenset({VALIDATION})),
    BadCase("pickle_checkpoint", _pickle_checkpoint, frozenset({VALIDATION})),
    BadCase("parallel_arrays_mismatch", _parallel_arrays, frozenset({VALIDATION})),
    BadCase("unknown_message_type", _unknown_type, frozenset({UNKNOWN_TYPE})),
    BadCase("no_message_type", _no_type, frozenset({UNKNOWN_TYPE, MALFORMED, VALIDATION})),
    BadCase("model_name_traversal", _model_traversal, frozenset({VALIDATION, NOT_FOUND}),
            policed_by="worker"),
)


def case_by_name(name: str) -> BadCase:
    for case in CORPUS:
        if case.name == name:
            return case
    raise KeyError(name)
