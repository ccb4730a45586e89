"""Small naming rules from the seeds: scheduler names, ControlNet types inferred from paths,
LoRA names from file stems, and the Phase 6 seed's WorkerTypeResolver. Pure functions."""

from __future__ import annotations

import ntpath
import posixpath

from protocol import constants as C
from protocol import rule_texts as R

# lower-cased name -> (diffusers class, use_karras_sigmas or None when the name says nothing)
_SCHEDULER_ALIASES: dict[str, tuple[str, bool | None]] = {}


# the same, keyed by the names exactly as registered (how clients usually spell them)
_SCHEDULER_SPELLINGS: dict[str, tuple[str, bool | None]] = {}


def _alias(cls: str, karras: bool | None, *names: str) -> None:
    for name in names:
        _SCHEDULER_ALIASES[name.lower()] = _SCHEDULER_SPELLINGS[name] = (cls, karras)


for _cls in C.SCHEDULERS:  # the class names themselves
    _alias(_cls, None, _cls)
# the C# enum names the seed's MapSchedulerType knows
_alias("DPMSolverMultistepScheduler", None, "DPMSolverMultistep")
_alias("DDIMScheduler", None, "DDIM")
_alias("EulerDiscreteScheduler", None, "EulerDiscrete", "Euler")
_alias("EulerAncestralDiscreteScheduler", None, "EulerAncestral", "Euler a", "Euler Ancestral")
_alias("DPMSolverSinglestepScheduler", None, "DPMSolverSinglestep", "DPM++ SDE", "DPM++ 2S")
_alias("KDPM2DiscreteScheduler", None, "KDPM2Discrete", "DPM2")
_alias("KDPM2AncestralDiscreteScheduler", None, "KDPM2Ancestral", "DPM2 a")
_alias("HeunDiscreteScheduler", None, "HeunDiscrete", "Heun")
_alias("LMSDiscreteScheduler", None, "LMSDiscrete", "LMS")
_alias("UniPCMultistepScheduler", None, "UniPCMultistep", "UniPC")
_alias("DPMSolverMultistepScheduler", None, "DPM++ 2M", "DPMSolver++")
# the web UIs' "Karras" variants: same class, Karras sigmas on
_alias("DPMSolverMultistepScheduler", True, "DPM++ 2M Karras")
_alias("DPMSolverSinglestepScheduler", True, "DPM++ SDE Karras", "DPM++ 2S Karras")
_alias("KDPM2DiscreteScheduler", True, "DPM2 Karras")
_alias("KDPM2AncestralDiscreteScheduler", True, "DPM2 a Karras")
_alias("LMSDiscreteScheduler", True, "LMS Karras")
_alias("EulerDiscreteScheduler", True, "Euler Karras")
_alias("HeunDiscreteScheduler", True, "Heun Karras")
# A1111 samplers that need more than class + Karras (gpu_worker/schedulers.py has their config)
for _sampler in C.SAMPLER_SCHEDULERS:
    _alias(_sampler, None, _sampler)
_alias("DPM++ 2M SDE", True, "DPM++ 2M SDE Karras")
_alias("DPM++ 3M SDE", True, "DPM++ 3M SDE Karras")
_alias("DPM++ 2S a", True, "DPM++ 2S a Karras")
_alias("EulerAncestralDiscreteScheduler", True, "Euler a Karras")
_alias("UniPCMultistepScheduler", True, "UniPC Karras")

SCHEDULER_NAMES = tuple(sorted({*C.SCHEDULERS, "DPMSolverMultistep", "DDIM", "EulerDiscrete",
                                "EulerAncestral", "DPMSolverSinglestep", "KDPM2Discrete",
                                "KDPM2Ancestral", "HeunDiscrete", "LMSDiscrete", "UniPCMultistep",
                                "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE", "DPM++ SDE Karras",
                                "Euler", "Euler a", "DDIM", "Heun", "LMS", "UniPC", "DPM2",
                                "DPM2 a", "DPM2 Karras", "DPM2 a Karras", "LMS Karras", "Euler Karras",
                                "Heun Karras", "Euler a Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras",
                                "DPM++ 3M SDE", "DPM++ 3M SDE Karras", "DPM++ 2S a", "DPM++ 2S a Karras",
                                "LCM"}))


def scheduler_spellings() -> tuple[str, ...]:
    """Every accepted scheduler name, lower-cased with single spaces (how they are matched)."""
    return tuple(sorted(_SCHEDULER_ALIASES))


def resolve_scheduler(name: str) -> tuple[str, bool | None]:
    """(diffusers class name, use_karras_sigmas or None) for a scheduler name, case-insensitive.
    Raises ValueError naming the valid names for an unknown one (the C# side silently falls back
    to DPMSolverMultistep; a broker that cannot tell a typo from a choice should not)."""
    if isinstance(name, str) and name in _SCHEDULER_SPELLINGS:  # as registered: no re-spelling
        return _SCHEDULER_SPELLINGS[name]
    key = " ".join(str(name).split()).lower()
    try:
        return _SCHEDULER_ALIASES[key]
    except KeyError:
        raise ValueError(R.SCHEDULER(name=shown(name), valid=", ".join(SCHEDULER_NAMES))) from None


def shown(value: object, limit: int = 100) -> str:
    """A value sent by a client, quoted for an error message and cut to `limit` characters."""
    text = value if isinstance(value, str) else str(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _stem(path: str) -> str:
    """File name without extension, for both / and \\ separated paths (C# Path semantics)."""
    base = ntpath.basename(posixpath.basename(path.rstrip("/\\"))) or path
    stem, _dot, _ext = base.rpartition(".")
    return stem if stem else base


def lora_name_from_path(path: str) -> str:
    """The seed's ExtractModelName: "path/to/model.safetensors" -> "model"."""
    return _stem(path) or path


def infer_controlnet_type(text: str | None) -> str:
    """The seed's InferControlNetType: the first known type contained in the file stem,
    else "canny"."""
    if not text:
        return "canny"
    stem = _stem(text).lower()
    for kind in C.CONTROLNET_TYPES:
        if kind in stem:
            return kind
    return "canny"


def controlnet_type(given: str | None, model_path: str | None) -> str:
    """A ControlNet type from an explicit name (case-insensitive, "openpose" -> "pose") or,
    when none is given, from the model path. Raises ValueError for a name naming no type."""
    if given is None or given == "":
        return infer_controlnet_type(model_path)
    low = given.strip().lower()
    if low in C.CONTROLNET_TYPES:
        return low
    for kind in C.CONTROLNET_TYPES:
        if kind in low:
            return kind
    raise ValueError(R.CONTROLNET_TYPE(name=shown(given)))


def has_pickle_suffix(path: str) -> bool:
    return path.lower().endswith(C.PICKLE_SUFFIXES)


def leaves_root(path: str) -> bool:
    """Whether a relative path climbs out of its root through a '..' segment."""
    return ".." in path.replace("\\", "/").split("/")


def save_path_problem(path: str) -> str | None:
    """Why a save_path would leave the output root, or None when it stays inside."""
    if path.startswith(("/", "\\")) or path[1:2] == ":" or "://" in path:
        return R.SAVE_PATH_RELATIVE.message
    if ".." in path and leaves_root(path):
        return R.SAVE_PATH_DOTDOT.message
    if "\x00" in path:
        return R.SAVE_PATH_NUL.message
    return None


HIGH_RESOLUTION_PIXELS = 1024 * 1024


def resolve_worker_type(*, loras: bool, controlnets: bool, refiner: bool, vae: bool,
                        postprocessing: bool, batch_size: int, textual_inversions: bool = False,
                        init_image: bool = False, width: int = C.DEFAULT_SIZE,
                        height: int = C.DEFAULT_SIZE) -> str:
    """The seed's WorkerTypeResolver, extended with textual inversion, img2img/inpaint and
    high resolution (more than 1024x1024 pixels), which the seed's text names as advanced."""
    advanced = (loras or controlnets or refiner or vae or postprocessing or batch_size > 1
                or textual_inversions or init_image or width * height > HIGH_RESOLUTION_PIXELS)
    return C.WORKER_ENHANCED if advanced else C.WORKER_BASIC
