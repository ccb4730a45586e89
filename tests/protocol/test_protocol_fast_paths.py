"""The hot path's shortcuts give exactly what the plain code gives: orjson vs the stdlib JSON
parser, the counted depth bound vs the walk, the reused JSON encoder, the unknown-field walk
that checks leaf sections inline, and the fingerprint that skips rebuilding str-keyed bodies
(issue 3's speed work must not change behaviour)."""

import base64
import hashlib
import json

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import codec, parse
from protocol import constants as C
from protocol.errors import ProtocolError, ValidationFailed
from protocol.job import Job
from protocol.parse import body_fingerprint, parse_request
from protocol.translate import _EXPLICIT_NAMES

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same_objects(a, b) -> bool:
    """Equal and of the same types all the way down (1 is not 1.0; -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_objects(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_objects(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return repr(a) == repr(b)
    return a == b


def stdlib_decode(frame: bytes):
    """What decode did before orjson: json.loads on the utf-8-sig text, NaN refused."""
    def refuse(name):
        raise ValueError(f"{name} is not valid JSON")
    return json.loads(frame.decode("utf-8-sig"), parse_constant=refuse)


def with_and_without_orjson(request, monkeypatch, module) -> str:
    """For a fixture parametrized ["orjson", other]: skip the orjson case when it is not
    installed; in the other case hide orjson from `module`."""
    if request.param == "orjson":
        if module.orjson is None:
            pytest.skip("orjson is not installed")
    else:
        monkeypatch.setattr(module, "orjson", None)
    return request.param


@pytest.fixture(params=["orjson", "stdlib"])
def json_parser(request, monkeypatch):
    """Runs a test with orjson (when installed) and with the stdlib parser alone."""
    return with_and_without_orjson(request, monkeypatch, codec)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20)


@SETTINGS
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6), st.booleans())
def test_json_bodies_decode_to_the_same_objects_as_the_stdlib(body, ascii_only):
    frame = json.dumps(body, ensure_ascii=ascii_only).encode()
    decoded, name = codec.decode(frame)
    assert name == C.CODEC_JSON
    assert same_objects(decoded, stdlib_decode(frame))


# what orjson refuses or reads differently; the stdlib parser must decide these
EDGE_FRAMES = [
    b'{"seed": 18446744073709551616}',  # past 64 bits: orjson would give a float
    b'{"seed": -9223372036854775809}',
    b'{"seed": 1234567890123456789012345678901234567890}',
    b'{"x": 1e400, "y": -1e400}',  # infinity from a literal
    b'{"s": "\\ud800"}',  # a lone surrogate
    b'\xef\xbb\xbf{"a": 1}',  # a UTF-8 BOM
    b' \n{"a": [1, 2.5, -0.0, "\\u00e9", null, true]}\n',
    b'{"a": 1, "a": 2, "b": {"a": 3}}',  # duplicate keys: the last wins, first position kept
    b'{"f": 0.30000000000000004, "g": 5e-324, "h": 1.7976931348623157e308}',
]


@pytest.mark.parametrize("frame", EDGE_FRAMES)
def test_edge_json_frames_decode_as_the_stdlib_does(frame, json_parser):
    assert same_objects(codec.decode(frame)[0], stdlib_decode(frame))


@pytest.mark.parametrize("frame, message", [
    (b'{"a": NaN}', "NaN is not valid JSON"),
    (b'{"a": -Infinity}', "-Infinity is not valid JSON"),
    (b'{"a": 1', "Expecting ',' delimiter"),
    (b'{"a": 1}}', "Extra data"),
    (b'\xef\xbb\xbf\xef\xbb\xbf{"a": 1}', "Unexpected UTF-8 BOM"),
    (b'{"a": "\xff"}', "can't decode byte 0xff"),
])
def test_bad_json_is_malformed_with_the_stdlib_wording(frame, message, json_parser):
    with pytest.raises(ProtocolError) as info:
        codec.decode(frame)
    assert info.value.code == C.MALFORMED_MESSAGE
    assert message in info.value.message


def nested_value(depth: int, leaf):
    """A body whose `v` holds `depth` more levels of maps around `leaf`."""
    value = leaf
    for _ in range(depth):
        value = {"k": value}
    return {"v": value}


def depth_ok_by_definition(obj, depth=0) -> bool:
    if depth > 64:
        return False
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    return all(depth_ok_by_definition(v, depth + 1) for v in children)


@pytest.mark.parametrize("codec_name", [C.CODEC_JSON, C.CODEC_MSGPACK])
@pytest.mark.parametrize("padding", [0, 20_000])  # small frames are counted, big ones walked
@pytest.mark.parametrize("depth", [62, 63, 64])
@pytest.mark.parametrize("leaf", [1, {}, [], [1], {"x": 1}])
def test_depth_limit_is_exact(codec_name, padding, depth, leaf):
    body = {"pad": "p" * padding, **nested_value(depth, leaf)}
    frame = codec.encode(body, codec_name)
    if depth_ok_by_definition(body):
        assert codec.decode(frame)[0] == body
    else:
        with pytest.raises(ProtocolError) as info:
            codec.decode(frame)
        assert info.value.code == C.MALFORMED_MESSAGE
        assert "nests deeper than 64 levels" in info.value.message


def test_the_depth_cases_straddle_the_limit():
    assert depth_ok_by_definition(nested_value(63, 1))
    assert not depth_ok_by_definition(nested_value(64, 1))
    assert not depth_ok_by_definition(nested_value(63, [1]))


@pytest.mark.parametrize("codec_name", [C.CODEC_JSON, C.CODEC_MSGPACK])
def test_container_bytes_inside_strings_do_not_make_a_body_deep(codec_name):
    body = {"prompt": "{[" * 200, "blob": bytes(range(0x80, 0xA0)) * 10}
    if codec_name == C.CODEC_JSON:
        body["blob"] = "\u0080" * 100
    assert codec.decode(codec.encode(body, codec_name))[0] == body


def test_wide_lists_and_deep_lists_in_msgpack():
    wide = {"v": [[i] for i in range(500)]}
    assert codec.decode(msgpack.packb(wide))[0] == wide
    deep: list = [1]
    for _ in range(80):
        deep = [deep]
    with pytest.raises(ProtocolError):
        codec.decode(msgpack.packb({"v": deep}))


@pytest.mark.parametrize("obj", [
    {"message_type": "x", "data": {"a": [1, 2.5, None, True, "é"], "t": (1, 2), "s": {3}},
     "b": b"\x00\x01\xff", 7: "int key"},
    {"nan": float("nan"), "inf": [float("inf")], "ok": 1.0},
])
def test_json_replies_read_back_as_json_dumps_output_does(obj):
    """orjson encodes replies; a JSON parser must read the same value json.dumps gave."""
    def default(o):
        if isinstance(o, bytes):
            return base64.b64encode(o).decode("ascii")
        return list(o)
    try:
        expected = json.dumps(obj, default=default, allow_nan=False, separators=(",", ":"))
    except ValueError:
        expected = json.dumps(codec._finite(obj), default=default, separators=(",", ":"))
    assert json.loads(codec.encode(obj, C.CODEC_JSON)) == json.loads(expected)


def test_json_reply_with_an_int_beyond_64_bits_still_encodes():
    assert json.loads(codec.encode({"n": 2**70}, C.CODEC_JSON)) == {"n": 2**70}


def test_unknown_fields_are_named_in_field_order_at_every_level():
    body = {"message_type": "inference_request", "x": 1, "request_id": "w",
            "data": {"prompt": "p", "y": 2, "a_extra": 0, "models": {"base": "m"},
                     "hyperparameters": {"seed": 1, "h": 1},
                     "lora": {"z": 3, "models": [{"name": "a", "q": 1}, {"name": "b", "r": 2}]},
                     "controlnet": {"c": 1, "control_image": "e.png", "preprocessor": {"p": 1}},
                     "output": {"o": 1, "upscale": {"u": 1, "factor": 2}},
                     "controlnets": [{"control_image": "d.png", "preprocessor": {"p2": 1}}]}}
    assert parse_request(body).warnings == [
        "unknown fields ignored: x, data.a_extra, data.y, data.hyperparameters.h, data.lora.z, "
        "data.lora.models[0].q, data.lora.models[1].r, data.controlnet.c, "
        "data.controlnet.preprocessor.p, data.output.o, data.output.upscale.u, "
        "data.controlnets[0].preprocessor.p2"]
    legacy = {"action": "generate", "session_id": "l", "k": 1,
              "prompt_submission": {"model": {"base": "m", "mm": 1}, "s": 2,
                                    "conditioning": {"prompt": "p", "cc": 1,
                                                     "loras": [{"name": "a", "ll": 1}],
                                                     "controlnets": [{"image": "i.png", "cn": 1}]},
                                    "metadata": {"md": 1}}}
    assert parse_request(legacy).warnings == [
        "unknown fields ignored: k, prompt_submission.s, prompt_submission.model.mm, "
        "prompt_submission.conditioning.cc, prompt_submission.conditioning.loras[0].ll, "
        "prompt_submission.conditioning.controlnets[0].cn, prompt_submission.metadata.md"]


def test_null_items_rule_past_the_shortcut():
    # names without a None but shorter than the paths: the last path's item has neither
    body = {"message_type": "generate_sdxl_enhanced", "prompt": "p", "model_base": "m",
            "lora_names": ["a"], "lora_paths": ["x/a.safetensors", None]}
    with pytest.raises(ValidationFailed) as info:
        parse_request(body)
    assert {e.field: e.message for e in info.value.errors} == {
        "lora_names,lora_paths": "parallel arrays differ in length: lora_names (1), lora_paths (2)",
        "lora_names[1]": "each LoRA needs a name or a path"}


def test_explicit_names_cover_every_section_field():
    for section, names in _EXPLICIT_NAMES.items():
        fields = Job.model_fields[section].annotation.model_fields
        assert set(names) == set(fields)
        assert all(spelled == f"{section}.{name}" for name, spelled in names.items())


def test_scheduler_spellings_resolve_as_their_normalized_names():
    from protocol import normalize
    for spelling, resolved in normalize._SCHEDULER_SPELLINGS.items():
        assert normalize._SCHEDULER_ALIASES[" ".join(spelling.split()).lower()] == resolved
        assert normalize.resolve_scheduler(f" {spelling.upper()} ") == resolved


@pytest.mark.parametrize("flags", [[], ["--cpu-time"]])
def test_protocol_cost_bench_runs_and_prints_every_case(flags, capsys):
    from bench import protocol_cost
    assert protocol_cost.main(["--repeat", "3", *flags]) == 0
    out = capsys.readouterr().out
    for label in ("nested, 3 LoRAs + 2 ControlNets", "flat, seed example 1", "legacy, 3 LoRAs",
                  "of which pydantic validate_json", "final reply"):
        assert label in out
    assert ("thread CPU" in out) == bool(flags)


# --- the broker's duplicate check: body_fingerprint ------------------------------------------

def reference_fingerprint(body: dict) -> str:
    """body_fingerprint as it was before the shortcut (bodies here carry no `stream`)."""
    text = json.dumps(parse._canonical(body), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, default=repr)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@pytest.fixture(params=["orjson", "plain"])
def key_check(request, monkeypatch):
    """Runs a test with the orjson key check and without it (every body the slow way)."""
    return with_and_without_orjson(request, monkeypatch, parse)


def test_fingerprints_stay_what_the_journal_already_holds(key_check):
    # values computed by the code before this change: stored fingerprints must still match
    from bench.protocol_cost import FLAT_FULL, NESTED_FULL
    assert body_fingerprint(NESTED_FULL) == \
        "5f4e925e0a0aae54827b38bb1f225ed31e830eaf43c52cf2a4e16cc1c7f6e60b"
    assert body_fingerprint(FLAT_FULL) == \
        "57bbe8752384c69ba6986765b688e3db2f34c351232e719a8aac7b37d9380339"
    assert body_fingerprint({"a": {2: 1, 10: 3, True: 0}, "b": b"x",
                             "c": (1.5e-7, float("nan"))}) == \
        "18b8c5e501ee11033f1b9f0e4fa8cc72f6e4af4dadd1a0c36618356cc65a05e4"


fingerprint_keys = st.one_of(st.text(max_size=5), st.integers(-20, 20), st.booleans(), st.none())
fingerprint_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=5), children, max_size=3)
    | st.dictionaries(fingerprint_keys, children, max_size=3),
    max_leaves=15)


@SETTINGS
@given(st.dictionaries(st.text(max_size=6), fingerprint_values, max_size=5))
def test_fingerprints_equal_the_reference_for_any_body(body):
    body.pop("stream", None)
    assert body_fingerprint(body) == reference_fingerprint(body)


def test_fingerprint_of_containers_orjson_does_not_walk(key_check):
    import collections
    pair = collections.namedtuple("pair", "a b")
    for body in ({"x": pair({2: 1, 10: 2}, 3)}, {"x": msgpack.ExtType(5, b"\x01")},
                 {"x": {10: 1, 2: 2}}, {"x": [{"k": {3: 1, 20: 2}}]}):
        assert body_fingerprint(body) == reference_fingerprint(body)


number_literals = st.builds(
    lambda sign, digits, point, exponent: (
        sign + (digits[:point] + "." + digits[point:] if 0 < point < len(digits) else digits)
        + exponent),
    st.sampled_from(["", "-"]),
    st.text("0123456789", min_size=1, max_size=18).map(lambda d: d.lstrip("0") or "0"),
    st.integers(0, 18),
    st.one_of(st.just(""), st.builds(lambda e, s, n: f"{e}{s}{n}", st.sampled_from("eE"),
                                     st.sampled_from(["", "+", "-"]), st.integers(0, 400))))


@SETTINGS
@given(st.lists(number_literals, min_size=1, max_size=8))
def test_number_literals_parse_as_the_stdlib_parses_them(literals):
    frame = ('{"n": [' + ", ".join(literals) + "]}").encode()
    expected = stdlib_decode(frame)  # every literal built above is valid JSON
    assert same_objects(codec.decode(frame)[0], expected)
