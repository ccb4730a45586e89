"""The committed JSON Schemas are current, real replies match the reply schemas, and the
`sdxl-broker translate` command behaves as the contract says."""

import json
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from protocol import constants as C
from protocol import reply_models as R
from protocol import schema_gen
from protocol.errors import FieldError, ProtocolError, ValidationFailed
from protocol.replies import error_reply, final_reply, progress_message

VECTORS = Path(__file__).with_name("vectors")


def test_committed_schemas_are_current(tmp_path):
    schema_gen.write_all(tmp_path)
    generated = {p.name: p.read_text() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_text() for p in schema_gen.SCHEMA_DIR.glob("*.json")}
    assert generated == committed, "run: python -m protocol.schema_gen"


def test_schemas_carry_the_seed_bounds():
    flat = json.loads((schema_gen.SCHEMA_DIR / "request.generate_sdxl_enhanced.json").read_text())
    width = flat["properties"]["width"]["anyOf"][0]
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (256, 2048, 8)
    assert flat["required"] == ["prompt"]
    nested = json.loads((schema_gen.SCHEMA_DIR / "request.inference_request.json").read_text())
    assert "data" in nested["required"] and "NestedData" in nested["$defs"]


def test_reply_builders_match_the_reply_models():
    ok = final_reply("inference_response", "r1", success=True, warnings=["w"], data={
        "generated_images": [{"index": 0, "seed": 5, "width": 256, "height": 256, "format": "png",
                              "path": "outputs/a.png", "sha256": "00", "image": b"\x89PNG"}],
        "processing_metrics": {"total_time": 1.0, "queue_time": 0.1, "inference_time": 0.8,
                               "preprocessing_time": 0.0, "postprocessing_time": 0.1,
                               "device_name": "cpu", "worker_id": "w1", "memory_used_mb": 500.0,
                               "model_info": {"base": "tiny-sdxl"}},
        "features_used": ["txt2img"]})
    R.GenerationReply.model_validate(ok)
    err = error_reply("generate_response", "r2",
                      ValidationFailed([FieldError("prompt", "is required")]))
    parsed = R.FinalReply.model_validate(err)
    assert parsed.error_code == C.VALIDATION_ERROR and parsed.errors[0].field == "prompt"
    R.ProgressMessage.model_validate(progress_message("r3", "denoising", step=2, total_steps=4))
    with pytest.raises(Exception):
        R.FinalReply.model_validate({**err, "error_code": "no_such_code"})


def translate(*args, stdin: bytes | None = None):
    """The real console entry point in a child process (one run per test: it costs ~1 s)."""
    return subprocess.run([sys.executable, "-m", "broker.cli", "translate", *args], input=stdin,
                          capture_output=True, timeout=120)


def translate_here(monkeypatch, capsys, *args, stdin: bytes = b""):
    """The same command in this process: (exit code, stdout, stderr)."""
    import io

    from broker.cli import main
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = main(["translate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_translate_console_script_reproduces_a_seed_example():
    out = translate("--to", "legacy", "--default-model-base", "/models/base.safetensors",
                    str(VECTORS / "seed1_example2_request.json"))
    assert out.returncode == 0, out.stderr
    expected = json.loads((VECTORS / "seed1_example2_legacy.json").read_text())
    assert json.dumps(json.loads(out.stdout), sort_keys=True) == json.dumps(expected, sort_keys=True)


def test_translate_command(monkeypatch, capsys):
    code, out, err = translate_here(monkeypatch, capsys, "--to", "legacy",
                                    str(VECTORS / "seed1_example1_request.json"))
    assert code == 0, err
    expected = json.loads((VECTORS / "seed1_example1_legacy.json").read_text())
    assert json.dumps(json.loads(out), sort_keys=True) == json.dumps(expected, sort_keys=True)
    # msgpack on stdin, nested output, bytes shown as base64
    body = {"message_type": "generate_sdxl_enhanced", "prompt": "p", "model_base": "tiny-sdxl",
            "init_image": b"\x01\x02", "request_id": "m", "colour": "red"}
    code, out, err = translate_here(monkeypatch, capsys, "--to", "nested", "-",
                                    stdin=msgpack.packb(body, use_bin_type=True))
    assert code == 0, err
    assert json.loads(out)["data"]["init_image"] == "AQI="
    assert "warning: unknown field 'colour' ignored" in err
    # canonical by default
    code, out, _ = translate_here(monkeypatch, capsys, str(VECTORS / "phase6_csharp_nested_request.json"))
    assert code == 0 and json.loads(out)["worker_type"] == C.WORKER_ENHANCED


def test_translate_command_lists_every_error(monkeypatch, capsys):
    bad = json.dumps({"message_type": "generate_sdxl_enhanced", "prompt": "", "steps": 0,
                      "width": 100, "lora_names": ["a"], "lora_weights": [1, 1]}).encode()
    code, out, err = translate_here(monkeypatch, capsys, "-", stdin=bad)
    assert code == 1 and out == ""
    assert "5 problem(s)" in err
    for field in ("prompt:", "steps:", "width:", "model_base:", "lora_names,lora_weights:"):
        assert f"  {field}" in err, err
    code, _, err = translate_here(monkeypatch, capsys, "-", stdin=b"not json")
    assert code == 1 and "malformed_message" in err
    code, _, err = translate_here(monkeypatch, capsys, "/no/such/file.json")
    assert code == 2 and "cannot read" in err


def test_translate_body_in_process():
    from protocol.translate_cli import translate_body
    out, warnings = translate_body(json.dumps({"action": "load_model", "model_name": "tiny-sdxl",
                                               "colour": "red"}).encode())
    assert out["params"] == {"model_name": "tiny-sdxl", "device": None}
    assert warnings == ["unknown field 'colour' ignored"]
    with pytest.raises(ProtocolError):
        translate_body(b"\x00\x01")


def _doc_examples() -> list[dict]:
    import re
    text = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, re.S)]


def test_every_example_in_docs_protocol_md_is_valid():
    from protocol.parse import parse_request
    examples = _doc_examples()
    kinds = set()
    for body in examples:
        if body.get("final") is True:
            R.FinalReply.model_validate(body)
            kinds.add("final")
        elif body.get("message_type") == "progress":
            R.ProgressMessage.model_validate(body)
            kinds.add("progress")
        else:
            parsed = parse_request(body)
            assert parsed.warnings == [], (body, parsed.warnings)
            kinds.add(parsed.message_type)
    assert kinds >= {"generate_sdxl_enhanced", "inference_request", "generate", "model_load_request",
                     "status_request", "initialize", "cleanup", "cancel_request", "final", "progress",
                     "list_models", "list_queue", "list_history"}
