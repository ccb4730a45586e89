"""The words of every request rule, in one table: what it applies to and the message its error
carries, word for word. The field checks (protocol.models, as markers on their types), the
rules across fields (protocol.rules), the broker's parse (protocol.parse, which replaces
pydantic's own wording with these) and the worker's job rules all take their messages from
here, and docs/protocol.md's rule table is generated from it:

    python -m protocol.rule_texts            # print the table
    python -m protocol.rule_texts --write    # rewrite it in docs/protocol.md

A message with `{name}` parts is a template: the error fills them in (the value sent, the
arrays' lengths); the docs show the template. Plain data and f-strings: no pydantic here.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from protocol import constants as C


@dataclass(frozen=True)
class Rule:
    """One rule. Also used as a marker in a field type's Annotated metadata (protocol.models):
    protocol.parse finds it there to word a bound error."""

    key: str
    applies_to: str  # as the docs name it: fields, or a kind of value
    message: str  # the error's message; `{name}` parts are filled in by the error
    note: str = ""  # what the docs add (defaults, how a value is read)
    section: str = "field"  # field | type | across fields

    def __call__(self, **parts) -> str:
        return self.message.format(**parts) if parts else self.message

    def pattern(self) -> re.Pattern:
        """A regex an emitted message matches when it is this rule's (templates: any text
        in place of each `{name}`)."""
        pieces = re.split(r"\{\w+\}", self.message)
        return re.compile("^" + ".+".join(re.escape(p) for p in pieces) + "$", re.S)


def _range(low, high) -> str:
    return f"must be from {low} to {high}"


RULES: list[Rule] = []


def _rule(*args, **kwargs) -> Rule:
    rule = Rule(*args, **kwargs)
    RULES.append(rule)
    return rule


# --- one field at a time ---------------------------------------------------------------------
PROMPT = _rule("prompt", "prompt", f"is required, not blank, at most {C.MAX_PROMPT_CHARS} characters")
TEXT = _rule("text", "negative_prompt, prompt_2, negative_prompt_2",
             f"must be at most {C.MAX_PROMPT_CHARS} characters")
NAME = _rule("name", "model names and paths, LoRA / textual inversion names and tokens, device, "
                     "worker and model names in management messages",
             f"must be 1 to {C.MAX_NAME_CHARS} characters")
NOT_BLANK = _rule("not_blank", "model names and paths", "must not be blank")
ID = _rule("id", "request_id, session_id", f"must be 1 to {C.MAX_ID_CHARS} characters")
SIZE = _rule("size", "width, height",
             f"must be from {C.MIN_SIZE} to {C.MAX_SIZE} and a multiple of {C.SIZE_MULTIPLE}",
             note=f"default {C.DEFAULT_SIZE}")
STEPS = _rule("steps", "steps", _range(C.MIN_STEPS, C.MAX_STEPS),
              note=f"default {C.DEFAULT_STEPS}")
GUIDANCE = _rule("guidance", "guidance_scale", _range(C.MIN_GUIDANCE, C.MAX_GUIDANCE),
                 note=f"default {C.DEFAULT_GUIDANCE}")
SEED = _rule("seed", "seed", f"must be -1 (random) or from 0 to {C.MAX_SEED} (2^63-1)",
             note="the seed used is reported; image i of a batch uses seed + i, wrapping past "
                  "2^63-1 to 0, so every reported seed fits a C# `long` and, sent back, makes "
                  "that image again")
STRENGTH = _rule("strength", "strength", "must be from 0.0 to 1.0", note=f"default {C.DEFAULT_STRENGTH}")
REFINER_SWITCH = _rule(
    "refiner_switch", "refiner_switch",
    f"must be between {C.MIN_REFINER_SWITCH:g} and {C.MAX_REFINER_SWITCH:g}, both excluded "
    "(the share of the steps the base runs before the refiner)",
    note=f"default {C.DEFAULT_REFINER_SWITCH}")
CLIP_SKIP = _rule("clip_skip", "clip_skip", _range(0, C.MAX_CLIP_SKIP))
LORA_WEIGHT = _rule("lora_weight", "LoRA weight", _range(C.MIN_LORA_WEIGHT, C.MAX_LORA_WEIGHT),
                    note="default 1.0")
CONTROL_SCALE = _rule("control_scale", "ControlNet weight / conditioning_scale",
                      _range(C.MIN_CONTROLNET_SCALE, C.MAX_CONTROLNET_SCALE), note="default 1.0")
PREPROCESS_RESOLUTION = _rule("preprocess_resolution", "ControlNet preprocessor.resolution",
                              _range(64, C.MAX_SIZE))
BATCH = _rule("batch", "batch size", _range(C.MIN_BATCH, C.MAX_BATCH))
QUALITY = _rule("quality", "output quality", _range(C.MIN_QUALITY, C.MAX_QUALITY),
                note=f"default {C.DEFAULT_QUALITY}")
UPSCALE_FACTOR = _rule("upscale_factor", "upscale factor", _range(1.0, C.MAX_UPSCALE_FACTOR))
TIMEOUT = _rule("timeout", "timeout",
                f"must be more than 0 and at most {C.MAX_TIMEOUT_S:g} (seconds)",
                note=f"default {C.DEFAULT_TIMEOUT_S:g}; a broker runs a job with at most its "
                     "`--max-timeout-s` (default 3600 s): a larger `timeout` is accepted, lowered to "
                     "that limit, and the reply's `warnings` say so (a refusal would fail clients "
                     "that send a generous timeout; the bound keeps unroutable jobs from holding "
                     "queue places for a day)")
PREVIEW_SIZE = _rule("preview_size", "preview_size", _range(C.MIN_PREVIEW_SIZE, C.MAX_PREVIEW_SIZE),
                     note=f"default {C.DEFAULT_PREVIEW_SIZE}")
PREVIEW_EVERY_STEPS = _rule("preview_every_steps", "preview_every_steps",
                            _range(1, C.MAX_PREVIEW_EVERY_STEPS) + " (steps between previews)",
                            note=f"default {C.DEFAULT_PREVIEW_EVERY_STEPS}")
PREVIEW_INTERVAL_MS = _rule("preview_interval_ms", "preview_interval_ms",
                            _range(0, C.MAX_PREVIEW_INTERVAL_MS),
                            note=f"default {C.DEFAULT_PREVIEW_INTERVAL_MS}")
HISTORY_LIMIT = _rule("history_limit", "list_history data.limit", _range(1, C.MAX_HISTORY_LIMIT),
                      note=f"default {C.DEFAULT_HISTORY_LIMIT}")
LIST_ITEMS = _rule("list_items", "lists of LoRAs, ControlNets, textual inversions, workers, models",
                   f"must hold at most {C.MAX_LIST_ITEMS} items")
TAGS = _rule("tags", "tags", f"at most {C.MAX_TAGS} tags of at most 200 characters each")
OUTPUT_FORMAT = _rule("output_format", "output format",
                      "must be png, jpeg (or jpg) or webp, any case", note=f"default {C.DEFAULT_FORMAT}")
DTYPE = _rule("dtype", "dtype, vae_dtype",
              "must be auto, float16, bfloat16 or float32 (fp16, half, bf16, fp32, float "
              "accepted), any case",
              note="default auto: float16 on accelerators, float32 on CPU; an explicit float16 "
                   "on CPU runs float32 with a warning")
PRIORITY = _rule("priority", "priority", "must be high, normal or low, any case", note="default normal")
WORKER_TYPE = _rule("worker_type", "nested data.worker_type",
                    f"must be {C.WORKER_BASIC} or {C.WORKER_ENHANCED}, any case")
STREAM = _rule("stream", "stream", 'must be true, false or "preview"')
SCHEDULER = _rule("scheduler", "scheduler", "unknown scheduler {name}; valid: {valid}",
                  note="`{valid}` lists every accepted name (see Schedulers below); any case")
CONTROLNET_TYPE = _rule("controlnet_type", "ControlNet type",
                        "unknown ControlNet type {name}; valid: " + ", ".join(C.CONTROLNET_TYPES),
                        note="any case; a name containing a type counts (`openpose` is pose); "
                             "not given: inferred from the ControlNet model's file name, else canny")
SAVE_PATH_RELATIVE = _rule("save_path_relative", "save_path",
                           "save_path must be relative to the output root",
                           note="a folder under `--output-dir`; the default `outputs/` (and `\"\"`, "
                                "`.`) is the root itself, a leading `outputs/` is dropped "
                                "(`outputs/portraits` = `<root>/portraits`)")
SAVE_PATH_DOTDOT = _rule("save_path_dotdot", "save_path", "save_path must not contain '..'")
SAVE_PATH_NUL = _rule("save_path_nul", "save_path", "save_path must not contain NUL")
MODEL_PATH_ESCAPES = _rule("model_path_escapes", "model, LoRA, VAE, ControlNet, textual "
                                                 "inversion and upscaler paths",
                           "a model path must stay under the model root (no '..')")
PICKLE = _rule("pickle", "model, LoRA, VAE, ControlNet, textual inversion and upscaler paths",
               "pickle checkpoints are refused unless the operator allows them "
               "(use .safetensors or a diffusers folder)",
               note="`.ckpt`, `.bin`, `.pt`, `.pth`; `--allow-pickle` allows them")
IMAGE = _rule("image", "images (init_image, mask_image, control images)",
              "must be a path, a base64 string / data URI, or binary image data")
IMAGE_EMPTY = _rule("image_empty", "images", "must not be empty")
INPUT_PATH_ESCAPES = _rule("input_path_escapes", "image paths",
                           "an image path must stay under the input root (no '..')",
                           note="whether the file exists (and an absolute path's root) is checked "
                                "by the worker, which owns the input root")

# --- against the live workers (broker/routing.py; the reply's code is unsupported_feature) -----
_POOL = "against the live workers"
UPSCALE_METHOD = _rule("upscale_method", "upscale_method naming a model upscaler by name",
                       "unknown upscaler {name}; this pool has: {valid}", section=_POOL,
                       note="`lanczos` is built in; `realesrgan` / `real-esrgan` / `esrgan` is the "
                            "worker's default model upscaler (its `--upscaler`, or its only one); any "
                            "other name is an upscaler file's stem, checked against the names the "
                            "live workers report in their telemetry, and the job goes to a worker "
                            "that has it. A path (with a folder or a suffix) is a file only the "
                            "worker can look for")
DEVICE = _rule("device", "device", "no worker on device {device}", section=_POOL,
               note="answered at once when workers are registered; with none yet, after "
                    "`--no-worker-grace-s`")

# --- types (any field) -------------------------------------------------------------------------
MISSING = _rule("missing", "required fields", "is required", section="type")
INTEGER = _rule("integer", "integer fields",
                "must be an integer (not a string, a float or a boolean)", section="type",
                note="`512.0`, `\"512\"` and `true` are refused")
NUMBER = _rule("number", "number fields", "must be a number", section="type")
FINITE = _rule("finite", "number fields", "must be a finite number", section="type",
               note="NaN / Infinity (msgpack can carry them)")
BOOLEAN = _rule("boolean", "boolean fields", "must be true or false", section="type")
STRING = _rule("string", "text fields", "must be a string", section="type")
LIST = _rule("list", "list fields", "must be a list", section="type")
OBJECT = _rule("object", "sections", "must be an object", section="type")
LITERAL = _rule("literal", "message_type / action", "must be {expected}", section="type")

# --- across fields -----------------------------------------------------------------------------
_X = "across fields"
BASE_REQUIRED = _rule("base_required", "flat `model_base`, nested `models.base` / `model_name`, "
                                       "legacy `model.base`",
                      "a base model is required", section=_X,
                      note="unless the broker runs with `--default-model-base`")
PARALLEL_ARRAYS = _rule("parallel_arrays", "flat `lora_*`, `controlnet_*`, `textual_inversion_*` "
                                           "arrays (the field names the arrays)",
                        "parallel arrays differ in length: {lengths}", section=_X)
LORA_WEIGHTS_ALONE = _rule("lora_weights_alone", "flat `lora_weights`",
                           "lora_weights given without lora_names or lora_paths", section=_X)
LORA_NAME_OR_PATH = _rule("lora_name_or_path", "each LoRA", "each LoRA needs a name or a path",
                          section=_X, note="without a name, the name is the path's file stem")
TI_NAME_OR_PATH = _rule("ti_name_or_path", "each textual inversion",
                        "each textual inversion needs a name or a path", section=_X)
CONTROLNET_IMAGE = _rule("controlnet_image", "each ControlNet (flat `controlnet_images`, nested "
                                             "enabled `controlnet` / `controlnets[i]`, legacy "
                                             "`controlnets[i].image`)",
                         "each ControlNet needs an image", section=_X)
UPSCALE_NEEDS_FACTOR = _rule("upscale_needs_factor", "nested `upscale` with `enabled: true`",
                             "an enabled upscale needs a factor", section=_X)
MASK_NEEDS_INIT = _rule("mask_needs_init", "mask_image",
                        "mask_image needs init_image (inpainting edits an image)", section=_X)
STEPS_STRENGTH = _rule("steps_strength", "strength (with an init image)",
                       "strength {strength} x steps {steps} leaves no denoising step (needs "
                       "steps * strength >= 1); {hint}", section=_X,
                       note="`{hint}` says how many steps would do, or to raise strength")
MODEL_NAME_REQUIRED = _rule("model_name_required", "model_load_request `data.model_name`",
                            "model_name is required", section=_X)
CANCEL_TARGET_REQUIRED = _rule("cancel_target_required", "cancel_request",
                               "the request_id of the job to cancel is required", section=_X,
                               note="`data.request_id`, else the top-level `request_id`")

# --- on the worker: what only it can know (its disk); JobError with errors[] ------------------
_WORKER = "on the worker"
INPUT_NO_ROOT = _rule("input_no_root", "image paths",
                      "image paths are not accepted: this worker has no --input-dir; send the "
                      "image as base64 or binary", section=_WORKER)
INPUT_OUTSIDE_ROOT = _rule("input_outside_root", "image paths (relative or absolute)",
                           "path {path} is outside the input root {root}", section=_WORKER,
                           note="resolved on the worker's own disk, symlinks included: the broker "
                                "cannot decide it")
INPUT_MISSING = _rule("input_missing", "image paths", "no image file {path} under the input root {root}",
                      section=_WORKER)
IMAGE_UNREADABLE = _rule("image_unreadable", "images", "not a readable image ({reason})",
                         section=_WORKER)
IMAGE_TOO_LARGE = _rule("image_too_large", "images", "image of {width}x{height} is too large",
                        section=_WORKER, note="more than 4096 x 4096 pixels (a decompression bomb)")
IMAGE_NOT_BASE64 = _rule("image_not_base64", "images",
                         "neither a file under the input root nor valid base64 ({reason})",
                         section=_WORKER)

_SECTIONS = (("field", "One field"), ("type", "Types"), (_X, "Across fields"),
             (_POOL, "Against the live workers (`unsupported_feature`, with `errors[]`)"),
             (_WORKER, "On the worker (`validation_error`, with `errors[]`, after the job was queued)"))


def matching(message: str) -> Rule | None:
    """The rule whose words `message` is, or None."""
    for rule in RULES:
        if rule.message == message or ("{" in rule.message and rule.pattern().match(message)):
            return rule
    return None


# --- the docs ----------------------------------------------------------------------------------
DOCS = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
BEGIN = "<!-- rule table: generated by `python -m protocol.rule_texts --write`; do not edit -->"
END = "<!-- end of rule table -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    lines = [BEGIN]
    for section, title in _SECTIONS:
        lines += ["", f"**{title}**", "", "| applies to | error message (word for word) | notes |",
                  "| --- | --- | --- |"]
        lines += [f"| {_cell(r.applies_to)} | {_cell(r.message)} | {_cell(r.note)} |"
                  for r in RULES if r.section == section]
    return "\n".join(lines + ["", END])


def docs_with_table(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + markdown() + text[end:]


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        DOCS.write_text(docs_with_table(DOCS.read_text(encoding="utf-8")), encoding="utf-8")
        return 0
    if argv:
        print("usage: python -m protocol.rule_texts [--write]", file=sys.stderr)
        return 2
    print(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
