"""CPU workers sharing a host's cores (issue 17): 6 jobs in-process vs `serve --cpu-workers 1`
vs `serve --cpu-workers 2`, with serve's defaults (threads per worker = cores / workers, each
worker pinned to its cores, no attention/VAE slicing). Prints figures, asserts nothing.

    .venv/bin/python bench/cpu_workers.py [--models-dir DIR] [--jobs 6] [--runs 3]
                                          [--size 256] [--steps 4] [--workers 1,2]

The same 6 requests (tiny kit, SIZE x SIZE, STEPS steps, Euler, float32 = the CPU default,
seeds 0..5) run:
- in-process: plain diffusers in this process, one after another, each image saved as PNG
  (what a worker also does), torch with its default threads (every core) and, unless
  --baseline-omp-passive, OpenMP's default wait policy (serve's workers run with
  OMP_WAIT_POLICY=PASSIVE: on a busy host that alone is worth 10x with 2 threads);
- through `serve --devices cpu --cpu-workers N` (a real broker and N real worker processes):
  all 6 sent at once, from the first send to the last final reply. Every worker is warm first
  (it has run a job, so its model is loaded).
Every setup is started and warm first; then the runs go round robin (in-process, serve 1,
serve 2, in-process, ...), each setup --runs times. Goals (issue 17): N=2 finishes in at most 1.1x the in-process time
(median), and the slowest of the runs is within 1.3x of the fastest. The machine may be shared:
each run also prints the CPU that other processes used meanwhile (in cores), so a slow run
can be told from a noisy neighbour.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photo of a cat"
MODEL = "tiny-sdxl"
SCHEDULER = "EulerDiscreteScheduler"
GOAL_RATIO, GOAL_SPREAD = 1.1, 1.3
READY_TIMEOUT_S = 240.0
JOB_TIMEOUT_S = 600.0


# --- CPU used by others ---------------------------------------------------------------------------
class OtherLoad:
    """CPU seconds the whole machine spent busy minus what this process tree spent, per wall
    second: the load of other processes while a run lasted (in cores)."""

    def __init__(self, pids: list[int]):
        import psutil

        self._psutil = psutil
        self._pids = pids

    def _ours(self) -> float:
        total = 0.0
        for pid in self._pids:
            try:
                proc = self._psutil.Process(pid)
                for p in [proc] + proc.children(recursive=True):
                    t = p.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
            except self._psutil.NoSuchProcess:
                continue
        return total

    def _machine(self) -> float:
        t = self._psutil.cpu_times()
        return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    def __enter__(self):
        self._start = (time.perf_counter(), self._machine(), self._ours())
        return self

    def __exit__(self, *exc):
        wall, machine, ours = time.perf_counter(), self._machine(), self._ours()
        self.wall_s = wall - self._start[0]
        self.other_cores = max(0.0, (machine - self._start[1]) - (ours - self._start[2])) / self.wall_s
        return False


# --- in-process -------------------------------------------------------------------------------
class InProcess:
    """Plain diffusers in this process: the pipeline loaded and warm, one run = the jobs one
    after another, each image saved as PNG."""

    def __init__(self, models_dir: str, out_dir: str, args):
        import diffusers
        import torch

        self.torch, self.args, self.out_dir = torch, args, out_dir
        self.pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
            os.path.join(models_dir, MODEL), dtype=torch.float32, local_files_only=True)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        self.runs = 0
        self._one(0, "warm")

    def _one(self, seed: int, tag: str) -> None:
        a = self.args
        image = self.pipe(prompt=PROMPT, width=a.size, height=a.size, num_inference_steps=a.steps,
                          guidance_scale=5.0,
                          generator=self.torch.Generator("cpu").manual_seed(seed)).images[0]
        image.save(os.path.join(self.out_dir, f"{tag}-{seed}.png"), format="PNG")

    def run(self) -> None:
        self.runs += 1
        for seed in range(self.args.jobs):
            self._one(seed, f"run{self.runs}")

    def threads(self) -> int:
        return self.torch.get_num_threads()


# --- through serve --------------------------------------------------------------------------------
class Serve:
    def __init__(self, workers: int, models_dir: str, run_dir: str, extra_argv=()):
        os.makedirs(run_dir, exist_ok=True)
        self.frontend = f"ipc://{run_dir}/fe.sock"
        self.log_path = os.path.join(run_dir, "serve.log")
        self._log = open(self.log_path, "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env = {k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "serve", "--frontend", self.frontend,
             "--backend", f"ipc://{run_dir}/be.sock", "--devices", "cpu", "--cpu-workers", str(workers),
             "--models-dir", models_dir, "--output-dir", os.path.join(run_dir, "out"),
             "--input-dir", run_dir, "--ready-timeout-s", str(READY_TIMEOUT_S), *extra_argv],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("ready "):
            self.stop()
            raise RuntimeError(f"serve did not start; log {self.log_path}:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        with open(self.log_path) as fh:
            return "".join(fh.readlines()[-lines:])

    def status(self) -> dict:
        from clients.client import BrokerClient

        with BrokerClient(self.frontend, timeout_s=10.0, retries=1) as client:
            return client.status()

    def generate_all(self, seeds: list[int], args) -> None:
        """Send every request at once (one client socket each), wait for every final reply."""
        from clients.client import BrokerClient

        errors: list[BaseException] = []

        def one(seed: int) -> None:
            try:
                with BrokerClient(self.frontend, timeout_s=JOB_TIMEOUT_S, retries=0) as client:
                    client.generate(prompt=PROMPT, model_base=MODEL, width=args.size, height=args.size,
                                    steps=args.steps, seed=seed, scheduler=SCHEDULER, guidance_scale=5.0)
            except BaseException as exc:  # reported after the run
                errors.append(exc)
        threads = [threading.Thread(target=one, args=(seed,)) for seed in seeds]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"{len(errors)} job(s) failed: {errors[0]}")

    def warm_up(self, workers: int, args) -> None:
        """Until every worker has run a job (its model loaded): rounds of 2 jobs per worker."""
        for _ in range(5):
            rows = self.status()["workers"]
            if len(rows) == workers and all(r.get("jobs_done", 0) > 0 for r in rows):
                return
            self.generate_all(list(range(100, 100 + 2 * workers)), args)
        raise RuntimeError("the workers did not all get a warm-up job")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# --- output ---------------------------------------------------------------------------------------
def _runs(walls: list[float]) -> str:
    return ", ".join(f"{w:.2f}" for w in walls) + " s"


def tiny_kit(tmp: str, models_dir: str | None) -> str:
    """The tiny kit at --models-dir, else built into tmp (seconds, no hub)."""
    if models_dir is not None:
        return models_dir
    models_dir = os.path.join(tmp, "models")
    subprocess.run([sys.executable, "-m", "broker.cli", "demo-models", "--out", models_dir],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return models_dir


def host_cores() -> int:
    """The cores this process may run on (its affinity), which is what the workers share."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", default=None, help="the tiny kit (default: built in a temp dir)")
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", default="1,2", help="comma list of --cpu-workers to measure")
    parser.add_argument("--max-batch", type=int, default=1,
                        help="serve's --max-batch (default 1, batching off: this bench compares "
                             "threads per worker with the same job-by-job work; bench/batching.py "
                             "measures batching)")
    parser.add_argument("--baseline-omp-passive", action="store_true",
                        help="run the in-process baseline with OMP_WAIT_POLICY=PASSIVE too (as "
                             "serve's workers run), for a like-for-like comparison on a busy host")
    args = parser.parse_args(argv)
    if args.baseline_omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"   # before torch loads (in_process_runs)
    worker_counts = [int(n) for n in args.workers.split(",") if n.strip()]

    with tempfile.TemporaryDirectory(prefix="cpu-workers-bench-") as tmp:
        models_dir = tiny_kit(tmp, args.models_dir)
        cores = host_cores()
        print(f"{args.jobs} jobs, {args.size}x{args.size}, {args.steps} steps, float32, {MODEL}, "
              f"{args.runs} runs each; serve --max-batch {args.max_batch}; this machine: {cores} cores")
        os.makedirs(os.path.join(tmp, "inproc"))
        # every setup is up and warm before the first run; the runs then go round robin
        # (in-process, serve 1, serve 2, in-process, ...) so a neighbour's load hits all alike,
        # and the setups not running sit idle (their OpenMP threads sleep)
        in_process = InProcess(models_dir, os.path.join(tmp, "inproc"), args)
        serves: dict[int, Serve] = {}
        try:
            for n in worker_counts:
                serves[n] = Serve(n, models_dir, os.path.join(tmp, f"serve-{n}"),
                                  extra_argv=["--max-batch", str(args.max_batch)])
                serves[n].warm_up(n, args)
            base_walls, base_other = [], []
            results = {n: ([], [], []) for n in worker_counts}
            for _ in range(args.runs):
                with OtherLoad([os.getpid()]) as load:
                    in_process.run()
                base_walls.append(load.wall_s)
                base_other.append(load.other_cores)
                for n, serve in serves.items():
                    with OtherLoad([serve.proc.pid, os.getpid()]) as load:
                        serve.generate_all(list(range(args.jobs)), args)
                    results[n][0].append(load.wall_s)
                    results[n][1].append(load.other_cores)
            for n, serve in serves.items():
                results[n][2].extend((r["worker_id"], r.get("cpu_threads"), r.get("cpu_affinity"),
                                      r.get("jobs_done")) for r in serve.status()["workers"])
            base_threads = in_process.threads()
        finally:
            for serve in serves.values():
                serve.stop()

    base = statistics.median(base_walls)
    print(f"\n| setup | wall time for {args.jobs} jobs ({args.runs} runs) | median | / in-process "
          f"| slowest / fastest | other processes' CPU per run (cores) |")
    print("| --- | --- | --- | --- | --- | --- |")
    wait = " OMP_WAIT_POLICY=PASSIVE," if args.baseline_omp_passive else ""
    print(f"| plain diffusers in one process ({base_threads} torch threads,{wait} no slicing) | {_runs(base_walls)} | "
          f"{base:.2f} s | 1.00x | {max(base_walls) / min(base_walls):.2f}x | "
          f"{', '.join(f'{o:.2f}' for o in base_other)} |")
    for n, (walls, others, rows) in results.items():
        median = statistics.median(walls)
        print(f"| `serve --cpu-workers {n}` | {_runs(walls)} | {median:.2f} s | {median / base:.2f}x | "
              f"{max(walls) / min(walls):.2f}x | {', '.join(f'{o:.2f}' for o in others)} |")
    print()
    for n, (walls, _others, rows) in results.items():
        print(f"serve --cpu-workers {n}: " + "; ".join(
            f"{wid} {threads} thread(s) on cores {affinity}, {done} jobs" for wid, threads, affinity, done in rows))
    if 2 in results:
        walls = results[2][0]
        ratio = statistics.median(walls) / base
        spread = max(walls) / min(walls)
        print(f"goal: 2 workers <= {GOAL_RATIO}x in-process: {'met' if ratio <= GOAL_RATIO else 'missed'} "
              f"({ratio:.2f}x); slowest / fastest run <= {GOAL_SPREAD}x: "
              f"{'met' if spread <= GOAL_SPREAD else 'missed'} ({spread:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
