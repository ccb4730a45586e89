"""Heartbeat scale: broker CPU and the added p99 latency of a request while 100, 500 and 1,000
workers heart-beat at 1 Hz.

A thousand Python worker processes do not fit on a small machine, so the heart-beating workers
are a SWARM: one process holding N DEALER sockets that speak the real worker protocol (READY,
then a HEARTBEAT with realistic telemetry every second per socket, reading the broker's
heartbeats). They advertise no capabilities, so routing filters them (the cost of looking at
them is part of what is measured) and every probe request runs on the one real
`sdxl-broker worker --sim` (zero work). The broker is a `sdxl-broker broker` subprocess; its CPU
is read with psutil over the measuring window. Prints figures; asserts nothing.

    .venv/bin/python bench/heartbeat_scale.py [--counts 100,500,1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from broker_overhead import SDXL_BROKER, endpoint_pair, measure, wait_registered  # noqa: E402

from protocol import worker_protocol as W  # noqa: E402


def swarm(backend: str, count: int, ready_flag) -> None:
    """N protocol-level simulated workers in one process (a SIMULATION, not executors)."""
    ctx = zmq.Context()
    socks = []
    telemetry = W.Telemetry.from_dict({
        "memory": {"total_mb": 24000.0, "used_mb": 2100.0, "free_mb": 21900.0},
        "rss_mb": 310.0, "cache_budget_mb": 12000.0,
        "models_loaded": [{"name": "tiny-sdxl", "kind": "base", "size_mb": 10.2}],
        "models_loading": [], "step_time_s": {"tiny-sdxl@256x256": 0.08},
        "load_time_s": {"tiny-sdxl": 2.9}, "simulated": True,
    })
    for i in range(count):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(backend)
        s.send(W.encode(W.Ready(worker_id=f"swarm-{i}", host="swarm", pid=os.getpid(),
                                device="cpu", device_type="cpu", device_name="swarm (simulated)",
                                memory_total_mb=24000.0, capabilities=[], worker_types=["swarm"],
                                simulated=True, telemetry=telemetry)))
        socks.append(s)
    ready_flag.set()
    beat = W.encode(W.WorkerHeartbeat(telemetry=telemetry))
    period_s = 1.0 / count   # spread the N heartbeats over each second, as real workers would be
    next_at = time.monotonic()
    i = 0
    while True:
        now = time.monotonic()
        while now >= next_at:
            socks[i % count].send(beat)
            # read what the broker sent this socket (its heartbeats) so nothing piles up
            try:
                while True:
                    socks[i % count].recv(zmq.NOBLOCK)
            except zmq.Again:
                pass
            i += 1
            next_at += period_s
        time.sleep(max(next_at - time.monotonic(), 0.0005))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="100,500,1000", help="swarm sizes to measure")
    ap.add_argument("--seconds", type=float, default=10.0, help="measuring window per size")
    args = ap.parse_args()
    counts = [0] + [int(c) for c in args.counts.split(",")]
    tmp = tempfile.mkdtemp(prefix="hbscale")
    rows = []
    for count in counts:
        fe, be = endpoint_pair(tmp)
        log = open(os.path.join(tmp, f"{count}.log"), "wb")
        broker = subprocess.Popen([SDXL_BROKER, "broker", "--frontend", fe, "--backend", be,
                                   "--log-level", "WARNING"], stdout=subprocess.PIPE, stderr=log)
        worker = subprocess.Popen([SDXL_BROKER, "worker", "--connect", be, "--sim", "--worker-id",
                                   "probe-worker", "--sim-step-s", "0", "--sim-load-s", "0",
                                   "--log-level", "WARNING"], stdout=log, stderr=log)
        flag = mp.Event()
        swarm_proc = mp.Process(target=swarm, args=(be, count, flag), daemon=True) if count else None
        try:
            assert broker.stdout.readline().startswith(b"ready")
            if swarm_proc:
                swarm_proc.start()
                flag.wait(60)
            wait_registered(fe, count + 1)
            measure(fe, 1, 1.0, True, f"warm{count}")
            proc = psutil.Process(broker.pid)
            cpu_before, t_before = proc.cpu_times(), time.monotonic()
            idle_cpu_window_s = min(args.seconds / 2, 5.0)
            time.sleep(idle_cpu_window_s)   # heartbeats only: the cost of the swarm itself
            cpu_mid, t_mid = proc.cpu_times(), time.monotonic()
            result = measure(fe, 1, args.seconds, True, f"hb{count}")
            idle_pct = 100 * ((cpu_mid.user + cpu_mid.system) - (cpu_before.user + cpu_before.system)) \
                / (t_mid - t_before)
            rows.append((count, idle_pct, result))
        finally:
            if swarm_proc:
                swarm_proc.terminate()
                swarm_proc.join()
            for p in (worker, broker):
                p.kill()
                p.wait()
    base = rows[0][2]
    print(f"\n{'workers':>8}{'broker CPU % (heartbeats only)':>32}{'probe p50 us':>14}"
          f"{'probe p99 us':>14}{'added p99 us':>14}")
    for count, cpu_pct, r in rows:
        print(f"{count:>8}{cpu_pct:>32.1f}{r['p50_us']:>14.0f}{r['p99_us']:>14.0f}"
              f"{r['p99_us'] - base['p99_us']:>14.0f}")
    print("goal: 1,000 workers under 10% of one core and under 2,000 us added p99")
    return 0


if __name__ == "__main__":
    sys.exit(main())
