"""A job's LoRAs and textual inversions on the shared cached modules, so that one request's
style never leaks into the next.

LoRAs are named peft adapters that stay loaded between jobs (gpu_worker/resident_loras.py):
each job switches on exactly its own set with its weights, a job without LoRAs switches them
all off (bytes identical to the plain model), and a load that failed half-way unloads them all.
An SDXL embedding holds `clip_l` and `clip_g`: each goes into its own encoder and tokenizer,
and both are unloaded after the job.
"""

from __future__ import annotations

from typing import Any, Callable

from gpu_worker.file_hashes import short_hash
from gpu_worker import resident_loras
from gpu_worker.pipeline_cache import LORA, TEXTUAL_INVERSION, measured_size_mb
from protocol import constants as C
from protocol.errors import JobError, about_field
from protocol.job import Job

# LyCORIS algorithms diffusers cannot load, by a key fragment only their files have
_LYCORIS_MARKERS = (("hada_w1", "LoHa"), ("lokr_w1", "LoKr"), ("oft_blocks", "OFT"), ("oft_diag", "OFT"),
                    ("a1.weight", "GLoRA"), (".diff", "full-diff (LyCORIS)"))


def lora_format(keys) -> str:
    """kohya (A1111), diffusers or peft layout; a LyCORIS file is unsupported_feature naming it."""
    keys = list(keys)
    for marker, algorithm in _LYCORIS_MARKERS:
        if any(marker in key for key in keys):
            raise JobError(C.UNSUPPORTED_FEATURE,
                           f"LyCORIS {algorithm} file: this worker loads LoRA (and LoCon) weights in "
                           "kohya/A1111, diffusers and peft layouts only; convert it to a plain LoRA")
    if any(key.startswith(("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")) for key in keys):
        return "kohya"
    if any(".lora_A." in key or ".lora_B." in key for key in keys):
        return "peft"
    return "diffusers"


# load_cached(key, name, kind, load) -> the cached value (pinned for the job)
LoadCached = Callable[[tuple, str, str, Callable[[], Any]], Any]


def attach(job: Job, pipe, resolver, load_cached: LoadCached, state, model_info: dict,
           extra_loras=()) -> None:
    """Attach the job's LoRAs (and `extra_loras`, from <lora:> prompt tags) and embeddings.
    `state` gets features, warnings and `ti_tokens` (appended before loading, so a half-done load
    is still undone by `detach`)."""
    from safetensors.torch import load_file

    loras = (*job.loras, *extra_loras)
    if loras:
        wanted, occurrences = [], {}
        for index, spec in enumerate(loras):
            # a LoRA from a <lora:> tag in the prompt has no field of its own
            with about_field(f"loras[{index}].{'path' if spec.path else 'name'}"
                             if index < len(job.loras) else "prompt"):
                resolved = resolver.lora(spec.name, spec.path)
                if resolved.path.endswith(".safetensors"):
                    tensors = load_cached((LORA, resolved.path), spec.name, LORA,
                                          lambda path=resolved.path: load_file(path))
                    layout = lora_format(tensors)
                    # called only when the LoRA is not resident yet; diffusers pops keys from
                    # the dict it is given, so it gets a copy of the cached one
                    source = lambda tensors=tensors: dict(tensors)  # noqa: E731
                else:  # a pickle format the operator allowed: diffusers reads it (weights only)
                    layout = "pickle"
                    source = lambda path=resolved.path: path  # noqa: E731
            occurrence = occurrences[resolved.path] = occurrences.get(resolved.path, -1) + 1
            wanted.append(((resolved.path, occurrence), source, float(spec.weight)))
            model_info["loras"].append({"name": spec.name, "weight": float(spec.weight),
                                        "hash": short_hash(resolved.path), "format": layout})
        resident_loras.activate(pipe, wanted, size_of=measured_size_mb)
        state.feature("lora" if len(wanted) == 1 else "multi_lora")
    else:
        resident_loras.deactivate(pipe)

    prompts = " ".join(p or "" for p in (job.prompt, job.prompt_2, job.negative_prompt, job.negative_prompt_2))
    for index, spec in enumerate(job.textual_inversions):
        with about_field(f"textual_inversions[{index}].{'path' if spec.path else 'name'}"):
            resolved = resolver.textual_inversion(spec.name, spec.path)
        if not resolved.path.endswith(".safetensors"):
            raise JobError(C.UNSUPPORTED_FEATURE,
                           f"textual_inversions[{index}]: only .safetensors embeddings are supported",
                           {"field": f"textual_inversions[{index}]"})
        tensors = load_cached((TEXTUAL_INVERSION, resolved.path), spec.name, TEXTUAL_INVERSION,
                              lambda path=resolved.path: load_file(path))
        if "clip_l" not in tensors or "clip_g" not in tensors:
            raise JobError(C.VALIDATION_ERROR,
                           f"textual inversion {spec.name} has keys {sorted(tensors)}; an SDXL embedding "
                           "needs clip_l and clip_g", {"field": f"textual_inversions[{index}]"})
        token = spec.token or f"<{spec.name}>"
        state.ti_tokens.append(token)
        # each tensor into its own encoder (passing the two-key file raises in diffusers)
        pipe.load_textual_inversion(tensors["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(tensors["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        model_info["textual_inversions"].append({"name": spec.name, "token": token})
        if token not in prompts:
            state.warnings.append(f"textual inversion token {token} does not appear in any prompt")
        state.feature("textual_inversion")


def detach(job: Job, pipe, ti_tokens: list[str]) -> None:
    """Undo `attach`. Raises when the modules could not be restored (the caller evicts them)."""
    if resident_loras.needs_reset(pipe):  # a LoRA load failed half-way
        resident_loras.reset(pipe)
    for token in ti_tokens:
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            if token in tokenizer.get_vocab():
                pipe.unload_textual_inversion(token, tokenizer=tokenizer, text_encoder=encoder)
