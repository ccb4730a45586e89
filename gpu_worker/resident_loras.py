"""LoRAs stay on the shared UNet between jobs; each job switches on exactly its own set.

Loading a LoRA (peft layers injected into the UNet and text encoders) and unloading it after
every job cost far more than the job's other preparation (bench/lora_reuse.py). So a loaded
LoRA stays as a named peft adapter, and each job only chooses what is active:

- a job with LoRAs: adapters it needs and that are not there yet are loaded; then
  `enable_lora` and `set_adapters(its adapters, its weights)`, in the job's order, so the
  arithmetic is that of a fresh load of the same list;
- a job without LoRAs: `disable_lora`, which makes every LoRA layer return its base layer's
  output untouched (DIFFUSERS-FACTS.md: bytes identical to before any LoRA).

At most MAX_RESIDENT adapters stay (a job needing more gets them all); beyond that the least
recently used ones the job does not need are deleted (`delete_adapters`, exact). The record lives on the UNet module, which every
`from_pipe` variant of a base shares, so it goes when the cache evicts the base. If a load
fails half-way the layers cannot be trusted: `reset` unloads every LoRA (`unload_lora_weights`,
exact) and the next job starts from the plain model.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

MAX_RESIDENT = 4
_ATTRIBUTE = "sdxl_broker_resident_loras"


@dataclass
class Resident:
    """What is loaded on one UNet: key -> adapter name, least recently used first."""
    adapters: OrderedDict = field(default_factory=OrderedDict)
    sizes_mb: dict = field(default_factory=dict)   # adapter name -> MB of its weights
    enabled: bool = True      # peft layers start enabled
    trusted: bool = True      # False from the start of a load until it finished
    loaded_total: int = 0     # adapters ever loaded: names stay unique

    def size_mb(self) -> float:
        return sum(self.sizes_mb.values())

    def names(self) -> list[str]:
        """The resident LoRAs by file name (without extension), as heartbeats report them."""
        return [os.path.splitext(os.path.basename(key[0]))[0] for key in self.adapters]


def resident(pipe) -> Resident:
    state = getattr(pipe.unet, _ATTRIBUTE, None)
    if state is None:
        state = Resident()
        setattr(pipe.unet, _ATTRIBUTE, state)
    return state


# One wanted LoRA: (key, load_source, weight). key identifies the file and its occurrence in
# the job (the same file twice is two adapters); load_source() gives what load_lora_weights
# takes and is called only when the adapter is not resident yet.
Wanted = tuple[tuple, Callable[[], Any], float]


def activate(pipe, wanted: list[Wanted], size_of: Callable[[Any], float] = lambda source: 0.0) -> list[bool]:
    """Make exactly `wanted` active with its weights. Returns, per LoRA, whether it was already
    resident (True) or loaded now (False)."""
    state = resident(pipe)
    names, reused = [], []
    for key, load_source, _weight in wanted:
        name = state.adapters.get(key)
        reused.append(name is not None)
        if name is None:
            name = f"resident_lora_{state.loaded_total}"
            state.loaded_total += 1
            source = load_source()
            size_mb = size_of(source)
            state.trusted = False
            pipe.load_lora_weights(source, adapter_name=name)
            state.adapters[key] = name
            state.sizes_mb[name] = size_mb
            state.trusted = True
        state.adapters.move_to_end(key)
        names.append(name)
    spare = [k for k, n in state.adapters.items() if n not in names]  # least recently used first
    while len(state.adapters) > MAX_RESIDENT and spare:
        key = spare.pop(0)
        name = state.adapters.pop(key)
        state.sizes_mb.pop(name, None)
        pipe.delete_adapters(name)
        log.info("LoRA adapter %s (%s) dropped: more than %d resident", name, key[0], MAX_RESIDENT)
    if not state.enabled:
        pipe.enable_lora()
        state.enabled = True
    pipe.set_adapters(names, adapter_weights=[float(w) for _k, _l, w in wanted])
    return reused


def deactivate(pipe) -> None:
    """No LoRA for this job: every resident adapter off (the layers pass their input through)."""
    state = getattr(pipe.unet, _ATTRIBUTE, None)
    if state is not None and state.adapters and state.enabled:
        pipe.disable_lora()
        state.enabled = False


def needs_reset(pipe) -> bool:
    state = getattr(pipe.unet, _ATTRIBUTE, None)
    return state is not None and not state.trusted


def reset(pipe) -> None:
    """Unload every LoRA (after a failed load): the modules are the plain model again."""
    pipe.unload_lora_weights()
    setattr(pipe.unet, _ATTRIBUTE, Resident())
