"""What a worker that heart-beats but never finishes costs clients, with and without the
stuck-job watchdog (issue 16 item 7).

A real `sdxl-broker broker`, one healthy SIMULATED worker and one SIMULATED worker started with
`--sim-stall-after-jobs 0` (it takes jobs and stalls in them forever while heart-beating). N
clients each send one job at once with `timeout` T seconds. One row per `--stuck-job-s` value:
replies by outcome, which worker answered the successes, the slowest reply, the watchdog's
firings. 0 is the watchdog off (the behaviour before). Prints; asserts nothing.

    .venv/bin/python bench/stuck_worker.py [--jobs 6] [--timeout-s 30] [--stuck-job-s 0 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients.client import BrokerClient  # noqa: E402

SDXL_BROKER = [sys.executable, "-m", "broker.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(jobs: int, timeout_s: float, stuck_job_s: float, routing: str) -> dict:
    backend = f"tcp://127.0.0.1:{free_port()}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": ROOT,
             "env": {**os.environ, "HF_HUB_OFFLINE": "1"}}
    broker = subprocess.Popen(SDXL_BROKER + [
        "broker", "--frontend", "tcp://127.0.0.1:*", "--backend", backend, "--routing", routing,
        "--stuck-job-s", str(stuck_job_s), "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    workers = []
    try:
        frontend = next(line.split()[1] for line in broker.stdout if line.startswith("ready "))
        for worker_id, extra in (("healthy", []), ("stalled", ["--sim-stall-after-jobs", "0"])):
            workers.append(subprocess.Popen(SDXL_BROKER + [
                "worker", "--connect", backend, "--sim", "--worker-id", worker_id,
                "--sim-step-s", "0.05", *extra], **quiet))
        with BrokerClient(frontend, timeout_s=10.0) as client:
            while len(client.status()["workers"]) < 2:
                time.sleep(0.1)
        replies: dict[str, tuple[dict, float]] = {}

        def one(rid: str) -> None:
            started = time.monotonic()
            with BrokerClient(frontend, timeout_s=timeout_s + 30) as own:
                reply = own.generate(prompt="a fox", model_base="tiny-sdxl", steps=10,
                                     width=256, height=256, timeout=timeout_s, request_id=rid,
                                     raise_on_error=False).reply
            replies[rid] = (reply, time.monotonic() - started)

        threads = [threading.Thread(target=one, args=(f"j{i}",)) for i in range(jobs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with BrokerClient(frontend, timeout_s=10.0) as client:
            stalls = {w["worker_id"]: w.get("stalls", 0) for w in client.status()["workers"]}
        outcomes = Counter("ok" if r["success"] else r["error_code"] for r, _ in replies.values())
        answered_by = Counter(r["data"]["processing_metrics"]["worker_id"]
                              for r, _ in replies.values() if r["success"])
        return {"stuck_job_s": stuck_job_s, "outcomes": dict(outcomes),
                "answered_by": dict(answered_by),
                "slowest_s": round(max(s for _, s in replies.values()), 1),
                "watchdog_firings": stalls.get("stalled", 0)}
    finally:
        for proc in [*workers, broker]:
            proc.terminate()
        for proc in [*workers, broker]:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--timeout-s", type=float, default=30.0, help="each job's timeout")
    parser.add_argument("--stuck-job-s", type=float, nargs="+", default=[0.0, 5.0])
    parser.add_argument("--routing", default="smart")
    args = parser.parse_args()
    print(f"{args.jobs} jobs at once, timeout {args.timeout_s:g} s, routing {args.routing}; "
          f"workers: 1 healthy, 1 stalling forever (SIMULATED)")
    for stuck_job_s in args.stuck_job_s:
        row = run(args.jobs, args.timeout_s, stuck_job_s, args.routing)
        label = "off" if stuck_job_s == 0 else f"{stuck_job_s:g} s"
        print(f"--stuck-job-s {label:>5}: replies {row['outcomes']}, successes by "
              f"{row['answered_by']}, slowest {row['slowest_s']} s, watchdog firings "
              f"{row['watchdog_firings']}")


if __name__ == "__main__":
    main()
