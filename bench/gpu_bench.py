"""What SDXL costs on one device, in-process and through `sdxl-broker serve` (prints figures).

    python bench/gpu_bench.py --device cuda:0          # the whole command on a GPU host
    python bench/gpu_bench.py --device cpu             # tiny kit (automatic on CPU): a smoke run

On an accelerator it builds random-weight pipelines with the real SDXL base architecture
(gpu_worker/sdxl_architecture.py: the published configs; no hub, nothing downloaded) into
--work-dir (kept there: a second run reuses them), then measures, one thing at a time:

  1. model load from safetensors: in this process (diffusers from_pretrained + .to(device)) and
     by the worker (`model_load_request`, the worker's own load_time_s)
  2. steps/s and images/s at 1024x1024 for batch 1, 2, 4: plain diffusers in this process vs
     the same generation through `serve` (one worker on the device), and their ratio
  3. dynamic batching: 8 compatible requests (own prompt and seed each) through serve
     (--max-batch 8) sent at once vs one after another, with how the worker grouped them into
     calls; and in this process 8 calls vs one call of the 8 prompts
  4. LoRA attach cost: in this process (load_lora_weights + set_adapters, unload) and what a
     job through serve pays before its first step (preprocessing_time) with and without LoRA
  5. memory: the worker's reported peak (processing_metrics.memory_peak_mb) against
     torch.cuda.max_memory_allocated of the same generation in this process (CUDA only)
  6. two workers on the device(s) present (two GPUs: one each; one GPU: both on it; CPU:
     `--cpu-workers 2`) against one: throughput of the same burst of jobs, and the ratio

On CPU (or with --tiny) everything runs on the tiny kit (`sdxl-broker demo-models`) at its native
256x256 with few steps, so the suite's smoke test runs it end to end. The figures then say
nothing about SDXL speed; they prove the bench works. Images are noise either way (random
weights). Requests through serve ask for what the in-process call does: same size, steps,
seed, guidance, scheduler, dtype, and attention/VAE slicing off.

Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROMPT = "a photo of a red house by a river"
SEED = 1234
GUIDANCE = 7.5
SCHEDULER = "EulerDiscreteScheduler"
BATCHES = (1, 2, 4)
BATCHING_REQUESTS = 8
READY_TIMEOUT_S = 600.0   # a worker importing torch and loading SDXL on a busy host
JOB_TIMEOUT_S = 1800.0
TINY_LORA = "tiny-lora-a"
LORA_WEIGHT = 0.8


# --- output ---------------------------------------------------------------------------------
def section(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def row(label: str, value: str) -> None:
    print(f"  {label:<58} {value}", flush=True)


def per_s(count: float, seconds: float) -> str:
    return f"{count / seconds:8.3f}" if seconds > 0 else "     n/a"


# --- the run's settings ---------------------------------------------------------------------
class Plan:
    """What this run measures: device, model names, size, steps, dtype."""

    def __init__(self, args: argparse.Namespace):
        self.device = args.device
        self.device_type = args.device.split(":")[0]
        self.tiny = args.tiny if args.tiny is not None else self.device_type == "cpu"
        self.size = args.size or (256 if self.tiny else 1024)
        self.steps = args.steps or (4 if self.tiny else 20)
        self.dtype = args.dtype or ("float32" if self.device_type == "cpu" else "float16")
        self.scaling_jobs = args.scaling_jobs
        self.work_dir = os.path.abspath(args.work_dir)
        self.models_dir = os.path.abspath(args.models_dir or os.path.join(self.work_dir, "models"))
        if self.tiny:
            from gpu_worker import demo_models
            self.base, self.lora = demo_models.BASE, TINY_LORA
        else:
            from gpu_worker import sdxl_architecture
            self.base, self.lora = sdxl_architecture.BASE_NAME, sdxl_architecture.LORA_NAME

    def describe(self) -> str:
        arch = "tiny kit (CPU smoke run: NOT SDXL speed)" if self.tiny else "SDXL base architecture, random weights"
        return (f"{arch}; device {self.device}; {self.size}x{self.size}, {self.steps} steps, {self.dtype}, "
                f"{SCHEDULER}, guidance {GUIDANCE}")

    def job(self, batch_size: int = 1, **extra) -> dict:
        """A flat generate request for what the in-process call does."""
        body = {"message_type": "generate_sdxl_enhanced", "request_id": f"bench-{uuid.uuid4().hex[:12]}",
                "prompt": PROMPT, "model_base": self.base, "width": self.size, "height": self.size,
                "steps": self.steps, "guidance_scale": GUIDANCE, "seed": SEED, "scheduler": SCHEDULER,
                "batch_size": batch_size, "dtype": self.dtype, "vae_dtype": "float32",
                "attention_slicing": False, "vae_slicing": False, "return_images": False}
        body.update(extra)
        return body


def ensure_models(plan: Plan) -> None:
    if plan.tiny:
        if os.path.isfile(os.path.join(plan.models_dir, plan.base, "model_index.json")) and \
                os.path.isfile(os.path.join(plan.models_dir, "loras", f"{plan.lora}.safetensors")):
            row("models", f"tiny kit reused from {plan.models_dir}")
            return
        from gpu_worker.demo_models import build_demo_models
        started = time.perf_counter()
        build_demo_models(plan.models_dir)
        row("models", f"tiny kit built in {plan.models_dir} ({time.perf_counter() - started:.1f} s)")
        return
    from gpu_worker import sdxl_architecture
    if os.path.isfile(os.path.join(plan.models_dir, plan.base, "model_index.json")) and \
            os.path.isfile(os.path.join(plan.models_dir, "loras", f"{plan.lora}.safetensors")):
        row("models", f"random SDXL reused from {plan.models_dir}")
        return
    import torch
    from gpu_worker import devices
    row("models", f"building random SDXL in {plan.models_dir} (once; about 7 GB in float16)")
    sdxl_architecture.build_random_sdxl(
        plan.models_dir, device=str(devices.torch_device(plan.device)), dtype=getattr(torch, plan.dtype),
        progress=lambda what, seconds: row(f"  {what}", f"{seconds:.1f} s"))
    _free_memory(plan)


# --- in-process diffusers ---------------------------------------------------------------------
def _sync(plan: Plan) -> None:
    import torch
    if plan.device_type == "cuda":
        torch.cuda.synchronize(plan.device)
    elif plan.device_type == "mps":
        torch.mps.synchronize()


def _free_memory(plan: Plan) -> None:
    import gc

    import torch
    gc.collect()
    if plan.device_type == "cuda":
        torch.cuda.empty_cache()


def in_process(plan: Plan) -> dict:
    """Plain diffusers in this process: load, batches 1/2/4, LoRA attach/detach."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    from safetensors.torch import load_file

    from gpu_worker import devices

    diffusers_logging.disable_progress_bar()
    results: dict = {"batches": {}, "peak_mb": {}}
    device = devices.torch_device(plan.device)
    dtype = getattr(torch, plan.dtype)
    started = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(plan.models_dir, plan.base), dtype=dtype,
                                                     local_files_only=True).to(device)
    _sync(plan)
    results["load_s"] = time.perf_counter() - started
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def generate(batch: int) -> float:
        generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]
        _sync(plan)
        began = time.perf_counter()
        with torch.inference_mode():
            pipe(prompt=PROMPT, num_inference_steps=plan.steps, guidance_scale=GUIDANCE, width=plan.size,
                 height=plan.size, num_images_per_prompt=batch, generator=generators, output_type="pil")
        _sync(plan)
        return time.perf_counter() - began

    generate(1)  # warm-up: kernels, allocator, lazy imports
    for batch in BATCHES:
        if plan.device_type == "cuda":
            torch.cuda.reset_peak_memory_stats(plan.device)
        results["batches"][batch] = generate(batch)
        if plan.device_type == "cuda":
            results["peak_mb"][batch] = torch.cuda.max_memory_allocated(plan.device) / 2**20

    # dynamic batching's reference: the 8 compatible prompts as 8 calls vs one call (each image
    # from its own generator, as the worker's batched call does)
    def prompts_call(indexes: list[int]) -> float:
        generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in indexes]
        _sync(plan)
        began = time.perf_counter()
        with torch.inference_mode():
            pipe(prompt=[f"{PROMPT}, variant {i}" for i in indexes], num_inference_steps=plan.steps,
                 guidance_scale=GUIDANCE, width=plan.size, height=plan.size, generator=generators,
                 output_type="pil")
        _sync(plan)
        return time.perf_counter() - began

    try:
        one_by_one = sum(prompts_call([i]) for i in range(BATCHING_REQUESTS))
        results["batching"] = (one_by_one, prompts_call(list(range(BATCHING_REQUESTS))))
    except torch.OutOfMemoryError as exc:   # 8 images at 1024x1024 need a big device
        results["batching"] = f"out of memory with {BATCHING_REQUESTS} images in one call ({str(exc)[:80]})"
        _free_memory(plan)

    lora_path = os.path.join(plan.models_dir, "loras", f"{plan.lora}.safetensors")
    attach, detach = [], []
    for _ in range(2):  # the first attach also imports peft's machinery
        _sync(plan)
        began = time.perf_counter()
        pipe.load_lora_weights(dict(load_file(lora_path)), adapter_name="bench")
        pipe.set_adapters(["bench"], adapter_weights=[LORA_WEIGHT])
        _sync(plan)
        attach.append(time.perf_counter() - began)
        began = time.perf_counter()
        pipe.unload_lora_weights()
        _sync(plan)
        detach.append(time.perf_counter() - began)
    results["lora_attach_s"], results["lora_detach_s"] = attach, detach
    del pipe
    _free_memory(plan)
    return results


# --- serve ------------------------------------------------------------------------------------
class Serve:
    """`sdxl-broker serve` as a subprocess on ipc:// endpoints, plus optional extra workers.
    They stay in this script's process group: Ctrl-C or a kill of the group stops them too
    (serve's own workers die with serve)."""

    def __init__(self, plan: Plan, run_dir: str, serve_args: list[str]):
        self.plan, self.run_dir = plan, run_dir
        os.makedirs(run_dir, exist_ok=True)
        self.frontend = f"ipc://{run_dir}/frontend"
        self.backend = f"ipc://{run_dir}/backend"
        self.log_path = os.path.join(run_dir, "serve.log")
        self._log = open(self.log_path, "w")
        self.extra: list[subprocess.Popen] = []
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "serve", "--frontend", self.frontend, "--backend", self.backend,
             "--models-dir", plan.models_dir, "--output-dir", os.path.join(run_dir, "outputs"),
             "--input-dir", run_dir, "--ready-timeout-s", str(READY_TIMEOUT_S), *serve_args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True)
        ready = threading.Event()

        def read_stdout():
            for line in self.proc.stdout:
                if line.startswith("ready "):
                    ready.set()
        threading.Thread(target=read_stdout, daemon=True).start()
        if not ready.wait(READY_TIMEOUT_S) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"serve did not become ready; its log: {self.log_path}\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        with open(self.log_path) as fh:
            return "".join(fh.readlines()[-lines:])

    def client(self):
        from clients.client import BrokerClient
        return BrokerClient(self.frontend, timeout_s=JOB_TIMEOUT_S, retries=0)

    def add_worker(self, device: str, worker_id: str) -> None:
        """One more `sdxl-broker worker` connected to this serve's backend."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        self.extra.append(subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "worker", "--connect", self.backend, "--device", device,
             "--worker-id", worker_id, "--models-dir", self.plan.models_dir,
             "--output-dir", os.path.join(self.run_dir, "outputs"), "--input-dir", self.run_dir],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT))

    def workers(self) -> list[dict]:
        with self.client() as client:
            return [w for w in client.status().get("workers", []) if w.get("state") != "lost"]

    def wait_for_workers(self, count: int) -> list[dict]:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            found = self.workers()
            if len(found) >= count:
                return found
            if any(p.poll() is not None for p in self.extra):
                break
            time.sleep(0.5)
        raise RuntimeError(f"{count} workers did not register; log: {self.log_path}\n{self.tail()}")

    def stop(self) -> None:
        for proc in [*self.extra, self.proc]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.extra, self.proc]:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._log.close()


def timed_job(serve: Serve, body: dict) -> tuple[float, dict]:
    """Send one request and wait for its final reply: (wall seconds, reply)."""
    with serve.client() as client:
        began = time.perf_counter()
        reply = client.request(body)
        wall = time.perf_counter() - began
    if not reply or not reply.get("success"):
        raise RuntimeError(f"request failed: {reply}")
    return wall, reply


def metrics(reply: dict) -> dict:
    return (reply.get("data") or {}).get("processing_metrics") or {}


def burst(serve: Serve, bodies: list[dict]) -> float:
    """Send every request at once (one client each), wait for all: wall seconds."""
    errors: list = []

    def one(body):
        try:
            timed_job(serve, body)
        except Exception as exc:  # reported after the burst
            errors.append(exc)
    threads = [threading.Thread(target=one, args=(body,)) for body in bodies]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(bodies)} requests failed: {errors[0]}")
    return time.perf_counter() - began


def serve_supports(flag: str) -> bool:
    help_text = subprocess.run([sys.executable, "-m", "broker.cli", "serve", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120).stdout
    return flag in help_text


def batching_args() -> list[str]:
    """serve's dynamic batching up to the 8 compatible requests measured (a build without it:
    nothing; its row then says not available)."""
    return ["--max-batch", str(BATCHING_REQUESTS)] if serve_supports("--max-batch") else []


def one_worker_args(plan: Plan) -> list[str]:
    return ["--devices", "cpu", "--cpu-workers", "1"] if plan.device_type == "cpu" else ["--devices", plan.device]


def second_device(plan: Plan) -> tuple[list[str], str | None]:
    """(serve args, extra worker device): two workers on what this host has."""
    if plan.device_type == "cpu":
        return ["--devices", "cpu", "--cpu-workers", "2"], None
    if plan.device_type == "cuda":
        import torch
        index = int(plan.device.split(":")[1]) if ":" in plan.device else 0
        if torch.cuda.device_count() > 1:
            other = f"cuda:{(index + 1) % torch.cuda.device_count()}"
            return ["--devices", f"{plan.device},{other}"], None
    return one_worker_args(plan), plan.device  # one accelerator: a second worker on it


def through_serve(plan: Plan, run_dir: str) -> dict:
    """One worker on the device: load, batches, LoRA jobs, batching, a burst for scaling."""
    results: dict = {"batches": {}, "inference_s": {}, "worker_peak_mb": {}, "lora": {}}
    serve = Serve(plan, os.path.join(run_dir, "one-worker"), one_worker_args(plan) + batching_args())
    try:
        worker = serve.wait_for_workers(1)[0]
        results["worker_id"] = worker["worker_id"]
        with serve.client() as client:
            loaded = client.load_model(plan.base, timeout_s=JOB_TIMEOUT_S)
        results["load"] = loaded
        timed_job(serve, plan.job(1))  # warm-up, as in-process
        for batch in BATCHES:
            wall, reply = timed_job(serve, plan.job(batch))
            results["batches"][batch] = wall
            results["inference_s"][batch] = metrics(reply).get("inference_time")
            results["worker_peak_mb"][batch] = metrics(reply).get("memory_peak_mb")
        results["status_memory"] = serve.workers()[0].get("memory") or {}

        # what a job pays before its first step, with and without a LoRA
        lora = {"lora_names": [plan.lora], "lora_weights": [LORA_WEIGHT]}
        for label, extra in (("no LoRA", {}), ("LoRA, first job", lora), ("same LoRA again", lora),
                             ("no LoRA after LoRA", {})):
            _wall, reply = timed_job(serve, plan.job(1, **extra))
            results["lora"][label] = metrics(reply).get("preprocessing_time")

        # dynamic batching (serve runs with --max-batch 8): the same 8 compatible requests one
        # after another (nothing to batch with) vs sent at once from one client socket
        bodies = lambda: [plan.job(1, prompt=f"{PROMPT}, variant {i}", seed=SEED + i)  # noqa: E731
                          for i in range(BATCHING_REQUESTS)]
        results["batching_available"] = serve_supports("--max-batch")
        if results["batching_available"]:
            from bench.batching import calls_of, send_bodies

            sequential = 0.0
            for body in bodies():
                sequential += timed_job(serve, body)[0]
            began = time.perf_counter()
            replies = send_bodies(serve.frontend, bodies(), JOB_TIMEOUT_S)
            results["batching"] = (sequential, time.perf_counter() - began, calls_of(replies))

        results["burst_one"] = burst(serve, [plan.job(1) for _ in range(plan.scaling_jobs)])
    finally:
        serve.stop()

    args, extra_device = second_device(plan)
    serve = Serve(plan, os.path.join(run_dir, "two-workers"), args + batching_args())
    try:
        if extra_device:
            serve.add_worker(extra_device, "bench-second")
        workers = serve.wait_for_workers(2)
        results["two_workers"] = sorted(f"{w['worker_id']} on {w['device']}" for w in workers)
        with serve.client() as client:
            for worker in workers:
                client.load_model(plan.base, worker["worker_id"], timeout_s=JOB_TIMEOUT_S)
        burst(serve, [plan.job(1) for _ in range(2)])  # warm-up: one job each
        results["burst_two"] = burst(serve, [plan.job(1) for _ in range(plan.scaling_jobs)])
    finally:
        serve.stop()
    return results


# --- report -----------------------------------------------------------------------------------
def report(plan: Plan, local: dict, served: dict) -> None:
    section("model load from safetensors")
    row("in-process (from_pretrained + to(device))", f"{local['load_s']:.2f} s")
    load = served["load"]
    row("worker (model_load_request, worker's load_time_s)",
        f"{float(load.get('load_time_s') or 0):.2f} s" + (" (already cached)" if load.get("cached") else ""))

    section(f"throughput at {plan.size}x{plan.size}, {plan.steps} steps (whole generation incl. text "
            "encoding and VAE decode)")
    print(f"  {'batch':<7}{'in-process':>22}{'through serve':>24}{'serve time /':>16}{'worker inference':>20}",
          flush=True)
    print(f"  {'':<7}{'steps/s  images/s':>22}{'steps/s  images/s':>24}{'in-process':>16}{'(its own timer)':>20}",
          flush=True)
    for batch in BATCHES:
        local_s, served_s = local["batches"][batch], served["batches"][batch]
        inference = served["inference_s"].get(batch)
        inference_text = f"{inference:10.3f} s" if inference is not None else f"{'n/a':>12}"
        print(f"  batch {batch:<3}{per_s(plan.steps, local_s)} {per_s(batch, local_s)}    "
              f"{per_s(plan.steps, served_s)} {per_s(batch, served_s)}   {served_s / local_s:10.2f}x"
              f"   {inference_text}", flush=True)
    print("  (through serve: send to final reply, including the worker saving PNGs; the worker's "
          "inference\n   time is its pipeline call alone)", flush=True)

    section(f"dynamic batching: {BATCHING_REQUESTS} compatible requests (same settings, different prompts)")
    reference = local.get("batching")
    if isinstance(reference, tuple):
        row("in-process: 8 calls / one call of 8 prompts",
            f"{reference[0]:.2f} s / {reference[1]:.2f} s: gain {reference[0] / reference[1]:.2f}x")
    elif reference:
        row("in-process: one call of 8 prompts", reference)
    if served.get("batching_available"):
        sequential, together, calls = served["batching"]
        row("through serve (--max-batch 8): one after another / all at once",
            f"{sequential:.2f} s / {together:.2f} s: gain {sequential / together:.2f}x "
            f"(the worker's calls: {calls} jobs)")
    else:
        row("dynamic batching gain", "not available: this build's `serve` has no --max-batch")

    section("LoRA attach cost")
    attach, detach = local["lora_attach_s"], local["lora_detach_s"]
    row("in-process attach (load_lora_weights + set_adapters)",
        f"{attach[1]:.3f} s (first ever: {attach[0]:.3f} s)")
    row("in-process detach (unload_lora_weights)", f"{detach[1]:.3f} s (first: {detach[0]:.3f} s)")
    for label, seconds in served["lora"].items():
        row(f"through serve, before the first step: {label}", f"{seconds:.3f} s" if seconds is not None else "n/a")

    section("memory: worker's report vs torch.cuda.max_memory_allocated")
    if plan.device_type == "cuda":
        for batch in BATCHES:
            reported = served["worker_peak_mb"].get(batch)
            measured = local["peak_mb"].get(batch)
            row(f"batch {batch}: worker memory_peak_mb / in-process max allocated",
                f"{reported:,.0f} MB / {measured:,.0f} MB ({reported / measured:.2f}x)")
        memory = served.get("status_memory") or {}
        row("worker heartbeat after the batches (used / total)",
            f"{memory.get('used_mb', 0):,.0f} MB / {memory.get('total_mb', 0):,.0f} MB")
    else:
        peak = served["worker_peak_mb"].get(1)
        row("worker memory vs max_memory_allocated",
            f"n/a on {plan.device_type} (max_memory_allocated is CUDA only; the worker reported "
            f"{peak:,.0f} MB of process RSS)" if peak is not None else f"n/a on {plan.device_type}")

    section(f"two workers: {plan.scaling_jobs} batch-1 jobs sent at once (dynamic batching on, --max-batch "
            f"{BATCHING_REQUESTS})")
    one, two = served["burst_one"], served["burst_two"]
    row(f"one worker ({served['worker_id']})", f"{one:.2f} s ({plan.scaling_jobs / one:.3f} images/s)")
    row(f"two workers ({', '.join(served['two_workers'])})", f"{two:.2f} s ({plan.scaling_jobs / two:.3f} images/s)")
    row("two workers scaling ratio (throughput 2 / 1)", f"{one / two:.2f}x")


def _quiet_libraries() -> None:
    """Progress bars and 'no LoRA keys for the text encoder' notices would bury the figures."""
    import logging

    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Prints figures, asserts nothing. See the module docstring.")
    parser.add_argument("--device", default=None,
                        help="cuda:0, mps, directml:0 or cpu (default: cuda:0 when CUDA is present, else cpu)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", dest="tiny", action="store_true", default=None,
                      help="the tiny kit at 256x256 (the default on CPU)")
    size.add_argument("--sdxl", dest="tiny", action="store_false",
                      help="the real SDXL architecture even on CPU (very slow there)")
    parser.add_argument("--size", type=int, default=None, help="width = height (default 1024, tiny 256)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 20, tiny 4)")
    parser.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                        help="default float16 on accelerators, float32 on CPU")
    parser.add_argument("--scaling-jobs", type=int, default=4, help="jobs in the one/two worker burst (default 4)")
    parser.add_argument("--work-dir", default=None,
                        help="models, logs and images go here (default: a temp dir, removed after; "
                             "give one to keep the built models for the next run)")
    parser.add_argument("--models-dir", default=None,
                        help="an existing models dir (the tiny kit or a previous run's); default WORK_DIR/models")
    args = parser.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda:0" if torch.cuda.is_available() else "cpu"
    temporary = args.work_dir is None
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="gpu-bench-")
    plan = Plan(args)
    _quiet_libraries()
    print(f"gpu_bench: {plan.describe()}", flush=True)
    print(f"work dir {plan.work_dir}", flush=True)
    try:
        section("setup")
        ensure_models(plan)
        section("in-process diffusers (running)")
        began = time.perf_counter()
        local = in_process(plan)
        row("done", f"{time.perf_counter() - began:.1f} s")
        section("through serve: one worker, then two (running)")
        began = time.perf_counter()
        served = through_serve(plan, os.path.join(plan.work_dir, f"run-{int(time.time())}"))
        row("done", f"{time.perf_counter() - began:.1f} s")
        report(plan, local, served)
    finally:
        if temporary:
            shutil.rmtree(plan.work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
