"""JSON Schema fragments for the broker's string rules, built from the same tuples the
validators use (protocol.constants, protocol.normalize), so a schema and the broker agree.

Patterns use only what ECMA-262 and Python's `re` share (character classes, `\\s`, `\\S`,
groups, alternation): JSON Schema says patterns are ECMA-262, Python validators run them with
`re`. Case-insensitive names are spelled out letter by letter (`[pP][nN][gG]`).
"""

from __future__ import annotations

import re

from protocol import constants as C


def _letters(text: str) -> str:
    out = []
    for ch in text:
        if ch.isascii() and ch.isalpha():
            out.append(f"[{ch.lower()}{ch.upper()}]")
        elif ch == " ":
            out.append(r"\s+")  # the broker folds runs of whitespace
        else:
            out.append(re.escape(ch))
    return "".join(out)


def any_case(names) -> str:
    """A pattern for any of `names`, any case, with surrounding whitespace (the broker strips)."""
    alternatives = "|".join(_letters(n) for n in sorted(set(names), key=lambda n: (-len(n), n)))
    return rf"^\s*(?:{alternatives})\s*$"


def choice(names, description: str) -> dict:
    return {"type": "string", "pattern": any_case(names), "description": description,
            "examples": sorted(set(names))}


NOT_BLANK = r"\S"
# a '..' segment between separators (either slash), anywhere
DOTDOT_SEGMENT = r"(?:^|[/\\])\.\.(?:[/\\]|$)"
PICKLE_SUFFIX = "(?:" + "|".join(_letters(s) for s in C.PICKLE_SUFFIXES) + ")$"
SAVE_PATH_LEAVES = r"^[/\\]|^[\s\S]:|://|" + DOTDOT_SEGMENT + r"|\x00"


def model_ref() -> dict:
    return {"type": "string", "minLength": 1, "maxLength": C.MAX_NAME_CHARS, "pattern": NOT_BLANK,
            "not": {"anyOf": [{"pattern": DOTDOT_SEGMENT}, {"pattern": PICKLE_SUFFIX}]},
            "description": "a model name or a path under the model root (no '..'); .ckpt/.bin/"
                           ".pt/.pth refused unless the operator allows pickle"}


def image() -> dict:
    return {"type": "string", "minLength": 1, "not": {"pattern": DOTDOT_SEGMENT},
            "description": "path under the input root (no '..'), base64 or data URI "
                           "(msgpack: binary)"}


def save_path() -> dict:
    return {"type": "string", "maxLength": C.MAX_NAME_CHARS, "not": {"pattern": SAVE_PATH_LEAVES},
            "description": "a folder relative to the output root (no '..', not absolute)"}


def controlnet_type() -> dict:
    kinds = "|".join(_letters(k) for k in C.CONTROLNET_TYPES)
    return {"type": "string", "maxLength": 100, "pattern": rf"^$|{kinds}",
            "description": "a ControlNet type, any case, or a name containing one ('openpose'); "
                           "empty: inferred from the model", "examples": list(C.CONTROLNET_TYPES)}


def upscale_method() -> dict:
    builtin = [*C.UPSCALE_METHODS, *C.UPSCALE_METHOD_ALIASES]
    return {"anyOf": [{"type": "string", "pattern": any_case(builtin)}, model_ref()],
            "description": "lanczos, realesrgan (the worker's default model upscaler), or the "
                           "name of an upscaler model file", "examples": builtin}
