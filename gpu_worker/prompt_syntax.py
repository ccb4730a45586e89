"""A1111/ComfyUI prompt syntax -> weighted text fragments and LoRA tags. Pure text, no torch.

The syntax users type by habit (A1111's "attention" rules, which ComfyUI follows):
  (word)        weight x 1.1 (nested: x 1.1 each)     [word]   weight / 1.1
  (word:1.3)    weight x 1.3                          \\( \\) \\[ \\] \\\\   literal characters
  <lora:NAME:WEIGHT>   taken out of the prompt and added to the job's LoRAs (WEIGHT default 1;
                       A1111's <lora:NAME:TE:UNET> form uses the first weight for both)
An unclosed bracket weights the rest of the prompt, as in A1111. The fragments go to compel
(gpu_worker/prompt_encoding.py), which builds the embeddings for both SDXL encoders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_EMPHASIS = 1.1
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_TOKEN = re.compile(rf"\\[\\()\[\]]|\\|\(|\[|:\s*({_NUMBER})\s*\)|\)|\]|[^\\()\[\]:]+|:")
_LORA_TAG = re.compile(rf"<(?:lora|lyco):([^:<>]+)(?::\s*({_NUMBER})?\s*)?(?::[^<>]*)?>", re.IGNORECASE)
_SYNTAX_CHARS = re.compile(r"[\\()\[\]]")


@dataclass(frozen=True)
class LoraTag:
    name: str
    weight: float


def extract_loras(prompt: str) -> tuple[str, list[LoraTag]]:
    """(the prompt without its <lora:...> tags, the tags in order)."""
    tags = [LoraTag(m[1].strip(), float(m[2]) if m[2] else 1.0) for m in _LORA_TAG.finditer(prompt or "")]
    if not tags:
        return prompt, []
    text = _LORA_TAG.sub("", prompt)
    return re.sub(r"[ \t]{2,}", " ", text).strip(" ,\t") if text.strip() else "", tags


def parse_weights(prompt: str) -> list[tuple[str, float]]:
    """A1111 emphasis syntax -> [(text, weight)], adjacent equal weights merged."""
    parts: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for match in _TOKEN.finditer(prompt or ""):
        token, weight = match[0], match[1]
        if len(token) == 2 and token[0] == "\\":
            parts.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(parts))
        elif token == "[":
            square_open.append(len(parts))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), _EMPHASIS)
        elif token == "]" and square_open:
            scale(square_open.pop(), 1 / _EMPHASIS)
        else:
            parts.append([token, 1.0])
    for start in round_open:
        scale(start, _EMPHASIS)
    for start in square_open:
        scale(start, 1 / _EMPHASIS)
    merged: list[list] = []
    for text, weight in parts:
        if merged and abs(merged[-1][1] - weight) < 1e-9:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, round(weight, 6)) for text, weight in merged if text] or [("", 1.0)]


def has_syntax(prompt: str | None) -> bool:
    """True when the text holds brackets or escapes that change what the encoder sees."""
    return bool(prompt) and bool(_SYNTAX_CHARS.search(prompt))


def plain_text(fragments: list[tuple[str, float]]) -> str:
    return "".join(text for text, _ in fragments)
