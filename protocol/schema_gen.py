"""Write the JSON Schema of every request and reply into protocol/schemas/, from the pydantic
models, so the C# side can generate its classes. A test regenerates them and fails when the
committed files are stale.

    python -m protocol.schema_gen            # rewrite protocol/schemas/
    python -m protocol.schema_gen --check    # exit 1 when they are stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from protocol import models as M
from protocol import reply_models as R

SCHEMA_DIR = Path(__file__).with_name("schemas")

# file stem -> (model, "validation" for what clients send | "serialization" for what they get)
SCHEMAS = {
    "request.generate_sdxl_enhanced": (M.FlatGenerateRequest, "validation"),
    "request.inference_request": (M.NestedGenerateRequest, "validation"),
    "request.generate_legacy": (M.LegacyGenerateRequest, "validation"),
    "request.model_load_request": (M.ModelLoadRequest, "validation"),
    "request.status_request": (M.StatusRequest, "validation"),
    "request.initialize": (M.InitializeRequest, "validation"),
    "request.cleanup": (M.CleanupRequest, "validation"),
    "request.cancel_request": (M.CancelRequest, "validation"),
    "request.list_models": (M.ListModelsRequest, "validation"),
    "request.list_queue": (M.ListQueueRequest, "validation"),
    "request.list_history": (M.ListHistoryRequest, "validation"),
    "reply.final": (R.FinalReply, "serialization"),
    "reply.generation": (R.GenerationReply, "serialization"),
    "reply.status": (R.StatusReply, "serialization"),
    "reply.progress": (R.ProgressMessage, "serialization"),
    "reply.list_models": (R.ListModelsReply, "serialization"),
    "reply.list_queue": (R.ListQueueReply, "serialization"),
    "reply.list_history": (R.ListHistoryReply, "serialization"),
}


# --- what pydantic's per-field schemas cannot say: the broker's rules across fields -----------
_NOT_NULL = {"not": {"type": "null"}}


def _at(path: tuple[str, ...], schema: dict) -> dict:
    """`schema` applied at `path` when it is there (objects all the way down)."""
    for key in reversed(path):
        schema = {"properties": {key: schema}}
    return schema


def _present(*path: str) -> dict:
    """Every key of `path` present, objects on the way, the last one not null."""
    schema: dict = _NOT_NULL
    for key in reversed(path):
        schema = {"type": "object", "required": [key], "properties": {key: schema}}
    return schema


def _nonempty_list(*path: str) -> dict:
    return _at(path[:-1], {"required": [path[-1]],
                           "properties": {path[-1]: {"type": "array", "minItems": 1}}})


def _a_list(name: str) -> dict:
    return {"required": [name], "properties": {name: {"type": "array"}}}


def _implies(condition: dict, consequence: dict) -> dict:
    return {"if": condition, "then": consequence}


def _type_named(values: list[str]) -> dict:
    """message_type (or, for the legacy forms, action) present and naming this message."""
    return {"anyOf": [{"required": ["message_type"], "properties": {"message_type": {"enum": values}}},
                      {"required": ["action"], "properties": {"action": {"enum": values}}}]}


def _enabled_needs(path: tuple[str, ...], needed: str) -> dict:
    """At `path` (an object): `enabled: true` needs `needed` (not null)."""
    cond = {"required": ["enabled"], "properties": {"enabled": {"const": True}}}
    return _at(path, _implies(cond, _present(needed)))


def _cross_field_rules(model) -> list[dict]:
    """protocol.rules.cross_field_errors as JSON Schema, for a broker without
    --default-model-base. The rules it cannot state are listed in docs/protocol.md."""
    if model is M.FlatGenerateRequest:
        cn_arrays = ("controlnet_types", "controlnet_weights", "controlnet_models",
                     "controlnet_preprocess")
        return [
            _present("model_base"),
            _implies(_present("mask_image"), _present("init_image")),
            _implies(_nonempty_list("lora_weights"),
                     {"anyOf": [_a_list("lora_names"), _a_list("lora_paths")]}),
            _implies({"anyOf": [_nonempty_list(n) for n in cn_arrays]},
                     _nonempty_list("controlnet_images")),
        ]
    if model is M.NestedGenerateRequest:
        each_controlnet = {"if": {"required": ["enabled"], "properties": {"enabled": {"const": False}}},
                           "else": _present("control_image")}
        return [
            {"anyOf": [_present("data", "models", "base"), _present("data", "model_name")]},
            _implies(_present("data", "mask_image"), _present("data", "init_image")),
            _enabled_needs(("data", "controlnet"), "control_image"),
            _at(("data", "controlnets"), {"items": each_controlnet}),
            _enabled_needs(("data", "output", "upscale"), "factor"),
            _enabled_needs(("data", "postprocessing", "upscale"), "factor"),
        ]
    if model is M.LegacyGenerateRequest:
        cond = ("prompt_submission", "conditioning")
        return [
            _present("prompt_submission", "model", "base"),
            _implies(_present(*cond, "mask_image"), _present(*cond, "init_image")),
            _at((*cond, "loras"), {"items": {"anyOf": [_present("name"), _present("path")]}}),
        ]
    if model is M.ModelLoadRequest:
        return [{"anyOf": [_present("data", "model_name"), _present("model_name")]}]
    if model is M.CancelRequest:
        return [{"anyOf": [_present("data", "request_id"), _present("request_id")]}]
    return []


def _request_schema(model, schema: dict) -> dict:
    names = sorted(name for name, cls in M.REQUEST_MODELS.items() if cls is model)
    rules = [_type_named(names), *_cross_field_rules(model)]
    return {**schema, "allOf": [*schema.get("allOf", []), *rules]}


def _open_enums(node):
    """Reply enums stay open: known values documented, any string allowed, so a client generated
    from the schema still reads a reply with a value added later."""
    if isinstance(node, list):
        return [_open_enums(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _open_enums(value) for key, value in node.items()}
    values = node.get("enum")
    if isinstance(values, list) and len(values) > 1 and all(isinstance(v, str) for v in values):
        node.pop("enum")
        node["type"] = "string"
        node["examples"] = values
        known = "known values: " + ", ".join(values) + "; others may be added"
        node["description"] = f"{node['description']} ({known})" if node.get("description") else known
    return node


def render_all() -> dict[str, str]:
    """file name -> schema text (stable: sorted keys, trailing newline)."""
    out = {}
    for stem, (model, mode) in SCHEMAS.items():
        schema = model.model_json_schema(mode=mode)
        schema = _request_schema(model, schema) if mode == "validation" else _open_enums(schema)
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                  "$id": f"sdxl-broker/{stem}.json", **schema}
        out[f"{stem}.json"] = json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return out


def write_all(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_all().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of schema files missing or different from what the models generate now."""
    problems = []
    for name, text in render_all().items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            problems.append(name)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protocol.schema_gen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SCHEMA_DIR, help="directory to write")
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1)")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale(args.out)
        for name in problems:
            print(f"stale: {name}")
        return 1 if problems else 0
    for path in write_all(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
