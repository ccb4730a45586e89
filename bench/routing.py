"""Routing benchmark (issue 8): the same seeded workload through the real broker under each
policy, with SIMULATED workers, compared with a clairvoyant oracle computed offline.

    python -m bench.routing            # full run, about 10 minutes on 2 cores
    python -m bench.routing --quick    # 70% load only, 150 jobs: about 1-2 minutes

Every run starts a real `sdxl-broker broker` process and one `python -m bench.sim_worker`
process per simulated device (`sdxl-broker worker --sim --sim-cost-model scaled` plus a counters
file; real ZeroMQ sockets over ipc://), replays the workload from a
DEALER client with Poisson arrivals, and reads the workers' counters when they stop. All
times in the workload (4 s loads, 40 ms steps, 1 s heartbeats) are divided by --time-scale
before anything sleeps; every figure printed is converted back to real-world seconds.
Figures go to bench/results/routing.json and routing.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgpack
import zmq

from bench import workload as W
from bench.oracle import cold_start_floor, run_oracle

log = logging.getLogger("bench.routing")

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
POLICIES = ("smart", "round-robin", "least-loaded", "tiered")
REAL_HEARTBEAT_S = 1.0            # the product's default heartbeat, scaled like everything else
WALL_LIVENESS_S = 5.0             # a worker silent this long (wall clock) is lost, at any scale


@dataclass
class RunFigures:
    policy: str
    n_workers: int
    load: float
    jobs: int
    completed: int
    failed: int
    unanswered: int
    error_codes: dict[str, int]
    model_loads: int
    evictions: int
    out_of_memory: int
    latency_mean_s: float
    latency_p50_s: float
    latency_p99_s: float
    throughput_jobs_per_s: float
    busy_share: float
    wall_s: float = 0.0
    jobs_per_worker: dict[str, int] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


# --- processes ------------------------------------------------------------------------------
class Cluster:
    """One broker process and its simulated worker processes; always cleaned up."""

    def __init__(self, workdir: Path, policy: str, specs: list[W.WorkerSpec], cost: W.CostModel,
                 time_scale: float):
        self.workdir = workdir
        self.policy = policy
        self.specs = specs
        self.cost = cost
        self.time_scale = time_scale
        self.frontend = f"ipc://{workdir}/frontend"
        self.backend = f"ipc://{workdir}/backend"
        self.procs: list[subprocess.Popen] = []
        self.heartbeat_s = REAL_HEARTBEAT_S / time_scale
        self.liveness = max(3, math.ceil(WALL_LIVENESS_S / self.heartbeat_s))

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log_file = open(self.workdir / f"{name}.log", "wb")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE if name == "broker" else log_file,
                                stderr=log_file, cwd=ROOT, env=env)
        log_file.close()
        self.procs.append(proc)
        return proc

    def start(self, timeout_s: float = 60.0) -> None:
        broker = self._spawn("broker", [
            sys.executable, "-m", "broker.cli", "broker", "--frontend", self.frontend,
            "--backend", self.backend, "--routing", self.policy, "--max-queue", "100000",
            "--heartbeat-interval-s", f"{self.heartbeat_s:.6f}",
            "--heartbeat-liveness", str(self.liveness), "--log-level", "WARNING"])
        ready, _, _ = select.select([broker.stdout], [], [], timeout_s)
        line = broker.stdout.readline().decode().strip() if ready else "(nothing)"
        if not line.startswith("ready"):
            raise RuntimeError(f"broker did not start: {line!r}; see {self.workdir}/broker.log")
        sizes = {n: self.cost.model_mb(n) for n in W.BASE_MODEL_NAMES}
        sizes[W.REFINER_NAME] = self.cost.refiner_mb
        for t in W.CONTROLNET_TYPES:
            sizes[W.controlnet_model_name(t)] = self.cost.controlnet_mb
        size_arg = ",".join(f"{n}={mb:g}" for n, mb in sizes.items())
        for spec in self.specs:
            self._spawn(spec.worker_id, [
                sys.executable, "-m", "bench.sim_worker", "--connect", self.backend,
                "--device", "cpu", "--worker-id", spec.worker_id,
                "--sim-load-s", f"{self.cost.load_time_s / self.time_scale:.6f}",
                "--sim-model-mb", f"{self.cost.base_model_mb:g}",
                "--sim-step-s", f"{self.cost.step_time_1024_s / self.time_scale:.6f}",
                "--sim-memory-mb", f"{spec.memory_mb:g}", "--sim-model-sizes", size_arg,
                "--max-batch", str(self.cost.max_batch), "--sim-batch-cost", f"{self.cost.batch_cost:g}",
                "--heartbeat-interval-s", f"{self.heartbeat_s:.6f}",
                "--heartbeat-liveness", str(self.liveness), "--log-level", "WARNING",
                "--bench-counters-file", str(self.workdir / f"{spec.worker_id}.counters.json")])

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10.0
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()

    def counters(self) -> dict[str, dict]:
        out = {}
        for spec in self.specs:
            path = self.workdir / f"{spec.worker_id}.counters.json"
            out[spec.worker_id] = json.loads(path.read_text()) if path.exists() else {}
        return out


class Client:
    """A DEALER client speaking msgpack to the broker's frontend."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, body: dict) -> None:
        self.sock.send_multipart([b"", msgpack.packb(body, use_bin_type=True)])

    def recv(self, timeout_s: float) -> dict | None:
        if not self.sock.poll(max(timeout_s, 0.0) * 1000):
            return None
        return msgpack.unpackb(self.sock.recv_multipart()[-1], raw=False)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def wait_for_workers(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rid = f"status-{uuid.uuid4().hex[:8]}"
            self.send({"message_type": "status_request", "request_id": rid})
            reply = self.recv(2.0)
            while reply is not None and reply.get("request_id") != rid:
                reply = self.recv(0.5)  # a late answer to an earlier status request
            if reply is not None:
                workers = (reply.get("data") or {}).get("workers") or []
                if sum(1 for w in workers if w.get("state") != "lost") >= n:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{n} workers did not register within {timeout_s:.0f} s")


# --- one run --------------------------------------------------------------------------------
def run_policy(policy: str, items: list[W.WorkItem], specs: list[W.WorkerSpec], load: float,
               cost: W.CostModel, time_scale: float, keep_dir: Path | None = None) -> RunFigures:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{policy}-", dir=keep_dir))
    cluster = Cluster(workdir, policy, specs, cost, time_scale)
    client = None
    started_wall = time.monotonic()
    try:
        cluster.start()
        client = Client(cluster.frontend)
        client.wait_for_workers(len(specs), timeout_s=60.0)
        sent_at: dict[str, float] = {}
        replies: dict[str, tuple[float, dict]] = {}
        # how long to wait for the last reply: the oracle's makespan is far below this
        work_wall_s = sum(i.compute_s(cost) + cost.load_time_s for i in items) / time_scale
        t0 = time.perf_counter()
        give_up = t0 + items[-1].arrival_s / time_scale + work_wall_s / len(specs) * 3 + 30.0
        next_index = 0
        while len(replies) < len(items) and time.perf_counter() < give_up:
            now = time.perf_counter()
            while next_index < len(items) and t0 + items[next_index].arrival_s / time_scale <= now:
                item = items[next_index]
                client.send(W.to_request(item, timeout_s=3600.0))
                sent_at[item.request_id] = time.perf_counter()
                next_index += 1
            next_send = (t0 + items[next_index].arrival_s / time_scale
                         if next_index < len(items) else now + 0.5)
            reply = client.recv(next_send - time.perf_counter())
            while reply is not None:
                rid = reply.get("request_id")
                if reply.get("final") and rid in sent_at and rid not in replies:
                    replies[rid] = (time.perf_counter(), reply)
                reply = client.recv(0)
        end = max((t for t, _ in replies.values()), default=time.perf_counter())
    finally:
        if client is not None:
            client.close()
        cluster.stop()
    counters = cluster.counters()
    span_wall_s = max(end - t0, 1e-9)
    latencies = [(t - sent_at[rid]) * time_scale for rid, (t, r) in replies.items() if r.get("success")]
    codes: dict[str, int] = {}
    per_worker: dict[str, int] = {}
    for _, reply in replies.values():
        if reply.get("success"):
            wid = ((reply.get("data") or {}).get("processing_metrics") or {}).get("worker_id", "?")
            per_worker[wid] = per_worker.get(wid, 0) + 1
        else:
            codes[reply.get("error_code")] = codes.get(reply.get("error_code"), 0) + 1
    oom_replies = codes.get("out_of_memory", 0)
    oom_workers = sum(int(c.get("out_of_memory", 0)) for c in counters.values())
    missing_counters = [w for w, c in counters.items() if not c]
    if missing_counters:
        log.warning("no counters from %s (see %s)", missing_counters, workdir)
    busy_wall_s = sum(float(c.get("busy_s", 0.0)) for c in counters.values())
    figures = RunFigures(
        policy=policy, n_workers=len(specs), load=load, jobs=len(items),
        completed=len(latencies), failed=sum(codes.values()),
        unanswered=len(items) - len(replies), error_codes=codes,
        model_loads=sum(int(c.get("loads", 0)) for c in counters.values()),
        evictions=sum(int(c.get("evictions", 0)) for c in counters.values()),
        out_of_memory=max(oom_replies, oom_workers),
        latency_mean_s=statistics.fmean(latencies) if latencies else math.nan,
        latency_p50_s=percentile(latencies, 50), latency_p99_s=percentile(latencies, 99),
        throughput_jobs_per_s=len(latencies) / (span_wall_s * time_scale),
        busy_share=busy_wall_s / (len(specs) * span_wall_s),
        wall_s=time.monotonic() - started_wall, jobs_per_worker=per_worker)
    if figures.unanswered == 0 and figures.failed == 0 and keep_dir is None:
        _remove_tree(workdir)
    else:
        log.warning("%s: %d unanswered, %d failed; logs kept in %s", policy, figures.unanswered,
                    figures.failed, workdir)
    return figures


def _remove_tree(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def oracle_figures(items: list[W.WorkItem], specs: list[W.WorkerSpec], load: float,
                   cost: W.CostModel) -> RunFigures:
    out = run_oracle(items, specs, cost, patience_s=cost.load_time_s)
    latencies = [x for x in out.latencies_s if math.isfinite(x)]
    return RunFigures(
        policy="oracle", n_workers=len(specs), load=load, jobs=len(items),
        completed=len(latencies), failed=out.unplaceable, unanswered=0, error_codes={},
        model_loads=out.loads, evictions=out.evictions, out_of_memory=0,
        latency_mean_s=statistics.fmean(latencies), latency_p50_s=percentile(latencies, 50),
        latency_p99_s=percentile(latencies, 99),
        throughput_jobs_per_s=len(latencies) / out.makespan_s,
        busy_share=sum(out.busy_s.values()) / (len(specs) * out.makespan_s),
        jobs_per_worker={w: out.assignments.count(w) for w in sorted(set(out.assignments))})


# --- goals and output -------------------------------------------------------------------------
def check_goals(rows: list[RunFigures]) -> list[dict]:
    """Issue 8's goals, per worker count, at 70% load (OOM: at every load)."""
    verdicts = []
    by_key = {(r.policy, r.n_workers, r.load): r for r in rows}
    for n in sorted({r.n_workers for r in rows}):
        smart, rr, oracle = (by_key.get((p, n, 0.7)) for p in ("smart", "round-robin", "oracle"))
        if smart and oracle:
            ratio = smart.model_loads / max(oracle.model_loads, 1)
            verdicts.append({"goal": f"{n} workers, 70%: smart loads <= 1.2x oracle",
                             "value": f"{smart.model_loads} vs {oracle.model_loads} ({ratio:.2f}x)",
                             "met": ratio <= 1.2})
        if smart and rr:
            ratio = smart.model_loads / max(rr.model_loads, 1)
            verdicts.append({"goal": f"{n} workers, 70%: smart loads <= 1/3 of round-robin",
                             "value": f"{smart.model_loads} vs {rr.model_loads} ({ratio:.2f}x)",
                             "met": ratio <= 1 / 3})
            ratio = smart.latency_p99_s / rr.latency_p99_s
            verdicts.append({"goal": f"{n} workers, 70%: smart p99 <= 1/2 of round-robin",
                             "value": f"{smart.latency_p99_s:.1f} s vs {rr.latency_p99_s:.1f} s "
                                      f"({ratio:.2f}x)",
                             "met": ratio <= 0.5})
    smart_runs = [r for r in rows if r.policy == "smart"]
    if smart_runs:
        ooms = sum(r.out_of_memory for r in smart_runs)
        verdicts.append({"goal": "smart: no out-of-memory at any load",
                         "value": f"{ooms} events in {len(smart_runs)} runs", "met": ooms == 0})
    return verdicts


def format_table(rows: list[RunFigures]) -> str:
    head = (f"{'workers':>7} {'load':>5} {'policy':<13} {'done':>5} {'fail':>4} {'loads':>5} "
            f"{'mean s':>7} {'p50 s':>7} {'p99 s':>7} {'jobs/s':>6} {'OOM':>4} {'busy':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.n_workers:>7} {r.load:>5.0%} {r.policy:<13} {r.completed:>5} "
            f"{r.failed + r.unanswered:>4} {r.model_loads:>5} {r.latency_mean_s:>7.1f} "
            f"{r.latency_p50_s:>7.1f} {r.latency_p99_s:>7.1f} {r.throughput_jobs_per_s:>6.2f} "
            f"{r.out_of_memory:>4} {r.busy_share:>5.0%}")
    return "\n".join(lines)


def plot(rows: list[RunFigures], path: Path, floor_loads: int | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worker_counts = sorted({r.n_workers for r in rows})
    policies = [p for p in ("oracle",) + POLICIES if any(r.policy == p for r in rows)]
    fig, axes = plt.subplots(2, len(worker_counts), figsize=(6 * len(worker_counts), 8),
                             squeeze=False)
    for col, n in enumerate(worker_counts):
        for policy in policies:
            runs = sorted((r for r in rows if r.n_workers == n and r.policy == policy),
                          key=lambda r: r.load)
            loads = [r.load * 100 for r in runs]
            axes[0][col].plot(loads, [r.model_loads for r in runs], marker="o", label=policy)
            axes[1][col].plot(loads, [r.latency_p99_s for r in runs], marker="o", label=policy)
        if floor_loads is not None:
            axes[0][col].axhline(floor_loads, color="grey", linestyle="--",
                                 label="cold-start floor")
        axes[0][col].set_ylim(bottom=0)
        axes[0][col].set_title(f"{n} simulated workers: model loads")
        axes[1][col].set_title(f"{n} simulated workers: p99 latency (s, real-world)")
        axes[1][col].set_yscale("log")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("offered load (% of warm capacity)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="70%% load only and 150 jobs (about 1-2 minutes)")
    parser.add_argument("--jobs", type=int, default=None, help="jobs per run (default 300; quick 150)")
    parser.add_argument("--loads", default=None, help="comma list of loads (default 0.5,0.7,0.9)")
    parser.add_argument("--workers", default="4,8", help="comma list of worker counts (default 4,8)")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help=f"comma list of broker policies (default {','.join(POLICIES)})")
    parser.add_argument("--time-scale", type=float, default=20.0,
                        help="real-world seconds per wall-clock second (default 20)")
    parser.add_argument("--seed", type=int, default=8, help="workload seed (default 8)")
    parser.add_argument("--max-batch", type=int, default=W.CostModel.max_batch,
                        help="the sim workers' --max-batch: compatible jobs per batched call "
                             f"(1: no dynamic batching; default {W.CostModel.max_batch})")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR),
                        help="where routing.json and routing.png go (default bench/results)")
    parser.add_argument("--keep-logs", default=None, metavar="DIR",
                        help="keep every run's broker and worker logs under DIR")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw routing.png from the routing.json in --out-dir")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.replot:
        report = json.loads((Path(args.out_dir) / "routing.json").read_text())
        plot([RunFigures(**r) for r in report["rows"]], Path(args.out_dir) / "routing.png",
             report.get("cold_start_floor_loads"))
        print(f"redrew {Path(args.out_dir) / 'routing.png'}")
        return 0
    cost = W.CostModel(max_batch=args.max_batch)
    n_jobs = args.jobs or (150 if args.quick else 300)
    loads = [float(x) for x in (args.loads or ("0.7" if args.quick else "0.5,0.7,0.9")).split(",")]
    worker_counts = [int(x) for x in args.workers.split(",")]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    keep = Path(args.keep_logs) if args.keep_logs else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    print(f"time scale: 1 wall-clock second = {args.time_scale:g} real-world seconds "
          f"(4 s load -> {cost.load_time_s / args.time_scale * 1000:.0f} ms, 40 ms step at "
          f"1024x1024 -> {cost.step_time_1024_s / args.time_scale * 1000:.1f} ms, 1 s heartbeat "
          f"-> {REAL_HEARTBEAT_S / args.time_scale * 1000:.0f} ms); all figures below are "
          f"real-world seconds", flush=True)
    print(f"workload: seed {args.seed}, {n_jobs} jobs per run, {cost.steps} steps, "
          f"loads {loads}, workers {worker_counts}, policies {policies} + oracle", flush=True)
    print(f"dynamic batching: the sim workers run up to {cost.max_batch} compatible jobs per call, "
          f"each extra job costing {cost.batch_cost:g} of a lone job's steps (an assumption; the "
          f"oracle does not batch)", flush=True)
    rows: list[RunFigures] = []
    started = time.monotonic()
    for n in worker_counts:
        specs = W.worker_specs(n, cost)
        for load in loads:
            items = W.make_workload(W.WorkloadConfig(n_jobs=n_jobs, n_workers=n, load=load,
                                                     seed=args.seed, cost=cost))
            rows.append(oracle_figures(items, specs, load, cost))
            for policy in policies:
                figures = run_policy(policy, items, specs, load, cost, args.time_scale, keep)
                rows.append(figures)
                print(f"  {n} workers, {load:.0%}, {policy}: {figures.model_loads} loads, "
                      f"p99 {figures.latency_p99_s:.1f} s, {figures.wall_s:.0f} s wall", flush=True)
    floor = cold_start_floor(W.draw_jobs(n_jobs, args.seed))
    print()
    print(format_table(rows))
    print(f"\ncold-start floor (each distinct model loaded once): {floor} loads")
    verdicts = check_goals(rows)
    print("\ngoals (issue 8):")
    for v in verdicts:
        print(f"  [{'met' if v['met'] else 'MISSED'}] {v['goal']}: {v['value']}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python -m bench.routing" + (" --quick" if args.quick else ""),
        "time_scale": args.time_scale, "seed": args.seed, "jobs_per_run": n_jobs,
        "cost_model": asdict(cost), "cold_start_floor_loads": floor,
        "worker_budgets_mb": {n: [s.memory_mb for s in W.worker_specs(n, cost)] for n in worker_counts},
        "rows": [asdict(r) for r in rows], "goals": verdicts,
        "wall_s": round(time.monotonic() - started, 1),
    }
    (out_dir / "routing.json").write_text(json.dumps(report, indent=1, default=str))
    try:
        plot(rows, out_dir / "routing.png", floor)
        drawn = f" and {out_dir / 'routing.png'}"
    except ImportError:   # the plot is optional (the `bench` extra); the figures are printed above
        drawn = " (no plot: matplotlib is not installed; pip install -e '.[bench]', then --replot)"
    print(f"\nwrote {out_dir / 'routing.json'}{drawn} ({report['wall_s']:.0f} s wall)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
