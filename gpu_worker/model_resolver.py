"""Model names -> files under the model root, refusing everything a request must not reach.

A request names models (`tiny-sdxl`, `tiny-lora-a`, `canny`, ...); this module finds them under
`--models-dir` in the layouts users really have:

  base / refiner      NAME/ with model_index.json, or NAME.safetensors (one original-layout file,
                      loaded with config=<a diffusers folder of the same architecture>)
  vae                 NAME/ or vae/NAME/ with config.json, or NAME.safetensors
  controlnet          controlnet/NAME/ (or NAME/) with config.json, or controlnet/NAME.safetensors
                      (one file, original ControlNet or diffusers layout: configs as for single
                      checkpoints); a type such as "canny" picks the first controlnet/*canny*
  lora                loras/NAME.safetensors, or an explicit path inside the model root
  textual inversion   embeddings/NAME.safetensors, or an explicit path inside the model root
Each kind is also looked for in the folders of an A1111 or ComfyUI `models/` tree (FOLDERS:
Stable-diffusion/, checkpoints/, diffusers/, VAE/, vae/, ControlNet/, Lora/, LyCORIS/), so
--models-dir can point at such a tree as it is.

Refused, each with a message saying what was looked for where:
  - paths that leave the model root ('..', absolute paths elsewhere, symlinks pointing out)
    -> validation_error
  - pickle checkpoints (.ckpt .bin .pt .pth), unless the operator allows them -> validation_error
  - hub ids ("org/model") not present locally -> model_not_found (no hub is reachable); a
    local copy is found at NAME/ as a path, or in a Hugging Face cache layout under the root
    (models--org--model/snapshots/<rev>/)
  - anything else missing -> model_not_found, listing the names that do exist
Nothing here imports torch: resolution runs before any load and costs microseconds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass

from protocol import constants as C
from protocol.errors import JobError

log = logging.getLogger(__name__)

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
WEIGHT_SUFFIXES = SAFE_SUFFIXES + PICKLE_SUFFIXES
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# kind -> the diffusers pipeline class a folder of that kind declares in model_index.json
_PIPELINE_CLASSES = {
    "base": ("StableDiffusionXLPipeline",),
    "refiner": ("StableDiffusionXLImg2ImgPipeline",),
}
KINDS = ("base", "refiner", "vae", "controlnet", "lora", "textual_inversion")
# where each kind lives under the model root: ours first, then the folders of an A1111 `models/`
# tree and of a ComfyUI `models/` tree, so either is used as it is ("" = the root itself)
FOLDERS = {
    "base": ("", "Stable-diffusion", "checkpoints", "diffusers"),
    "vae": ("", "vae", "VAE"),
    "controlnet": ("controlnet", "ControlNet", ""),
    "lora": ("loras", "Lora", "LyCORIS"),
    "textual_inversion": ("embeddings",),
}
FOLDERS["refiner"] = FOLDERS["base"]


@dataclass(frozen=True)
class ResolvedModel:
    name: str          # the name the model is known by (cache keys, model_info)
    path: str          # real absolute path: a folder, or a file when single_file
    kind: str          # one of KINDS
    single_file: bool  # True for one-file checkpoints (base/refiner/vae) and LoRA/TI files
    config_path: str | None = None  # single-file base/refiner: the diffusers folder for config=


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


_SOUND_FILES: set[tuple[str, int, int]] = set()  # .safetensors files whose header checked out


def _check_safetensors(path: str, size: int) -> None:
    """A header that parses and tensors that end inside the file (a truncated download fails)."""
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > 100 * 1024 * 1024 or 8 + header_len > size:
            raise ValueError("header larger than the file")
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ValueError(f"truncated: tensors end at byte {8 + header_len + end}, the file has {size}")


def _read_safetensors_shapes(path: str) -> dict[str, list[int]]:
    """Tensor shapes from a .safetensors header, without reading the weights (or torch)."""
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > 100 * 1024 * 1024:
            raise ValueError("header too large")
        header = json.loads(fh.read(header_len))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


class ModelResolver:
    """Resolves names for one model root. Cheap; make one per worker and reuse it."""

    def __init__(self, models_dir: str, allow_pickle: bool = False, *,
                 single_file_config: str | None = None):
        """single_file_config: a diffusers folder used as config= for single-file checkpoints
        that have no sibling folder (operator setting); must also lie inside models_dir."""
        self.models_dir = _real(models_dir)
        self.allow_pickle = allow_pickle
        self.single_file_config = single_file_config

    # ---- public: one method per kind ---------------------------------------------------

    def base(self, name: str) -> ResolvedModel:
        return self._pipeline(name, "base")

    def refiner(self, name: str) -> ResolvedModel:
        return self._pipeline(name, "refiner")

    def vae(self, name: str) -> ResolvedModel:
        name = self._check_name(name, "vae")
        path = self._first_existing(name, "vae", self._candidates("vae", name), marker="config.json")
        return self._resolved(name, path, "vae")

    def controlnet(self, name_or_type: str) -> ResolvedModel:
        name = self._check_name(name_or_type, "controlnet")
        candidates = [os.path.join(f, name) if f else name for f in FOLDERS["controlnet"]]
        try:
            path = self._first_existing(name, "controlnet", candidates, marker="config.json", refuse_files=True)
        except JobError as exc:
            if exc.code != C.MODEL_NOT_FOUND:
                raise
            path = self._controlnet_file(name) or (None if "/" in name else self._controlnet_by_type(name))
            if path is None:
                raise
        if os.path.isfile(path):  # a single file: its configs are found when it is loaded
            self.check_weight_file(path, f"controlnet {name!r}")
            return ResolvedModel(_stem(path), path, "controlnet", single_file=True)
        # known by its folder name, so "canny" and "tiny-canny" share one cache entry
        return self._resolved(os.path.basename(path), path, "controlnet")

    def lora(self, name: str, path: str | None = None) -> ResolvedModel:
        return self._weights_file(name, path, "lora")

    def textual_inversion(self, name: str, path: str | None = None) -> ResolvedModel:
        return self._weights_file(name, path, "textual_inversion")

    def available(self) -> dict[str, list[str]]:
        """What a request can name, per kind (for initialize replies and error messages)."""
        root = self.models_dir
        found: dict[str, list[str]] = {kind: [] for kind in KINDS}
        for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            full = os.path.join(root, entry)
            if os.path.isdir(full):
                index = os.path.join(full, "model_index.json")
                if os.path.isfile(index):
                    kind = "refiner" if self._declared_class(full) in _PIPELINE_CLASSES["refiner"] else "base"
                    found[kind].append(entry)
                elif _component_class(full) == "AutoencoderKL":
                    found["vae"].append(entry)
            elif entry.endswith(SAFE_SUFFIXES):
                found["base"].append(entry)  # single files are named with their suffix
        for kind, folder in [(k, f) for k in ("base", "vae", "controlnet", "lora", "textual_inversion")
                             for f in FOLDERS[k] if f]:
            sub = os.path.join(root, folder)
            if kind in ("base", "vae") and os.path.isdir(sub):
                for entry in sorted(os.listdir(sub)):
                    full = os.path.join(sub, entry)
                    if entry.endswith(SAFE_SUFFIXES) or os.path.isfile(os.path.join(full, "model_index.json")) or (
                            kind == "vae" and os.path.isfile(os.path.join(full, "config.json"))):
                        found[kind].append(entry)
                continue
            if os.path.isdir(sub):
                for entry in sorted(os.listdir(sub)):
                    stem, suffix = os.path.splitext(entry)
                    if kind == "controlnet" and os.path.isdir(os.path.join(sub, entry)):
                        found[kind].append(entry)
                    elif kind == "controlnet" and suffix in SAFE_SUFFIXES:
                        found[kind].append(stem)   # a single-file ControlNet
                    elif suffix in SAFE_SUFFIXES or (self.allow_pickle and suffix in PICKLE_SUFFIXES):
                        found[kind].append(stem)
        return found

    # ---- kinds ---------------------------------------------------------------------------

    def _candidates(self, kind: str, name: str) -> list[str]:
        """NAME, then NAME + each weight suffix, in each of the kind's folders."""
        names = [name] + ([f"{name}{s}" for s in self._suffixes()] if not _has_suffix(name) else [])
        return [os.path.join(folder, n) if folder else n for folder in FOLDERS[kind] for n in names]

    def _pipeline(self, name: str, kind: str) -> ResolvedModel:
        name = self._check_name(name, kind)
        candidates = self._candidates(kind, name)
        path = self._first_existing(name, kind, candidates, marker="model_index.json")
        if os.path.isdir(path):
            declared = self._declared_class(path)
            # any SDXL pipeline folder serves as either (a base is a usable refiner)
            if declared and not declared.startswith("StableDiffusionXL"):
                raise JobError(C.VALIDATION_ERROR,
                               f"{kind} model {name!r} at {path} is a {declared}, not an SDXL {kind} pipeline")
            self._refuse_pickle_weights(name, path)
            return ResolvedModel(name, path, kind, single_file=False)
        self.check_weight_file(path, f"{kind} {name!r}")
        return ResolvedModel(name, path, kind, single_file=True,
                             config_path=self._single_file_config(name, path, kind))

    def _weights_file(self, name: str, path: str | None, kind: str) -> ResolvedModel:
        label = kind.replace("_", " ")
        if path:
            full = self.inside_root(path, f"{label} path")
            if not os.path.isfile(full):
                raise JobError(C.MODEL_NOT_FOUND, f"{label} file {path!r} not found (looked at {full})")
            self.check_suffix(full, label)
            self.check_weight_file(full, label)
            return ResolvedModel(name or _stem(full), full, kind, single_file=True)
        name = self._check_name(name, kind)
        candidates = []
        for folder in FOLDERS[kind]:
            if not _has_suffix(name):
                candidates += [f"{folder}/{name}{s}" for s in self._suffixes()]
            candidates.append(f"{folder}/{name}")
        full = self._first_existing(name, kind, candidates, files_only=True)
        self.check_weight_file(full, label)
        return ResolvedModel(_stem(name), full, kind, single_file=True)

    def _controlnet_file(self, name: str) -> str | None:
        """controlnet/NAME.safetensors (or NAME with that suffix) in a ControlNet folder of the
        model root; never at the root itself, where base checkpoints live. Single-file
        ControlNets are read as safetensors only."""
        if os.path.isabs(name):
            return None
        candidate = name if name.lower().endswith(SAFE_SUFFIXES) else name + SAFE_SUFFIXES[0]
        for sub in (f for f in FOLDERS["controlnet"] if f):
            full = self.inside_root(os.path.join(sub, candidate), "controlnet")
            if os.path.isfile(full):
                return full
        return None

    def _controlnet_by_type(self, control_type: str) -> str | None:
        """The first controlnet/*TYPE* folder, else the first controlnet/*TYPE*.safetensors."""
        files: list[str] = []
        for sub in FOLDERS["controlnet"]:
            folder = os.path.join(self.models_dir, sub)
            if not sub or not os.path.isdir(folder):
                continue
            for entry in sorted(os.listdir(folder)):
                full = os.path.join(folder, entry)
                if control_type.lower() not in entry.lower():
                    continue
                real = _real(full)
                if not _is_within(real, self.models_dir):
                    continue
                if os.path.isfile(os.path.join(full, "config.json")):
                    self._refuse_pickle_weights(entry, real)
                    return real
                if os.path.isfile(real) and entry.lower().endswith(SAFE_SUFFIXES):
                    files.append(real)
        return files[0] if files else None

    # ---- shared checks -----------------------------------------------------------------

    def _suffixes(self) -> tuple[str, ...]:
        return WEIGHT_SUFFIXES if self.allow_pickle else SAFE_SUFFIXES

    def _check_name(self, name: str, kind: str) -> str:
        if not isinstance(name, str) or not name.strip():
            raise JobError(C.VALIDATION_ERROR, f"{kind.replace('_', ' ')} name is empty")
        if "\x00" in name:
            raise JobError(C.VALIDATION_ERROR, f"{kind.replace('_', ' ')} name contains a NUL byte")
        return name.strip()

    def inside_root(self, path: str, what: str) -> str:
        """Absolute real path of `path` (relative ones are taken from the model root), or a
        validation_error when it leaves the root, directly or through a symlink."""
        if "\x00" in path:
            raise JobError(C.VALIDATION_ERROR, f"{what} contains a NUL byte")
        joined = path if os.path.isabs(path) else os.path.join(self.models_dir, path)
        real = _real(joined)
        if not _is_within(real, self.models_dir):
            raise JobError(C.VALIDATION_ERROR,
                           f"{what} {path!r} is outside the model root {self.models_dir}")
        return real

    def check_suffix(self, path: str, label: str) -> None:
        suffix = os.path.splitext(path)[1].lower()
        if suffix in PICKLE_SUFFIXES and not self.allow_pickle:
            raise JobError(C.VALIDATION_ERROR,
                           f"{label} {path} is a pickle checkpoint ({suffix}); refused because pickle "
                           f"files can run code (the operator can allow them with --allow-pickle)")

    def _first_existing(self, name: str, kind: str, candidates: list[str], *, marker: str | None = None,
                        files_only: bool = False, refuse_files: bool = False) -> str:
        """The first candidate (relative to the root, or `name` itself if absolute) that exists."""
        label = kind.replace("_", " ")
        if os.path.isabs(name):
            candidates = [name]
        elif _HUB_ID.match(name) and not files_only:
            candidates = candidates + self._hub_cache_candidates(name)
        looked: list[str] = []
        pickle_seen: str | None = None
        for candidate in candidates:
            full = self.inside_root(candidate, label)
            looked.append(full)
            if os.path.isdir(full) and not files_only:
                if marker and not os.path.isfile(os.path.join(full, marker)):
                    raise JobError(C.MODEL_NOT_FOUND, f"{label} folder {full} has no {marker}")
                return full
            if os.path.isfile(full) and not refuse_files:
                self.check_suffix(full, label)
                return full
        # a refused pickle next to the name is worth telling apart from "not there"
        if not self.allow_pickle and not _has_suffix(name) and not os.path.isabs(name):
            for candidate in candidates:
                base = self.inside_root(candidate, label)
                for suffix in PICKLE_SUFFIXES:
                    if os.path.isfile(base + suffix):
                        pickle_seen = base + suffix
                        break
                if pickle_seen:
                    break
        if pickle_seen:
            self.check_suffix(pickle_seen, label)
        where = ", ".join(looked)
        known = self.available().get(kind, [])
        known_text = f"; available: {', '.join(known)}" if known else ""
        if _HUB_ID.match(name) and not os.path.isabs(name):
            raise JobError(C.MODEL_NOT_FOUND,
                           f"{label} {name!r} not found under {self.models_dir} (looked for {where}); "
                           f"no model hub is reachable{known_text}")
        raise JobError(C.MODEL_NOT_FOUND,
                       f"{label} {name!r} not found under {self.models_dir} (looked for {where}){known_text}")

    def _hub_cache_candidates(self, hub_id: str) -> list[str]:
        """A model root may be (or hold) a Hugging Face cache: org/name is then found offline at
        models--org--name/snapshots/<the revision refs/main names, else the newest>."""
        repo = "models--" + hub_id.replace("/", "--")
        out = []
        for cache in (repo, f"hub/{repo}"):
            snapshots = os.path.join(self.models_dir, cache, "snapshots")
            if not os.path.isdir(snapshots):
                continue
            try:
                with open(os.path.join(self.models_dir, cache, "refs", "main"), encoding="utf-8") as fh:
                    revision = fh.read().strip()
            except OSError:
                revision = ""
            if not revision or not os.path.isdir(os.path.join(snapshots, revision)):
                entries = sorted(os.listdir(snapshots), key=lambda e: os.path.getmtime(os.path.join(snapshots, e)))
                revision = entries[-1] if entries else ""
            if revision:
                out.append(os.path.join(cache, "snapshots", revision))
        return out

    def _resolved(self, name: str, path: str, kind: str) -> ResolvedModel:
        if os.path.isdir(path):
            self._refuse_pickle_weights(name, path)
            return ResolvedModel(name, path, kind, single_file=False)
        self.check_weight_file(path, f"{kind} {name!r}")
        return ResolvedModel(name, path, kind, single_file=True)

    def _refuse_pickle_weights(self, name: str, folder: str) -> None:
        """Every file a load of this folder may read, sub-folders included, checked one by one:
        inside the model root after resolving symlinks, a readable .safetensors, and no
        pickle-only component (diffusers would unpickle its .bin/.pt) unless pickle is allowed."""
        for directory, subdirs, files in os.walk(folder, followlinks=True):
            subdirs.sort()
            real_dir = _real(directory)
            if not _is_within(real_dir, self.models_dir):
                raise JobError(C.VALIDATION_ERROR, f"model {name!r}: {directory} leads outside the model root "
                                                   f"{self.models_dir} (through a symlink)")
            has_safe = any(f.endswith(SAFE_SUFFIXES) for f in files)
            for entry in sorted(files):
                path = os.path.join(directory, entry)
                if not entry.endswith(WEIGHT_SUFFIXES + (".json", ".txt", ".model")):
                    continue
                self.check_weight_file(path, f"model {name!r}")
                if entry.endswith(PICKLE_SUFFIXES) and not has_safe and not self.allow_pickle:
                    raise JobError(C.VALIDATION_ERROR,
                                   f"model {name!r}: {path} holds pickle weights and no .safetensors; refused "
                                   f"(the operator can allow pickle with --allow-pickle)")

    def check_weight_file(self, path: str, what: str) -> None:
        """One file a load reads: inside the root after symlinks, readable, and for
        .safetensors a sound header whose tensors fit in the file (cached by size and mtime)."""
        real = _real(path)
        if not _is_within(real, self.models_dir):
            raise JobError(C.VALIDATION_ERROR, f"{what}: {path} leads outside the model root {self.models_dir} "
                                               f"(through a symlink)")
        try:
            stat = os.stat(real)
            if not real.endswith(SAFE_SUFFIXES):
                with open(real, "rb"):
                    return
            key = (real, stat.st_size, stat.st_mtime_ns)
            if key in _SOUND_FILES:
                return
            _check_safetensors(real, stat.st_size)
            _SOUND_FILES.add(key)
        except (OSError, ValueError, struct.error, KeyError, TypeError) as exc:
            raise JobError(C.VALIDATION_ERROR, f"{what}: {path} is not a readable weight file "
                                               f"({exc.__class__.__name__}: {exc})") from None

    def _declared_class(self, folder: str) -> str | None:
        try:
            with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as fh:
                return json.load(fh).get("_class_name")
        except (OSError, ValueError):
            return None

    # ---- single-file configs ------------------------------------------------------------

    def _single_file_config(self, name: str, path: str, kind: str) -> str | None:
        """Where a single-file checkpoint's configs come from, in this order: the operator's
        --single-file-config folder, a diffusers folder of the same architecture next to the
        file, the Hugging Face cache/hub (None: diffusers finds them; only when HF_HUB_OFFLINE is
        unset), else configs the product ships, sized from the file's tensors."""
        looked: list[str] = []
        options: list[str] = []
        if self.single_file_config:
            options.append(self.inside_root(self.single_file_config, "single-file config folder"))
        stem = _stem(path)
        directory = os.path.dirname(path)
        options.append(os.path.join(directory, stem))
        for entry in sorted(os.listdir(directory)):
            full = os.path.join(directory, entry)
            if full not in options and os.path.isfile(os.path.join(full, "model_index.json")):
                options.append(full)
        try:
            shapes = _read_safetensors_shapes(path) if path.endswith(".safetensors") else None
        except (OSError, ValueError, struct.error) as exc:
            raise JobError(C.VALIDATION_ERROR, f"{kind} file {path} is not a readable .safetensors file: {exc}")
        for option in options:
            looked.append(option)
            if not os.path.isfile(os.path.join(option, "model_index.json")):
                continue
            if not (self._declared_class(option) or "").startswith("StableDiffusionXL"):
                continue
            if shapes is None or _unet_matches(shapes, option):
                log.debug("single file %s uses config %s", path, option)
                return _real(option)
        if not hub_offline():
            return None  # diffusers reads the configs from the HF cache, or the hub
        from gpu_worker import single_file_configs

        reason = "not a .safetensors file"
        if shapes is not None:
            try:
                folder = single_file_configs.write_config_folder(shapes, config_cache_dir(), write=False)
                log.debug("single file %s: configs from its tensors at %s", path, folder)
                return folder  # written by the load (ensure_config_folder)
            except (single_file_configs.NotSDXL, KeyError, StopIteration, ValueError) as exc:
                reason = f"its tensors are not an SDXL base or refiner ({exc})"
        raise JobError(
            C.MODEL_NOT_FOUND,
            f"{kind} single file {path} has no configs: {reason}, and no diffusers folder of the same "
            f"architecture was found (looked at {', '.join(looked) or 'nothing'}). Do one of: set "
            f"--single-file-config DIR to a diffusers folder of its architecture (inside the model root); "
            f"put that folder next to the file as {os.path.join(directory, stem)}/; or let the worker "
            f"use the Hugging Face cache/hub (unset HF_HUB_OFFLINE)")

    def vae_config(self, path: str) -> tuple[str | None, str | None]:
        """(config folder, subfolder) for a single-file VAE: the --single-file-config folder's vae/,
        the HF hub (None, None when allowed), else one the product writes from the tensors."""
        if self.single_file_config:
            folder = self.inside_root(self.single_file_config, "single-file config folder")
            if os.path.isfile(os.path.join(folder, "vae", "config.json")):
                return folder, "vae"
        if not hub_offline():
            return None, None
        from gpu_worker import single_file_configs

        try:
            return single_file_configs.write_vae_config(_read_safetensors_shapes(path), config_cache_dir()), None
        except (OSError, ValueError, KeyError, StopIteration, struct.error) as exc:
            raise JobError(C.MODEL_NOT_FOUND,
                           f"vae single file {path}: no config ({exc.__class__.__name__}: {exc}). Set "
                           "--single-file-config DIR to a diffusers folder with vae/config.json, or unset "
                           "HF_HUB_OFFLINE so diffusers reads it from the Hugging Face cache/hub") from None


    def controlnet_config(self, path: str, base_unet_config: dict | None = None) -> str | None:
        """The config folder of a single-file ControlNet, in this order: the
        --single-file-config folder's controlnet/ (or the folder itself when it is a ControlNet),
        a ControlNet folder named like the file next to it, each only when its widths are the
        file's; the Hugging Face cache/hub (None; only when HF_HUB_OFFLINE is unset); else one
        the product writes from the file's tensors (sizes they do not show from
        `base_unet_config`, the base UNet the ControlNet runs with)."""
        from gpu_worker import single_file_configs

        try:
            shapes = _read_safetensors_shapes(path)
            wanted = single_file_configs.controlnet_config(shapes, base_unet_config)
        except (OSError, ValueError, KeyError, StopIteration, IndexError, struct.error) as exc:
            reason = str(exc) if isinstance(exc, single_file_configs.NotControlNet) else \
                f"{exc.__class__.__name__}: {exc}"
            raise JobError(C.VALIDATION_ERROR,
                           f"controlnet single file {path} is not a ControlNet this worker can read: {reason}") from None
        options: list[str] = []
        if self.single_file_config:
            folder = self.inside_root(self.single_file_config, "single-file config folder")
            options += [os.path.join(folder, "controlnet"), folder]
        options.append(os.path.join(os.path.dirname(path), _stem(path)))
        for option in options:
            if _component_class(option) == "ControlNetModel" and \
                    _config_value(option, "block_out_channels") == wanted["block_out_channels"]:
                return _real(option)
        if not hub_offline():
            return None
        return single_file_configs.write_controlnet_config(shapes, config_cache_dir(), base_unet_config)


def ensure_config_folder(checkpoint: str, config: str) -> None:
    """Write the shipped-config folder `config` for `checkpoint` if the resolver only named it."""
    if config and not os.path.isfile(os.path.join(config, "model_index.json")):
        from gpu_worker import single_file_configs

        written = single_file_configs.write_config_folder(_read_safetensors_shapes(checkpoint),
                                                          os.path.dirname(config))
        log.info("single file %s: configs written from its tensors to %s", checkpoint, written)


def hub_offline() -> bool:
    """The Hugging Face hub may be asked only when HF_HUB_OFFLINE is unset (or 0/false)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def config_cache_dir() -> str:
    """Where configs written for single files go (not the model root: it may be read-only)."""
    base = os.environ.get("SDXL_BROKER_CONFIG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sdxl-broker", "single-file-configs")
    os.makedirs(base, exist_ok=True)
    return base


def _has_suffix(name: str) -> bool:
    return name.lower().endswith(WEIGHT_SUFFIXES)


def _stem(path: str) -> str:
    base = os.path.basename(path.rstrip("/"))
    for suffix in WEIGHT_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _component_class(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
            return json.load(fh).get("_class_name")
    except (OSError, ValueError):
        return None


def _config_value(folder: str, key: str):
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
            value = json.load(fh).get(key)
    except (OSError, ValueError):
        return None
    return list(value) if isinstance(value, (list, tuple)) else value


def _unet_matches(shapes: dict[str, list[int]], folder: str) -> bool:
    """Cheap architecture check of an original-layout checkpoint against a diffusers UNet
    config: first conv width and the text-time embedding input size."""
    try:
        with open(os.path.join(folder, "unet", "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return False
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    label_emb = shapes.get("model.diffusion_model.label_emb.0.0.weight")
    if conv_in is None:
        return False
    if conv_in[0] != config.get("block_out_channels", [None])[0]:
        return False
    if label_emb is not None and label_emb[1] != config.get("projection_class_embeddings_input_dim"):
        return False
    return True
