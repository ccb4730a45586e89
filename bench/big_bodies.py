"""Big bodies vs everyone else (issue 16 item 1): another client's round-trip latency with and
without one client sending legal 62 MB bodies (31 M zeros in JSON, 62 M in msgpack).

For each --decode-processes value (default: 0, the decode on the loop as before the decode
stage, and 1): an `sdxl-broker broker` subprocess (--state-dir journal unless --memory-journal)
with one SIMULATED worker (`worker --sim`, 1-step jobs of --step-s); a victim client runs one
job after another, first alone for --seconds (baseline), then while an attacker process sends
--bodies big bodies at once (alternating JSON and msgpack) until all are answered. Prints the
victim's p50/p99/max, its failed jobs, and the worker losses the broker logged; asserts nothing.

    .venv/bin/python bench/big_bodies.py [--seconds 10] [--bodies 4] [--decode-processes 0 1]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import orjson
import zmq

SDXL_BROKER = str(Path(sys.executable).with_name("sdxl-broker"))
_FIELDS = {"message_type": "generate_sdxl_enhanced", "prompt": "a red cube",
           "model_base": "tiny-sdxl", "width": 256, "height": 256, "steps": 1}


def big_json_body(request_id: str, zeros: int = 31_000_000) -> bytes:
    head = orjson.dumps({**_FIELDS, "request_id": request_id})[:-1]
    return head + b',"padding":[' + b"0," * (zeros - 1) + b"0]}"


def big_msgpack_body(request_id: str, zeros: int = 62_000_000) -> bytes:
    fields = {**_FIELDS, "request_id": request_id}
    head = bytes([0x80 | (len(fields) + 1)]) + b"".join(
        msgpack.packb(k) + msgpack.packb(v) for k, v in fields.items())
    return head + msgpack.packb("padding") + b"\xdd" + struct.pack(">I", zeros) + b"\x00" * zeros


def attacker(endpoint: str, count: int, codecs: str, done, outcomes) -> None:
    """Send `count` big bodies at once; set `done` when every one has its final reply (their
    outcomes, "ok" or the error code, go on the `outcomes` queue)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    for i in range(count):
        use_json = codecs == "json" or (codecs == "both" and i % 2 == 0)
        body = big_json_body(f"big-{i}") if use_json else big_msgpack_body(f"big-{i}")
        sock.send_multipart([b"", body])
        del body
    finals = []
    while len(finals) < count:
        if not sock.poll(600_000):
            break
        frame = sock.recv_multipart()[-1]
        reply = orjson.loads(frame) if frame[:1] == b"{" else msgpack.unpackb(frame, raw=False)
        if reply.get("final"):
            finals.append("ok" if reply.get("success") else reply.get("error_code"))
    outcomes.put(finals)
    done.set()
    sock.close()
    ctx.term()


def victim(sock: zmq.Socket, tag: str, until) -> tuple[list[float], int]:
    """One 1-step job after another until until() is true: (round-trip seconds, failures)."""
    rtts, failed, n = [], 0, 0
    while not until():
        n += 1
        body = orjson.dumps({**_FIELDS, "request_id": f"{tag}-{n}"})
        start = time.perf_counter()
        sock.send_multipart([b"", body])
        while True:
            if not sock.poll(120_000):
                raise RuntimeError("victim: no reply within 120 s")
            reply = orjson.loads(sock.recv_multipart()[-1])
            if reply.get("final"):
                break
        rtts.append(time.perf_counter() - start)
        failed += not reply.get("success")
    return rtts, failed


def wait_registered(sock: zmq.Socket, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.send_multipart([b"", b'{"message_type":"status_request"}'])
        if sock.poll(5000):
            status = orjson.loads(sock.recv_multipart()[-1])
            if any(w["state"] != "lost" for w in status["data"]["workers"]):
                return
        time.sleep(0.2)
    raise RuntimeError("the worker did not register")


def stats(rtts: list[float]) -> dict:
    rtts = sorted(rtts)
    return {"n": len(rtts), "p50_ms": statistics.median(rtts) * 1e3,
            "p99_ms": rtts[max(int(len(rtts) * 0.99) - 1, 0)] * 1e3, "max_ms": rtts[-1] * 1e3}


def run(decode_processes: int, args, tmp: str) -> dict:
    fe, be = f"ipc://{tmp}/fe{decode_processes}", f"ipc://{tmp}/be{decode_processes}"
    log_path = os.path.join(tmp, f"broker-{decode_processes}.log")
    log = open(log_path, "wb")
    argv = [SDXL_BROKER, "broker", "--frontend", fe, "--backend", be,
            "--decode-processes", str(decode_processes),
            "--heartbeat-interval-s", str(args.heartbeat_s)]
    if not args.memory_journal:
        argv += ["--state-dir", os.path.join(tmp, f"state{decode_processes}")]
    broker = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log)
    worker = None
    try:
        assert broker.stdout.readline().startswith(b"ready"), "broker did not start"
        worker = subprocess.Popen(
            [SDXL_BROKER, "worker", "--connect", be, "--sim", "--worker-id", "sim-0",
             "--sim-step-s", str(args.step_s), "--sim-load-s", "0",
             "--heartbeat-interval-s", str(args.heartbeat_s)], stdout=log, stderr=log)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(fe)
        wait_registered(sock)
        warm_end = time.monotonic() + 1.0
        victim(sock, "warm", lambda: time.monotonic() > warm_end)
        end = time.monotonic() + args.seconds
        baseline, base_failed = victim(sock, "base", lambda: time.monotonic() > end)
        done, outcomes = mp.Event(), mp.Queue()
        attack = mp.Process(target=attacker, args=(fe, args.bodies, args.codec, done, outcomes),
                            daemon=True)
        started = time.monotonic()
        attack.start()
        under, under_failed = victim(sock, "attack", done.is_set)
        attack_s = time.monotonic() - started
        big = outcomes.get(timeout=10)
        attack.join(10)
        sock.close()
        ctx.term()
    finally:
        for proc in (worker, broker):
            if proc is not None:
                proc.kill()
                proc.wait()
        log.close()
    text = Path(log_path).read_text(errors="replace")
    return {"baseline": stats(baseline), "attack": stats(under), "attack_s": attack_s,
            "big": {o: big.count(o) for o in sorted(set(big))},
            "failed": base_failed + under_failed,
            "workers_lost": text.count("no heartbeat"),
            "reconnects": text.count("reconnecting"), "requeued": text.count("re-queued"),
            "slow_turns": [line.split("slow loop turn: ", 1)[1] for line in text.splitlines()
                           if "slow loop turn" in line]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="baseline seconds")
    ap.add_argument("--bodies", type=int, default=4, help="big bodies sent at once")
    ap.add_argument("--decode-processes", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--step-s", type=float, default=0.02, help="the SIMULATED step time")
    ap.add_argument("--heartbeat-s", type=float, default=1.0)
    ap.add_argument("--memory-journal", action="store_true", help="no --state-dir")
    ap.add_argument("--codec", choices=("both", "json", "msgpack"), default="both",
                    help="the big bodies' codec (both: alternating)")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bigb")
    results = {n: run(n, args, tmp) for n in args.decode_processes}
    journal = "memory" if args.memory_journal else "SQLite"
    codecs = "JSON/msgpack alternating" if args.codec == "both" else args.codec
    print(f"\nvictim: 1-step jobs one at a time; attacker: {args.bodies} x 62 MB bodies at once "
          f"({codecs}); {journal} journal; heartbeat {args.heartbeat_s:g} s")
    print(f"{'decode processes':<18}{'phase':<10}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          f"{'failed':>8}{'workers lost':>14}{'reconnects':>12}{'re-queued':>11}")
    for n, r in results.items():
        for phase in ("baseline", "attack"):
            s = r[phase]
            extra = (f"{r['failed']:>8}{r['workers_lost']:>14}{r['reconnects']:>12}{r['requeued']:>11}"
                     if phase == "attack" else "")
            print(f"{n:<18}{phase:<10}{s['n']:>6}{s['p50_ms']:>9.1f}{s['p99_ms']:>9.1f}"
                  f"{s['max_ms']:>9.1f}{extra}")
        print(f"{'':<18}(attack lasted {r['attack_s']:.1f} s until every big body was answered: "
              f"{r['big']}; {len(r['slow_turns'])} loop turns over 250 ms)")
        for line in r["slow_turns"][:5]:
            print(f"{'':<18}  slow turn: {line}")
    print(f"(load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
