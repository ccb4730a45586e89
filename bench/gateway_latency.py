"""The gateway's added latency: the same generation sent (a) with the Python ZeroMQ client
(`clients.client.BrokerClient`) straight to the broker and (b) as JSON to the gateway's
`POST /v1/generate`, at 1 and 16 requests in flight, against one `sdxl-broker serve --http`
with SIMULATED workers (`--sim-workers 4 --sim-step-s 0 --sim-load-s 0`, steps=1), so the
figures are transport and gateway cost, not denoising. Both paths ask for progress
(`stream: true`), as the gateway's own client does. Prints p50/p99 per path and the
difference; asserts nothing.

    .venv/bin/python bench/gateway_latency.py [--requests 200] [--workers 4]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body() -> dict:
    return {"message_type": "generate_sdxl_enhanced", "request_id": uuid.uuid4().hex,
            "prompt": "bench", "model_base": "tiny-sdxl", "width": 256, "height": 256,
            "steps": 1, "stream": True}


def start_serve(tmp: str, workers: int) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "serve", "--sim-workers", str(workers),
         "--sim-step-s", "0", "--sim-load-s", "0", "--frontend", f"ipc://{tmp}/fe",
         "--backend", f"ipc://{tmp}/be", "--output-dir", tmp, "--http", f"127.0.0.1:{port}",
         "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True)
    for line in proc.stdout:
        if line.startswith("ready "):
            return proc, line.split()[1], f"http://127.0.0.1:{port}"
    raise SystemExit("serve did not start")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(send, concurrency: int, count: int) -> list[float]:
    def one(_):
        started = time.perf_counter()
        send()
        return (time.perf_counter() - started) * 1000
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency * 2)))  # warm up: sockets, connections, caches
        return list(pool.map(one, range(count)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per path and level")
    parser.add_argument("--workers", type=int, default=4, help="simulated workers")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from clients.client import BrokerClient

    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
        proc, endpoint, url = start_serve(tmp, args.workers)
        client = BrokerClient(endpoint, timeout_s=30)
        sessions: dict[int, requests.Session] = {}

        def via_zmq():
            reply = client.request(body())
            assert reply["success"], reply

        def via_http():
            import threading
            session = sessions.setdefault(threading.get_ident(), requests.Session())
            reply = session.post(url + "/v1/generate", json=body(), timeout=30)
            assert reply.status_code == 200, reply.text

        try:
            print(f"gateway latency: {args.requests} requests per row, {args.workers} simulated "
                  f"workers, steps=1, sim step 0 s, on {os.cpu_count()} cores")
            print(f"{'in flight':>9} {'path':<16} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7}")
            for concurrency in (1, 16):
                rows = {}
                for name, send in (("zeromq client", via_zmq), ("gateway http", via_http)):
                    started = time.perf_counter()
                    latencies = run(send, concurrency, args.requests)
                    rate = len(latencies) / (time.perf_counter() - started)
                    rows[name] = latencies
                    print(f"{concurrency:>9} {name:<16} {statistics.median(latencies):8.2f} "
                          f"{percentile(latencies, 0.99):8.2f} {rate:7.1f}")
                added50 = statistics.median(rows["gateway http"]) - statistics.median(rows["zeromq client"])
                added99 = percentile(rows["gateway http"], 0.99) - percentile(rows["zeromq client"], 0.99)
                print(f"{concurrency:>9} {'added by gateway':<16} {added50:8.2f} {added99:8.2f}")
        finally:
            client.close()
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
