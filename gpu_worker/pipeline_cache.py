"""The worker's memory-budgeted model cache.

Entries are whole models the worker loaded from disk: base pipelines keyed by (name, dtype),
VAEs by (name, dtype), refiners, ControlNets, LoRA files and textual-inversion files. The
pipeline a job runs is composed from them (`compose`): keyed by base model, VAE and dtypes, with
img2img / inpaint / ControlNet variants made by `from_pipe` so every variant shares the cached
weights. `from_pipe` is never given a dtype different from the cached one, since that would cast
the shared components in place (DIFFUSERS-FACTS.md).

Sizes are measured (bytes of unique parameters and buffers), and the least recently used
entries are evicted once the total passes the budget; entries the running job holds are pinned
until `release`. Eviction drops the last reference, runs the GC and empties the accelerator
cache so memory really comes back.

`snapshot()` is what the heartbeat thread reads: a copy made under a lock, never blocking on
a load.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from protocol import constants as C
from protocol.errors import JobError

log = logging.getLogger(__name__)

_MB = 1024 * 1024

# kinds of entries (also reported in heartbeats as models_loaded[].kind)
BASE, VAE, REFINER, CONTROLNET, LORA, TEXTUAL_INVERSION, UPSCALER = (
    "base", "vae", "refiner", "controlnet", "lora", "textual_inversion", "upscaler")


@dataclass
class CacheEntry:
    key: tuple
    name: str
    kind: str
    value: Any
    size_mb: float
    load_time_s: float
    pins: int = 0
    last_used_s: float = field(default_factory=time.monotonic)
    attached_mb: float = 0.0  # weights added to the loaded model since (resident LoRA adapters)
    attached: tuple = ()      # their names (heartbeats report them as loras_cached)


def measured_size_mb(obj: Any) -> float:
    """Bytes of the unique tensors an object holds: a pipeline's components, a module, or a
    dict of tensors. Shared tensors (same storage) count once."""
    seen: set[int] = set()
    total = 0

    def add(tensor: torch.Tensor) -> None:
        nonlocal total
        if tensor.is_meta:
            return
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            return
        seen.add(ptr)
        total += tensor.numel() * tensor.element_size()

    def visit(item: Any) -> None:
        if isinstance(item, torch.nn.Module):
            for tensor in item.parameters():
                add(tensor)
            for tensor in item.buffers():
                add(tensor)
        elif isinstance(item, torch.Tensor):
            add(item)
        elif isinstance(item, dict):
            for value in item.values():
                visit(value)

    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        for component in components.values():
            visit(component)
    else:
        visit(obj)
    return total / _MB


def free_device_memory() -> None:
    """Give freed memory back: collect cycles, then empty the accelerator's caching allocator."""
    gc.collect()
    if torch.cuda.is_available():  # safe on CPU builds (DIFFUSERS-FACTS.md)
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        mps.empty_cache()


class PipelineCache:
    """LRU cache of loaded models against `budget_mb` of measured sizes."""

    def __init__(self, budget_mb: float, clock: Callable[[], float] = time.monotonic):
        self.budget_mb = float(budget_mb)
        self._clock = clock
        self._entries: OrderedDict[tuple, CacheEntry] = OrderedDict()
        self._loading: dict[tuple, str] = {}
        # pipelines composed from entries with from_pipe: they share the entries' weights, so
        # they cost no memory of their own; dropped with any entry they were built from
        self._derived: dict[tuple, tuple[frozenset, Any]] = {}
        self._lock = threading.RLock()       # guards _entries/_loading (heartbeat thread reads)
        self.load_time_s: dict[str, float] = {}
        self.evictions = 0
        self.hits = 0      # get_or_load answered from the cache
        self.misses = 0    # get_or_load had to load

    # --- lookup and load ------------------------------------------------------------------
    def get_or_load(self, key: tuple, name: str, kind: str, load: Callable[[], Any],
                    *, pin: bool = True) -> tuple[Any, bool]:
        """The cached value for `key`, loading it with `load()` on a miss.

        Returns (value, hit). A pinned entry stays until `release(key)`. Loading runs outside
        the lock so the heartbeat thread can still read the cache meanwhile."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.last_used_s = self._clock()
                if pin:
                    entry.pins += 1
                self.hits += 1
                return entry.value, True
            self.misses += 1
            self._loading[key] = name
        started = time.perf_counter()
        try:
            value = load()
        finally:
            with self._lock:
                self._loading.pop(key, None)
        load_time_s = time.perf_counter() - started
        size_mb = measured_size_mb(value)
        entry = CacheEntry(key=key, name=name, kind=kind, value=value, size_mb=size_mb,
                           load_time_s=load_time_s, pins=1 if pin else 0, last_used_s=self._clock())
        with self._lock:
            self._entries[key] = entry
            self.load_time_s[name] = load_time_s
        log.info("loaded %s %s in %.2f s (%.1f MB measured)", kind, name, load_time_s, size_mb)
        self.enforce_budget()
        return value, False

    def derived(self, key: tuple, parents: Iterable[tuple], build: Callable[[], Any]) -> Any:
        """A pipeline composed from cached entries (`parents`), built once and reused."""
        with self._lock:
            found = self._derived.get(key)
            if found is not None:
                return found[1]
        value = build()
        with self._lock:
            self._derived[key] = (frozenset(parents), value)
        return value

    def release(self, keys: Iterable[tuple]) -> None:
        """Unpin the entries a finished job held, then bring the cache back under budget."""
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry.pins > 0:
                    entry.pins -= 1
        self.enforce_budget()

    def set_attached(self, key: tuple, attached_mb: float, names: Iterable[str] = ()) -> None:
        """The entry's model now also holds `attached_mb` of weights it did not have when it was
        measured (LoRA adapters kept between jobs, `names`): they count against the budget with
        it and go with it."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.size_mb += attached_mb - entry.attached_mb
                entry.attached_mb = attached_mb
                entry.attached = tuple(names)

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            return key in self._entries

    # --- eviction --------------------------------------------------------------------------
    def total_mb(self) -> float:
        with self._lock:
            return sum(entry.size_mb for entry in self._entries.values())

    def enforce_budget(self) -> list[str]:
        """Evict unpinned entries, least recently used first, until the total fits the budget.
        Pinned entries may keep the total above budget while their job runs."""
        evicted: list[CacheEntry] = []
        with self._lock:
            total = sum(entry.size_mb for entry in self._entries.values())
            for key in list(self._entries):
                if total <= self.budget_mb:
                    break
                entry = self._entries[key]
                if entry.pins:
                    continue
                del self._entries[key]
                total -= entry.size_mb
                evicted.append(entry)
        return self._finish_eviction(evicted, "over budget")

    def evict(self, predicate: Callable[[CacheEntry], bool] = lambda entry: True,
              *, include_pinned: bool = False, reason: str = "requested") -> list[str]:
        """Evict every entry matching `predicate` (all by default). Returns their names."""
        evicted: list[CacheEntry] = []
        with self._lock:
            for key in list(self._entries):
                entry = self._entries[key]
                if (include_pinned or not entry.pins) and predicate(entry):
                    del self._entries[key]
                    evicted.append(entry)
        return self._finish_eviction(evicted, reason)

    def _finish_eviction(self, evicted: list[CacheEntry], reason: str) -> list[str]:
        if not evicted:
            return []
        names = [entry.name for entry in evicted]
        gone = {entry.key for entry in evicted}
        with self._lock:
            for key in [k for k, (parents, _) in self._derived.items() if parents & gone]:
                del self._derived[key]
        for entry in evicted:
            log.info("evicted %s %s (%.1f MB, %s)", entry.kind, entry.name, entry.size_mb, reason)
            entry.value = None
        self.evictions += len(evicted)
        del evicted
        free_device_memory()
        return names

    # --- telemetry -------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Cheap, thread-safe view for heartbeats."""
        with self._lock:
            loaded = [{"name": entry.name, "kind": entry.kind, "size_mb": round(entry.size_mb, 2)}
                      for entry in self._entries.values()]
            loading = sorted(set(self._loading.values()))
            attached = sorted({name for entry in self._entries.values() for name in entry.attached})
            load_times = dict(self.load_time_s)
        return {"models_loaded": loaded, "models_loading": loading,
                "cache_used_mb": round(sum(item["size_mb"] for item in loaded), 2),
                "cache_budget_mb": self.budget_mb, "load_time_s": load_times,
                "cache_hits": self.hits, "cache_misses": self.misses,
                "cache_evictions": self.evictions, "attached": attached}


def compose_pipeline(base_pipe, pipeline_class, *, vae=None, controlnets: list | None = None,
                     dtype: torch.dtype):
    """A pipeline of `pipeline_class` sharing the cached base pipeline's weights.

    `vae` replaces the base's VAE (custom VAE or another VAE dtype); `controlnets` (one or
    several) turn it into a ControlNet pipeline. diffusers 0.42.1's from_pipe casts the new
    pipeline, shared components included, to its dtype argument (float32 when none is given),
    so it gets the base's own dtype, and the VAE, which may have another dtype, is set after."""
    if base_pipe.unet.dtype != dtype:
        raise JobError(C.INTERNAL_ERROR, f"cache returned a {base_pipe.unet.dtype} pipeline for {dtype}")
    overrides: dict[str, Any] = {}
    if controlnets:
        overrides["controlnet"] = controlnets[0] if len(controlnets) == 1 else list(controlnets)
    if pipeline_class is type(base_pipe) and not overrides and vae is None:
        return base_pipe
    pipe = pipeline_class.from_pipe(base_pipe, dtype=dtype, **overrides)
    if vae is not None:
        pipe.vae = vae  # registers on the new pipeline only; the base keeps its own VAE
    return pipe
