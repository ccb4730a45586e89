"""Weighted and long prompts -> SDXL embeddings, with compel.

compel builds the per-token conditioning of each encoder from (text, weight) fragments
(gpu_worker/prompt_syntax.py parses the A1111 syntax into them), in 77-token chunks when a
prompt is longer than one CLIP window. SDXL concatenates the penultimate hidden states of its two
encoders (the refiner has only the second) and takes the pooled embedding from the last one; the
pooled embedding is computed from the prompt's text without the syntax (its first 77 tokens, as
A1111 does). An empty negative prompt gives zero embeddings where the model asks for that
(`force_zeros_for_empty_prompt`), as diffusers itself does.
"""

from __future__ import annotations

import torch
from compel import Compel, ReturnedEmbeddingsType
from compel.prompt_parser import FlattenedPrompt, Fragment

from gpu_worker.prompt_syntax import plain_text

Fragments = list[tuple[str, float]]


def _compel(tokenizer, encoder, pooled: bool) -> Compel:
    return Compel(tokenizer=tokenizer, text_encoder=encoder, truncate_long_prompts=False,
                  returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                  requires_pooled=pooled, device=encoder.device)


def _conditioning(compel: Compel, fragments: Fragments) -> torch.Tensor:
    prompt = FlattenedPrompt([Fragment(text, weight) for text, weight in fragments])
    (conditioning, _tokens), _options = compel.build_conditioning_tensor_for_prompt_object(prompt)
    return conditioning


def _pad_to(compel: Compel, conditioning: torch.Tensor, length: int) -> torch.Tensor:
    """Append empty-prompt chunks until `length` tokens (chunks are one CLIP window each)."""
    if conditioning.shape[1] >= length:
        return conditioning
    empty = _conditioning(compel, [("", 1.0)])
    repeats = (length - conditioning.shape[1]) // empty.shape[1]
    return torch.cat([conditioning, empty.repeat(conditioning.shape[0], repeats, 1)], dim=1)


def sdxl_embeddings(pipe, positive: list[Fragments], negative: list[Fragments],
                    zero_empty_negative: bool) -> dict[str, torch.Tensor]:
    """The four embedding arguments of an SDXL pipeline call.

    positive/negative: one fragment list per encoder of `pipe` that exists (text_encoder,
    text_encoder_2; the refiner has only the second)."""
    pairs = [(tok, enc) for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
             if enc is not None]
    compels = [_compel(tok, enc, pooled=index == len(pairs) - 1) for index, (tok, enc) in enumerate(pairs)]
    with torch.no_grad():
        pos = [_conditioning(c, frags) for c, frags in zip(compels, positive)]
        neg = [_conditioning(c, frags) for c, frags in zip(compels, negative)]
        length = max(t.shape[1] for t in pos + neg)
        pos = [_pad_to(c, t, length) for c, t in zip(compels, pos)]
        neg = [_pad_to(c, t, length) for c, t in zip(compels, neg)]
        last = compels[-1].conditioning_provider
        pooled = last.get_pooled_embeddings([plain_text(positive[-1])])
        negative_pooled = last.get_pooled_embeddings([plain_text(negative[-1])])
    prompt_embeds = torch.cat(pos, dim=-1)
    negative_embeds = torch.cat(neg, dim=-1)
    if zero_empty_negative and not any(text.strip() for frags in negative for text, _ in frags):
        negative_embeds = torch.zeros_like(negative_embeds)
        negative_pooled = torch.zeros_like(negative_pooled)
    return {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_embeds,
            "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}


def token_count(tokenizer, text: str) -> int:
    """Tokens of `text` without the start/end markers (77-token windows hold 75 of them)."""
    return len(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])
