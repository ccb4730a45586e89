"""The seeded multi-model workload the routing benchmark replays (issue 8).

Everything here is plain data and arithmetic: no sockets, no clock. Times are real-world
seconds (a 4 s model load, 40 ms per step at 1024x1024); the runner divides them by its time
scale before anything sleeps, and the oracle simulates them unscaled.

The mix (issue 8): base models drawn Zipf(1.1) over 12; 20% of jobs with one to three LoRAs,
10% with a ControlNet, 5% with the refiner; sizes 512..1024 on each side (multiples of 128),
memory need and step time proportional to pixels; Poisson arrivals at a chosen share of the
pool's compute capacity.

Capacity is the pool's *warm* capacity: workers / mean compute time of a job, with every model
already loaded. Model loads come on top, so a policy that loads often runs above 100% even at
"70% load" and its queue grows; that is the effect the benchmark measures.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

# --- the catalogue -----------------------------------------------------------------------
N_BASE_MODELS = 12
ZIPF_S = 1.1
BASE_MODEL_NAMES = tuple(f"sim-base-{i:02d}" for i in range(N_BASE_MODELS))  # rank order
REFINER_NAME = "sim-refiner"
CONTROLNET_TYPES = ("canny", "depth")
N_LORAS = 16
LORA_NAMES = tuple(f"sim-lora-{i:02d}" for i in range(N_LORAS))
SIDES = (512, 640, 768, 896, 1024)  # each of width and height, drawn independently


def controlnet_model_name(cn_type: str) -> str:
    """The name the broker's router uses for a ControlNet given only by type."""
    return f"controlnet-{cn_type}"


@dataclass(frozen=True)
class CostModel:
    """Real-world costs of the simulated devices (the sim workers get the same numbers)."""
    steps: int = 25
    step_time_1024_s: float = 0.040          # per denoising step at 1024x1024; scales with pixels
    controlnet_step_factor: float = 1.0      # ControlNet cost folded into the step (kept 1: see docs)
    load_time_s: float = 4.0                 # a base model from disk to device; others by size
    base_model_mb: float = 6500.0            # SDXL base in fp16 with text encoders and VAE
    refiner_mb: float = 6000.0               # SDXL refiner in fp16
    controlnet_mb: float = 2500.0            # an SDXL ControlNet in fp16
    activation_mb_per_megapixel: float = 2048.0  # the router's estimate (broker/routing.py)
    # dynamic batching: compatible jobs (same models, size, steps, LoRAs) share one call of up
    # to max_batch jobs, each after the first adding batch_cost of a lone job's compute (an
    # assumption, as the broker's routing.BATCH_COMPANION_COST; bench/gpu_bench.py measures
    # the real gain on a GPU). max_batch 1: no batching.
    max_batch: int = 4
    batch_cost: float = 0.5

    def step_time_s(self, width: int, height: int) -> float:
        return self.step_time_1024_s * width * height / (1024 * 1024)

    def model_mb(self, name: str) -> float:
        if name == REFINER_NAME:
            return self.refiner_mb
        if name.startswith("controlnet-"):
            return self.controlnet_mb
        return self.base_model_mb

    def model_load_s(self, name: str) -> float:
        """Load time grows with the bytes read: `load_time_s` for a base-model-sized file."""
        return self.load_time_s * self.model_mb(name) / self.base_model_mb

    def activation_mb(self, width: int, height: int) -> float:
        return self.activation_mb_per_megapixel * width * height / 1e6

    def call_compute_s(self, items: list["WorkItem"]) -> float:
        """Denoising time of one batched call of compatible items (warm models)."""
        return items[0].compute_s(self) * (1 + self.batch_cost * (len(items) - 1))


@dataclass(frozen=True)
class WorkItem:
    index: int
    request_id: str
    arrival_s: float                 # real-world seconds after the run starts
    base_model: str
    width: int
    height: int
    steps: int
    loras: tuple[str, ...] = ()
    controlnet: str | None = None    # a ControlNet type ("canny"), or None
    refiner: str | None = None

    @property
    def models(self) -> tuple[str, ...]:
        """Every model the job needs resident (the router's `job_models` order)."""
        names = [self.base_model]
        if self.refiner:
            names.append(self.refiner)
        if self.controlnet:
            names.append(controlnet_model_name(self.controlnet))
        return tuple(names)

    @property
    def batch_key(self) -> tuple:
        """Items with equal keys can share one call (protocol.batching.batch_key of their
        requests: prompts and seeds differ, everything else of the call is equal)."""
        return (self.base_model, self.width, self.height, self.steps, self.loras, self.controlnet,
                self.refiner)

    def compute_s(self, cost: CostModel) -> float:
        """Denoising time with every model warm."""
        factor = cost.controlnet_step_factor if self.controlnet else 1.0
        return self.steps * cost.step_time_s(self.width, self.height) * factor

    def memory_mb(self, cost: CostModel) -> float:
        """Peak need on a device holding none of its models: weights + activations."""
        return sum(cost.model_mb(m) for m in self.models) + cost.activation_mb(self.width, self.height)


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: str
    model_slots: int                 # how many base models fit beside one 1024x1024 job
    memory_mb: float


def worker_specs(n_workers: int, cost: CostModel = CostModel()) -> list[WorkerSpec]:
    """Unequal memory budgets: room for 2, 3, 4, 2, 3, 4, ... models (issue 8)."""
    specs = []
    for i in range(n_workers):
        slots = 2 + i % 3
        # room for `slots` models plus the activations of the largest (1024x1024) job, plus 1%
        memory_mb = math.ceil((slots * cost.base_model_mb + cost.activation_mb(1024, 1024)) * 1.01)
        specs.append(WorkerSpec(f"sim-{n_workers}w-{i}", slots, float(memory_mb)))
    return specs


@dataclass(frozen=True)
class WorkloadConfig:
    n_jobs: int = 400
    n_workers: int = 4
    load: float = 0.7                # arrival rate as a share of warm capacity
    seed: int = 8
    lora_share: float = 0.20
    controlnet_share: float = 0.10
    refiner_share: float = 0.05
    cost: CostModel = field(default_factory=CostModel)


def zipf_weights(n: int = N_BASE_MODELS, s: float = ZIPF_S) -> list[float]:
    raw = [1.0 / (k ** s) for k in range(1, n + 1)]
    total = sum(raw)
    return [r / total for r in raw]


def draw_jobs(n_jobs: int, seed: int, cfg: WorkloadConfig | None = None) -> list[WorkItem]:
    """The job mix, without arrival times (all 0). The same seed gives the same mix at every
    load, so the loads differ only in how close together the same jobs arrive."""
    cfg = cfg or WorkloadConfig()
    rng = random.Random(f"mix-{seed}")
    weights = zipf_weights()
    jobs = []
    for i in range(n_jobs):
        base = rng.choices(BASE_MODEL_NAMES, weights=weights)[0]
        width, height = rng.choice(SIDES), rng.choice(SIDES)
        loras: tuple[str, ...] = ()
        if rng.random() < cfg.lora_share:
            loras = tuple(rng.sample(LORA_NAMES, rng.randint(1, 3)))
        controlnet = rng.choice(CONTROLNET_TYPES) if rng.random() < cfg.controlnet_share else None
        refiner = REFINER_NAME if rng.random() < cfg.refiner_share else None
        jobs.append(WorkItem(index=i, request_id=f"bench-{seed}-{i:05d}", arrival_s=0.0,
                             base_model=base, width=width, height=height, steps=cfg.cost.steps,
                             loras=loras, controlnet=controlnet, refiner=refiner))
    return jobs


def warm_capacity_jobs_per_s(jobs: list[WorkItem], n_workers: int, cost: CostModel) -> float:
    """Jobs per second the pool finishes with every model warm (the 100% load line)."""
    mean_compute_s = sum(j.compute_s(cost) for j in jobs) / len(jobs)
    return n_workers / mean_compute_s


def make_workload(cfg: WorkloadConfig) -> list[WorkItem]:
    """The mix with Poisson arrivals at `cfg.load` of warm capacity.

    Inter-arrival gaps are drawn once per seed as unit exponentials and divided by the rate,
    so 50%, 70% and 90% replay the same jobs in the same order, only closer together."""
    jobs = draw_jobs(cfg.n_jobs, cfg.seed, cfg)
    rate_per_s = cfg.load * warm_capacity_jobs_per_s(jobs, cfg.n_workers, cfg.cost)
    rng = random.Random(f"arrivals-{cfg.seed}")
    t = 0.0
    out = []
    for job in jobs:
        t += rng.expovariate(1.0) / rate_per_s
        out.append(WorkItem(**{**job.__dict__, "arrival_s": t}))
    return out


def offered_load(jobs: list[WorkItem], n_workers: int, cost: CostModel) -> float:
    """Measured share of warm capacity the arrivals ask for (about cfg.load)."""
    span_s = jobs[-1].arrival_s
    work_s = sum(j.compute_s(cost) for j in jobs)
    return work_s / (span_s * n_workers)


def to_request(item: WorkItem, timeout_s: float) -> dict:
    """The flat C# request (`generate_sdxl_enhanced`) for one item. The sim workers carry the
    time scale, so the body is the same at every scale; `timeout_s` is wall-clock."""
    body: dict = {
        "message_type": "generate_sdxl_enhanced",
        "request_id": item.request_id,
        "prompt": f"benchmark job {item.index}",
        "model_base": item.base_model,
        "width": item.width,
        "height": item.height,
        "steps": item.steps,
        "seed": item.index,
        "timeout": timeout_s,
        "tags": ["bench-routing"],
    }
    if item.refiner:
        body["model_refiner"] = item.refiner
    if item.loras:
        body["lora_names"] = list(item.loras)
        body["lora_weights"] = [0.8] * len(item.loras)
    if item.controlnet:
        body["controlnet_types"] = [item.controlnet]
        body["controlnet_images"] = [_TINY_PNG_B64]
        body["controlnet_weights"] = [1.0]
    return body


# an 8x8 grey PNG: a sim worker never decodes it, but the request must carry a valid image
_TINY_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAAEElEQVR4nGNsYIAAJgaKGAAmCACQXTClHgAAAABJRU5ErkJggg=="
)
