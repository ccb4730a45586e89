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


def render_all() -> dict[str, str]:
    """file name -> schema text (stable: sorted keys, trailing newline)."""
    out = {}
    for stem, (model, mode) in SCHEMAS.items():
        schema = model.model_json_schema(mode=mode)
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
