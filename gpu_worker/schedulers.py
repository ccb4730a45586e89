"""Schedulers for a job: the seed's ten diffusers classes and the A1111 sampler names, swapped
on a pipeline with `from_config`.

A scheduler is cheap to build from the pipeline's own config, so each job gets a fresh one:
no scheduler state (step index, Karras sigmas) carries over from one job to the next.

A1111 names map to the diffusers class and config that run the same algorithm (the table in
diffusers' scheduler docs; k-diffusion is what A1111 runs):
  DPM++ 2M SDE [Karras]  DPMSolverMultistep, algorithm_type sde-dpmsolver++, order 2
  DPM++ 3M SDE [Karras]  DPMSolverMultistep, algorithm_type sde-dpmsolver++, order 3
  DPM++ 2S a [Karras]    DPMSolverSinglestep, algorithm_type sde-dpmsolver++, order 2 (singlestep
                         second order with fresh noise each step; diffusers has no exact 2S a)
  Euler a Karras         DPMSolverMultistep, sde-dpmsolver++, order 1, Karras sigmas: first-order
                         SDE-DPM-Solver++ is the Euler ancestral step (eta 1), and
                         EulerAncestralDiscreteScheduler itself has no Karras schedule
  LCM                    LCMScheduler (meant for LCM-distilled models and LoRAs)
The protocol (protocol/normalize.py) turns "... Karras" into use_karras_sigmas=True.
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
_SDE = {"algorithm_type": "sde-dpmsolver++"}
# A1111 sampler name -> (diffusers class, config overrides)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {**_SDE, "solver_order": 2}),
    "DPM++ 3M SDE": ("DPMSolverMultistepScheduler", {**_SDE, "solver_order": 3}),
    "DPM++ 2S a": ("DPMSolverSinglestepScheduler", {**_SDE, "solver_order": 2}),
    "LCM": ("LCMScheduler", {}),
}
# with Karras sigmas, these classes run as another class that has them (see the docstring)
_KARRAS_EQUIVALENT = {
    "EulerAncestralDiscreteScheduler": ("DPMSolverMultistepScheduler", {**_SDE, "solver_order": 1}),
}
# classes only reached through an A1111 name or a Karras equivalent
_INTERNAL_CLASSES = frozenset(cls for cls, _ in (*SAMPLERS.values(), *_KARRAS_EQUIVALENT.values()))
# A1111 "Sampler" names for infotext, so tools that parse `parameters` recognise them
SAMPLER_NAMES = {
    "DPMSolverMultistepScheduler": "DPM++ 2M", "DDIMScheduler": "DDIM",
    "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverSinglestepScheduler": "DPM++ SDE", "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a", "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS", "UniPCMultistepScheduler": "UniPC",
    **{name: name for name in SAMPLERS},
}


def a1111_sampler_name(scheduler: str, use_karras_sigmas: bool) -> str:
    """"DPM++ 2M SDE Karras" for ("DPM++ 2M SDE", True): what A1111 writes as `Sampler`."""
    return SAMPLER_NAMES.get(scheduler, scheduler) + (" Karras" if use_karras_sigmas else "")


def scheduler_class(name: str):
    """The diffusers class for a class name from C.SCHEDULERS or an A1111 name from SAMPLERS."""
    if name in SAMPLERS:
        name = SAMPLERS[name][0]
    elif name not in C.SCHEDULERS and name not in _INTERNAL_CLASSES:
        raise JobError(C.VALIDATION_ERROR,
                       f"unknown scheduler {name!r}; expected one of "
                       f"{', '.join((*C.SCHEDULERS, *SAMPLERS))}")
    return getattr(importlib.import_module("diffusers"), name)


def make_scheduler(name: str, base_config, use_karras_sigmas: bool = False) -> tuple[object, list[str]]:
    """A new scheduler for `name` (class or A1111 sampler) from a pipeline's scheduler config.

    Returns (scheduler, warnings). Karras sigmas on a scheduler that has none is a warning,
    not an error: the image is still made, with the plain schedule."""
    cls_name, overrides = SAMPLERS.get(name, (name, {}))
    overrides = dict(overrides)
    warnings: list[str] = []
    if use_karras_sigmas:
        if cls_name in _KARRAS_EQUIVALENT:
            cls_name, extra = _KARRAS_EQUIVALENT[cls_name]
            overrides.update(extra)
        if cls_name in _KARRAS_CAPABLE:
            overrides["use_karras_sigmas"] = True
        else:
            warnings.append(f"use_karras_sigmas ignored: {name} has no Karras sigma schedule")
    cls = scheduler_class(cls_name)
    return cls.from_config(base_config, **overrides), warnings
