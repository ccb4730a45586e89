"""Property tests: valid jobs survive the translations; malformed bodies only ever produce a
typed ProtocolError (malformed_message, unknown_message_type or validation_error)."""

import json
import string

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol import constants as C
from protocol.errors import ProtocolError
from protocol.normalize import SCHEDULER_NAMES
from protocol.parse import body_fingerprint, parse_request
from protocol.translate import job_to_flat, job_to_legacy, job_to_nested

pytestmark = pytest.mark.slow  # hypothesis runs take a few seconds each

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLIENT_ERRORS = {C.MALFORMED_MESSAGE, C.UNKNOWN_MESSAGE_TYPE, C.VALIDATION_ERROR}

names = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)
paths = names.map(lambda n: f"models/{n}.safetensors")
images = st.one_of(names.map(lambda n: f"inputs/{n}.png"), st.binary(min_size=1, max_size=16))
texts = st.text(max_size=30)
bounded = lambda lo, hi: st.floats(lo, hi, allow_nan=False, allow_infinity=False)  # noqa: E731

OPTIONAL_FLAT = {
    "negative_prompt": texts, "prompt_2": texts, "negative_prompt_2": texts,
    "width": st.integers(32, 256).map(lambda k: k * 8),
    "height": st.integers(32, 256).map(lambda k: k * 8),
    "steps": st.integers(1, 150), "guidance_scale": bounded(1.0, 30.0),
    "seed": st.integers(-1, C.MAX_SEED), "strength": bounded(0.0, 1.0),
    "scheduler": st.sampled_from(SCHEDULER_NAMES), "use_karras_sigmas": st.booleans(),
    "clip_skip": st.integers(0, C.MAX_CLIP_SKIP), "model_refiner": paths, "model_vae": paths,
    "refiner_switch": bounded(0.01, 0.99), "batch_size": st.integers(1, 9),
    "output_format": st.sampled_from(["png", "jpeg", "webp", "JPG"]),
    "output_quality": st.integers(1, 100), "save_path": st.sampled_from(["outputs/", "a/b", "x"]),
    "return_images": st.booleans(), "upscale_factor": bounded(1.0, C.MAX_UPSCALE_FACTOR),
    "upscale_method": st.one_of(names, st.sampled_from([*C.UPSCALE_METHODS, "Lanczos"])),
    "auto_contrast": st.booleans(), "dtype": st.sampled_from(C.DTYPES),
    "vae_dtype": st.sampled_from(C.DTYPES), "attention_slicing": st.booleans(),
    "vae_slicing": st.booleans(), "vae_tiling": st.booleans(), "cpu_offload": st.booleans(),
    "device": st.sampled_from(["cpu", "cuda:0", "cuda:1"]),
    "priority": st.sampled_from(C.PRIORITIES), "timeout": bounded(0.5, 3600.0),
    "tags": st.lists(names, max_size=3), "stream": st.booleans(),
}


@st.composite
def flat_bodies(draw):
    body = {"message_type": C.GENERATE_FLAT, "request_id": draw(names),
            "prompt": draw(texts.filter(lambda s: s.strip())), "model_base": draw(paths)}
    for key, strategy in OPTIONAL_FLAT.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    if draw(st.booleans()):
        body["init_image"] = draw(images)
        body["strength"] = draw(bounded(0.5, 1.0))  # with steps >= 2: a denoising step is left
        body["steps"] = max(body.get("steps", C.DEFAULT_STEPS), 2)
        if draw(st.booleans()):
            body["mask_image"] = draw(images)
    n = draw(st.integers(0, 3))
    if n:
        how = draw(st.sampled_from(["names", "paths", "both"]))
        if how in ("names", "both"):
            body["lora_names"] = draw(st.lists(names, min_size=n, max_size=n))
        if how in ("paths", "both"):
            body["lora_paths"] = draw(st.lists(paths, min_size=n, max_size=n))
        if draw(st.booleans()):
            body["lora_weights"] = draw(st.lists(bounded(-2.0, 2.0), min_size=n, max_size=n))
    n = draw(st.integers(0, 3))
    if n:
        body["controlnet_images"] = draw(st.lists(images, min_size=n, max_size=n))
        if draw(st.booleans()):
            body["controlnet_types"] = draw(st.lists(st.sampled_from(C.CONTROLNET_TYPES),
                                                     min_size=n, max_size=n))
        if draw(st.booleans()):
            body["controlnet_weights"] = draw(st.lists(bounded(0.0, 2.0), min_size=n, max_size=n))
        if draw(st.booleans()):
            body["controlnet_models"] = draw(st.lists(paths, min_size=n, max_size=n))
    n = draw(st.integers(0, 2))
    if n:
        body["textual_inversion_names"] = draw(st.lists(names, min_size=n, max_size=n))
        if draw(st.booleans()):
            body["textual_inversion_tokens"] = draw(st.lists(names.map(lambda s: f"<{s}>"),
                                                             min_size=n, max_size=n))
    return body


def _without(job, *fields):
    # `sources` says where a nested field came from (for error paths), like `form`
    return job.model_dump(exclude={"sources", *fields})


def _via_msgpack(body: dict) -> dict:
    decoded, codec_name = codec.decode(codec.encode(body, C.CODEC_MSGPACK))
    assert codec_name == C.CODEC_MSGPACK
    return decoded


@SETTINGS
@given(flat_bodies())
def test_job_survives_flat_round_trip(body):
    job = parse_request(body).job
    again = parse_request(_via_msgpack(job_to_flat(job))).job
    assert again == job


@SETTINGS
@given(flat_bodies())
def test_job_survives_nested_round_trip(body):
    job = parse_request(body).job
    nested = job_to_nested(job)
    again = parse_request(_via_msgpack(nested)).job
    # the nested form always carries every field, so `explicit` grows; nothing else changes
    assert _without(again, "form", "explicit") == _without(job, "form", "explicit")
    third = parse_request(_via_msgpack(job_to_nested(again))).job
    assert third == again
    assert job_to_nested(third) == nested


@SETTINGS
@given(flat_bodies())
def test_job_survives_legacy_round_trip(body):
    job = parse_request(body).job
    again = parse_request(_via_msgpack(job_to_legacy(job))).job
    assert _without(again, "form") == _without(job, "form")


@SETTINGS
@given(flat_bodies())
def test_job_survives_the_wire_between_broker_and_worker(body):
    job = parse_request(body).job
    wire = _via_msgpack(job.to_wire())
    assert type(job).from_wire(wire) == job


@SETTINGS
@given(flat_bodies(), st.booleans())
def test_fingerprint_ignores_key_order_and_stream_but_not_content(body, stream):
    reordered = dict(reversed(list(body.items())))
    assert body_fingerprint(reordered) == body_fingerprint({**body, "stream": stream})
    assert body_fingerprint({**body, "prompt": body["prompt"] + "!"}) != body_fingerprint(body)


# --- fuzz -------------------------------------------------------------------------------------

def _only_client_errors(call):
    try:
        call()
    except ProtocolError as exc:
        assert exc.code in CLIENT_ERRORS, (exc.code, exc.message)
        return exc
    return None


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_typed_errors(frame):
    def run():
        body, _ = codec.decode(frame)
        parse_request(body)
    _only_client_errors(run)


@SETTINGS
@given(flat_bodies(), st.integers(1, 200))
def test_truncated_msgpack_only_raises_typed_errors(body, cut):
    frame = msgpack.packb(body, use_bin_type=True)
    _only_client_errors(lambda: parse_request(codec.decode(frame[: max(1, len(frame) - cut)])[0]))


junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                        max_size=4),
    max_leaves=10)


@SETTINGS
@given(flat_bodies(), st.data())
def test_wrong_types_anywhere_only_raise_typed_errors(body, data):
    nested = data.draw(st.booleans())
    if nested:
        body = job_to_nested(parse_request(body).job)
        target = body["data"]
    else:
        target = body
    for _ in range(data.draw(st.integers(1, 4))):
        key = data.draw(st.sampled_from(sorted(target)))
        if key == "message_type":
            continue
        target[key] = data.draw(junk)
    _only_client_errors(lambda: parse_request(body))


@SETTINGS
@given(st.sampled_from(sorted(set(C.REPLY_TYPE))), st.dictionaries(st.text(max_size=12), junk,
                                                                    max_size=6))
def test_random_fields_for_every_type_only_raise_typed_errors(message_type, fields):
    _only_client_errors(lambda: parse_request({**fields, "message_type": message_type}))


def test_pathological_bodies():
    deep: dict = {"prompt": "p"}
    node = deep
    for _ in range(200):
        node["x"] = {}
        node = node["x"]
    # a deep unknown field is ignored with a warning (the codec bounds depth off the wire)
    assert parse_request({"message_type": "generate_sdxl_enhanced", "prompt": "p",
                          "model_base": "m", "data": deep}).warnings == ["unknown field 'data' ignored"]
    cases = [
        {"message_type": "inference_request", "data": {"prompt": "x" * (1 << 20),
                                                       "model_name": "y" * (1 << 20)}},
        {"message_type": "generate_sdxl_enhanced", "prompt": "p", "model_base": "m",
         "width": 10**400, "seed": -(10**400), "guidance_scale": 1e308 * 10},
        {"message_type": "generate_sdxl_enhanced", "prompt": "p", "model_base": "m",
         "lora_names": ["a"] * 10_000},
        {"message_type": "cleanup", "data": {"workers": [None, 1, {}]}},
        {"message_type": "generate_sdxl_enhanced", 7: "int key"},
    ]
    for body in cases:
        assert _only_client_errors(lambda: parse_request(body)) is not None
    # deep bodies off the wire are stopped by the codec, not by a RecursionError
    frame = ("{\"a\":" * 5000 + "1" + "}" * 5000).encode()
    assert _only_client_errors(lambda: parse_request(codec.decode(frame)[0])).code == C.MALFORMED_MESSAGE
    frame = json.dumps({"message_type": "generate_sdxl_enhanced", "prompt": "p",
                        "model_base": "m", "steps": float("nan")}).encode()
    assert _only_client_errors(lambda: parse_request(codec.decode(frame)[0])).code == C.MALFORMED_MESSAGE


@st.composite
def nested_bodies(draw):
    """C#-shaped nested bodies, with the nested-only knobs (preprocessor, several ControlNets,
    an explicit worker_type, LoRA paths) varied."""
    body = job_to_nested(parse_request(draw(flat_bodies())).job)
    data = body["data"]
    for cn in [data["controlnet"], *data.get("controlnets", [])]:
        if cn.get("enabled") and draw(st.booleans()):
            cn["preprocessor"] = {"enabled": draw(st.booleans()),
                                  "resolution": draw(st.integers(64, 2048))}
    if draw(st.booleans()):
        data["worker_type"] = draw(st.sampled_from([C.WORKER_BASIC, C.WORKER_ENHANCED]))
    if draw(st.booleans()):
        data["metadata"]["stream"] = draw(st.booleans())
    return body


@SETTINGS
@given(nested_bodies())
def test_nested_bodies_survive_job_round_trip(body):
    job = parse_request(body).job
    again = parse_request(_via_msgpack(job_to_nested(job))).job
    assert _without(again, "explicit") == _without(job, "explicit")
