"""Request and reply JSON (one parser and encoder: orjson), the nesting limit, and the broker's
duplicate-check fingerprint, which must stay what journals on disk already hold."""

import base64
import hashlib
import json

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol import constants as C
from protocol.errors import ProtocolError, ValidationFailed
from protocol.job import Job
from protocol.parse import body_fingerprint, parse_request
from protocol.translate import _EXPLICIT_NAMES

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("frame, expected", [
    (b'\xef\xbb\xbf{"a": 1}', {"a": 1}),                     # one UTF-8 BOM is allowed
    (b' \n{"a": [1, 2.5, -0.0, "\\u00e9", null, true]}\n', {"a": [1, 2.5, -0.0, "\u00e9", None, True]}),
    (b'{"a": 1, "a": 2, "b": {"a": 3}}', {"a": 2, "b": {"a": 3}}),   # duplicate keys: last wins
    (b'{"f": 0.30000000000000004, "g": 5e-324, "h": 1.7976931348623157e308}',
     {"f": 0.30000000000000004, "g": 5e-324, "h": 1.7976931348623157e308}),
    (b'{"n": 18446744073709551615, "m": -9223372036854775808}',
     {"n": 18446744073709551615, "m": -9223372036854775808}),
    (b'{"seed": 18446744073709551616}', {"seed": 1.8446744073709552e19}),  # past 64 bits: a float
])
def test_json_frames_decode_to_these_values(frame, expected):
    decoded, name = codec.decode(frame)
    assert name == C.CODEC_JSON and decoded == expected
    assert [type(v) for v in decoded.values()] == [type(v) for v in expected.values()]


@pytest.mark.parametrize("frame", [
    b'{"a": NaN}', b'{"a": -Infinity}', b'{"x": 1e400}',   # not JSON / not a double
    b'{"s": "\\ud800"}',                                   # a lone surrogate
    b'{"a": "\xff"}',                                      # not UTF-8
    b'{"a": 1', b'{"a": 1}}', b'\xef\xbb\xbf\xef\xbb\xbf{"a": 1}',
])
def test_bad_json_is_malformed(frame):
    with pytest.raises(ProtocolError) as info:
        codec.decode(frame)
    assert info.value.code == C.MALFORMED_MESSAGE
    assert info.value.message.startswith("cannot decode json body")


def test_a_seed_past_64_bits_is_a_validation_error_not_a_crash():
    body = b'{"message_type": "generate_sdxl_enhanced", "prompt": "p", "model_base": "m", ' \
           b'"seed": 18446744073709551616}'
    with pytest.raises(ValidationFailed) as info:
        parse_request(codec.decode(body)[0])
    assert [e.field for e in info.value.errors] == ["seed"]


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


def test_json_replies_encode_bytes_sets_tuples_int_keys_and_non_finite_numbers():
    reply = {"message_type": "x", "data": {"a": [1, 2.5, None, True, "é"], "t": (1, 2), "s": {3}},
             "b": b"\x00\x01\xff", 7: "int key", "nan": float("nan"), "inf": [float("-inf")]}
    assert json.loads(codec.encode(reply, C.CODEC_JSON)) == {
        "message_type": "x", "data": {"a": [1, 2.5, None, True, "é"], "t": [1, 2], "s": [3]},
        "b": base64.b64encode(b"\x00\x01\xff").decode(), "7": "int key", "nan": None, "inf": [None]}


def test_a_json_reply_with_an_int_beyond_64_bits_is_refused_with_a_type_error():
    # the broker turns it into an internal_error reply (broker/server.py _send_to_client)
    with pytest.raises(TypeError):
        codec.encode({"n": 2**70}, C.CODEC_JSON)


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


def test_protocol_cost_compares_with_a_baseline_commit(capsys):
    """--baseline runs both sides in subprocesses and prints each row's change (here against
    the commit the branch stands on; the figures are printed, never asserted)."""
    from bench import protocol_cost
    assert protocol_cost.main(["--baseline", "HEAD", "--rounds", "1", "--repeat", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("nested, 3 LoRAs + 2 ControlNets") == 2 and "largest change" in out
    assert all(line.rstrip().endswith("%") for line in out.splitlines()[2:10])


# --- the broker's duplicate check: body_fingerprint ------------------------------------------

def _reference_canonical(obj):
    """The fingerprint's definition since it was introduced (journals hold its hashes)."""
    if isinstance(obj, dict):
        return {str(k): _reference_canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_reference_canonical(v) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$bytes": hashlib.sha256(bytes(obj)).hexdigest()}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def reference_fingerprint(body: dict) -> str:
    text = json.dumps(_reference_canonical(body), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, default=repr)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def test_fingerprints_stay_what_the_journal_already_holds():
    # values computed by the code before this change: stored fingerprints must still match
    from bench.protocol_cost import FLAT_FULL, NESTED_FULL
    assert body_fingerprint(NESTED_FULL) == \
        "5f4e925e0a0aae54827b38bb1f225ed31e830eaf43c52cf2a4e16cc1c7f6e60b"
    assert body_fingerprint(FLAT_FULL) == \
        "57bbe8752384c69ba6986765b688e3db2f34c351232e719a8aac7b37d9380339"
    assert body_fingerprint({"a": {2: 1, 10: 3, True: 0}, "b": b"x",
                             "c": (1.5e-7, float("nan"))}) == \
        "18b8c5e501ee11033f1b9f0e4fa8cc72f6e4af4dadd1a0c36618356cc65a05e4"


def test_delivery_fields_do_not_change_the_fingerprint():
    from bench.protocol_cost import FLAT_FULL
    base = {k: v for k, v in FLAT_FULL.items() if k not in ("stream", "preview", "preview_size")}
    assert body_fingerprint({**base, "stream": True}) == body_fingerprint(base)
    assert body_fingerprint({**base, "prompt": "other"}) != body_fingerprint(base)


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
def test_fingerprints_keep_their_definition_for_any_body(body):
    for transport_only in ("stream", "preview", "preview_size"):
        body.pop(transport_only, None)
    assert body_fingerprint(body) == reference_fingerprint(body)


def test_fingerprint_of_unusual_containers_and_keys():
    import collections
    pair = collections.namedtuple("pair", "a b")
    for body in ({"x": pair({2: 1, 10: 2}, 3)}, {"x": msgpack.ExtType(5, b"\x01")},
                 {"x": {10: 1, 2: 2}}, {"x": [{"k": {3: 1, 20: 2}}]}):
        assert body_fingerprint(body) == reference_fingerprint(body)
