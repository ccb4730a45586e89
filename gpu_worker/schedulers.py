"""The ten schedulers of the Phase 6 seed, swapped on a pipeline with `from_config`.

A scheduler is cheap to build from the pipeline's own config, so each job gets a fresh one:
no scheduler state (step index, Karras sigmas) carries over from one job to the next.
"""

from __future__ import annotations

import importlib

from protocol import constants as C
from protocol.errors import JobError

# Schedulers whose config accepts `use_karras_sigmas` (the others ignore Karras and say so).
_KARRAS_CAPABLE = frozenset({
    "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "DPMSolverSinglestepScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "HeunDiscreteScheduler",
    "LMSDiscreteScheduler", "UniPCMultistepScheduler",
})


def scheduler_class(name: str):
    """The diffusers class for one of protocol.constants.SCHEDULERS."""
    if name not in C.SCHEDULERS:
        raise JobError(C.VALIDATION_ERROR,
                       f"unknown scheduler {name!r}; expected one of {', '.join(C.SCHEDULERS)}")
    return getattr(importlib.import_module("diffusers"), name)


def make_scheduler(name: str, base_config, use_karras_sigmas: bool = False) -> tuple[object, list[str]]:
    """A new scheduler of class `name` from a pipeline's scheduler config.

    Returns (scheduler, warnings). Karras sigmas on a scheduler that has none is a warning,
    not an error: the image is still made, with the plain schedule."""
    cls = scheduler_class(name)
    warnings: list[str] = []
    overrides: dict = {}
    if use_karras_sigmas:
        if name in _KARRAS_CAPABLE:
            overrides["use_karras_sigmas"] = True
        else:
            warnings.append(f"use_karras_sigmas ignored: {name} has no Karras sigma schedule")
    return cls.from_config(base_config, **overrides), warnings
