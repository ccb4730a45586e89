"""The CLIP BPE tokenizer from the vocabulary open_clip ships (bpe_simple_vocab_16e6.txt.gz), the
one SDXL's two text encoders use (49,408 tokens), built offline.

Only the data file is read: open_clip is found with importlib's spec (not imported), so its own
torchvision/timm imports never run (scripts/setup_env.sh installs it without dependencies).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2  # the merges CLIP uses from the file (the rest are unused)
MAX_TOKENS = 77


def vocab_path() -> str:
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, VOCAB_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"the CLIP vocabulary ({VOCAB_FILE}) comes with the open-clip-torch package, "
                            "which is not installed (pip install --no-deps open-clip-torch)")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


@functools.lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary as its tokenizer builds it: the byte alphabet, the same with `</w>`, one
    token per merge, then the two special tokens."""
    with gzip.open(vocab_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")[1:CLIP_MERGES + 1]
    merges = tuple(tuple(line.split()) for line in lines)
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A new CLIPTokenizer (each caller may add textual-inversion tokens to its own).
    SDXL's first encoder pads with <|endoftext|>, its second (OpenCLIP) with "!"."""
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_TOKENS, pad_token=pad_token)
