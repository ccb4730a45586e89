"""Broker overhead: round-trip p50/p99 and requests/s, 1 KiB bodies, 1 and 64 requests in flight,
for (a) a DEALER client talking to an echo ROUTER directly, (b) a minimal load-balancing broker
(the zguide lbbroker pattern) with 4 echo workers, (c) this broker (`sdxl-broker broker`
subprocess, in-memory journal) with 4 SIMULATED zero-work workers (`worker --sim --sim-step-s 0
--sim-load-s 0`, steps=1). Endpoints are ipc:// in a temp dir. Prints figures; asserts nothing.

    .venv/bin/python bench/broker_overhead.py [--seconds 3] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

BODY_BYTES = 1024
SDXL_BROKER = str(Path(sys.executable).with_name("sdxl-broker"))


_pairs = 0


def endpoint_pair(tmp: str) -> tuple[str, str]:
    """Fresh frontend/backend endpoints. ipc:// in a temp dir: no port races with other
    processes on a busy machine (loopback tcp figures are close on Linux)."""
    global _pairs
    _pairs += 1
    return f"ipc://{tmp}/fe{_pairs}", f"ipc://{tmp}/be{_pairs}"


# --- (a) echo server ------------------------------------------------------------------------
def echo_server(endpoint: str) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    while True:
        router.send_multipart(router.recv_multipart())


# --- (b) zguide lbbroker -----------------------------------------------------------------------
def lb_worker(endpoint: str) -> None:
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.connect(endpoint)
    req.send(b"READY")
    while True:
        client, empty, body = req.recv_multipart()
        req.send_multipart([client, b"", body])


def lb_broker(frontend_ep: str, backend_ep: str) -> None:
    ctx = zmq.Context()
    frontend, backend = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    frontend.bind(frontend_ep)
    backend.bind(backend_ep)
    idle: list[bytes] = []
    poll_both, poll_backend = zmq.Poller(), zmq.Poller()
    poll_both.register(frontend, zmq.POLLIN)
    poll_both.register(backend, zmq.POLLIN)
    poll_backend.register(backend, zmq.POLLIN)
    while True:
        events = dict((poll_both if idle else poll_backend).poll())
        if backend in events:
            frames = backend.recv_multipart()
            idle.append(frames[0])
            if frames[2] != b"READY":
                frontend.send_multipart(frames[2:])   # [client, "", body]
        if frontend in events and idle:
            client, empty, body = frontend.recv_multipart()
            backend.send_multipart([idle.pop(0), b"", client, b"", body])


# --- the load generator --------------------------------------------------------------------------
def make_body(rid: str, flat: bool) -> bytes:
    if not flat:
        return rid.encode().ljust(BODY_BYTES, b".")
    body = {"message_type": "generate_sdxl_enhanced", "request_id": rid, "prompt": "",
            "model_base": "tiny-sdxl", "width": 256, "height": 256, "steps": 1}
    pad = BODY_BYTES - len(json.dumps(body))
    body["prompt"] = "x" * max(pad, 0)
    return json.dumps(body).encode()


def reply_id(frame: bytes, flat: bool) -> str:
    if not flat:
        return frame[:frame.index(b".")].decode() if b"." in frame else frame.decode()
    return json.loads(frame)["request_id"]


def cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    import psutil
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def measure(endpoint: str, inflight: int, seconds: float, flat: bool, tag: str,
            broker_pid: int | None = None) -> dict:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sent: dict[str, float] = {}
    rtts: list[float] = []
    counter = 0

    def send_one():
        nonlocal counter
        counter += 1
        rid = f"{tag}-{inflight}-{counter}"
        sent[rid] = time.perf_counter()
        sock.send_multipart([b"", make_body(rid, flat)])

    # warm up, then measure
    for phase, duration in (("warm", min(1.0, seconds / 3)), ("measure", seconds)):
        rtts.clear()
        for _ in range(inflight - len(sent)):
            send_one()
        start = time.perf_counter()
        cpu_start = cpu_s(broker_pid)
        done = 0
        while time.perf_counter() - start < duration:
            if not sock.poll(5000):
                raise RuntimeError(f"{tag}: no reply within 5 s")
            frames = sock.recv_multipart()
            now = time.perf_counter()
            rid = reply_id(frames[-1], flat)
            rtts.append(now - sent.pop(rid))
            done += 1
            send_one()
        elapsed = time.perf_counter() - start
        broker_cpu = cpu_s(broker_pid) - cpu_start
    # let the last in-flight requests finish so they do not leak into the next run
    while sent and sock.poll(5000):
        sent.pop(reply_id(sock.recv_multipart()[-1], flat), None)
    sock.close()
    ctx.term()
    rtts.sort()
    return {"n": done, "p50_us": statistics.median(rtts) * 1e6,
            "p99_us": rtts[int(len(rtts) * 0.99) - 1] * 1e6, "max_us": rtts[-1] * 1e6,
            "rps": done / elapsed,
            "broker_cpu_us": broker_cpu / done * 1e6 if broker_pid else float("nan")}


def wait_registered(frontend: str, count: int, timeout_s: float = 60.0) -> None:
    """Ask the broker for status until `count` workers are registered."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(frontend)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            sock.send_multipart([b"", json.dumps({"message_type": "status_request"}).encode()])
            if sock.poll(2000):
                status = json.loads(sock.recv_multipart()[-1])
                live = [w for w in status["data"]["workers"] if w["state"] != "lost"]
                if len(live) >= count:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{count} workers did not register in {timeout_s} s")
    finally:
        sock.close()
        ctx.term()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds per configuration")
    ap.add_argument("--workers", type=int, default=4, help="workers behind (b) and (c)")
    args = ap.parse_args()
    procs: list = []
    results: dict[tuple[str, int], dict] = {}
    tmp = tempfile.mkdtemp(prefix="bench")
    try:
        # (a)
        ep = endpoint_pair(tmp)[0]
        procs.append(mp.Process(target=echo_server, args=(ep,), daemon=True))
        procs[-1].start()
        for n in (1, 64):
            results[("a direct echo", n)] = measure(ep, n, args.seconds, False, "a")
        for p in procs:
            p.terminate()
        procs.clear()
        # (b)
        fe, be = endpoint_pair(tmp)
        procs.append(mp.Process(target=lb_broker, args=(fe, be), daemon=True))
        procs += [mp.Process(target=lb_worker, args=(be,), daemon=True) for _ in range(args.workers)]
        for p in procs:
            p.start()
        time.sleep(0.5)
        for n in (1, 64):
            results[("b zguide lbbroker", n)] = measure(fe, n, args.seconds, False, "b", procs[0].pid)
        for p in procs:
            p.terminate()
        procs.clear()
        # (c)
        fe, be = endpoint_pair(tmp)
        log = open(os.path.join(tmp, "c.log"), "wb")
        broker = subprocess.Popen([SDXL_BROKER, "broker", "--frontend", fe, "--backend", be,
                                   "--log-level", "WARNING", "--max-queue", "10000"],
                                  stdout=subprocess.PIPE, stderr=log)
        procs.append(broker)
        assert broker.stdout.readline().startswith(b"ready"), "broker did not start"
        for i in range(args.workers):
            procs.append(subprocess.Popen(
                [SDXL_BROKER, "worker", "--connect", be, "--sim", "--worker-id", f"sim-{i}",
                 "--sim-step-s", "0", "--sim-load-s", "0", "--log-level", "WARNING"],
                stdout=log, stderr=log))
        wait_registered(fe, args.workers)
        for n in (1, 64):
            results[("c sdxl-broker + sim", n)] = measure(fe, n, args.seconds, True, "c", broker.pid)
    finally:
        for p in procs:
            (p.terminate() if isinstance(p, mp.Process) else p.kill())
        for p in procs:
            (p.join() if isinstance(p, mp.Process) else p.wait())

    print(f"\n{'configuration':<24}{'inflight':>9}{'p50 us':>10}{'p99 us':>10}{'max us':>10}"
          f"{'req/s':>10}{'n':>8}{'broker CPU us/req':>19}")
    for (name, n), r in results.items():
        print(f"{name:<24}{n:>9}{r['p50_us']:>10.0f}{r['p99_us']:>10.0f}{r['max_us']:>10.0f}"
              f"{r['rps']:>10.0f}{r['n']:>8}{r['broker_cpu_us']:>19.0f}")
    print(f"(load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    for n in (1, 64):
        b, c = results[("b zguide lbbroker", n)], results[("c sdxl-broker + sim", n)]
        print(f"inflight {n}: broker p50 / lbbroker p50 = {c['p50_us'] / b['p50_us']:.2f}x (goal <= 1.5x); "
              f"throughput = {100 * c['rps'] / b['rps']:.0f}% of lbbroker (goal >= 70%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
