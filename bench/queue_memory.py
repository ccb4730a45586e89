"""What queued big jobs cost the broker: RSS and journal bytes with N queued requests of one
M MB image each (msgpack binary `init_image`), for the in-memory and the SQLite journal.

A real `sdxl-broker broker` subprocess with no worker (and --no-worker-grace-s 3600), so every
job stays queued; the jobs are acknowledged by their `queued` progress event before RSS is read.
Prints one row per journal; asserts nothing.

    .venv/bin/python bench/queue_memory.py [--jobs 12] [--image-mb 60]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import psutil
import zmq

SDXL_BROKER = str(Path(sys.executable).with_name("sdxl-broker"))


def start_broker(state_dir: str | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    argv = [SDXL_BROKER, "broker", "--frontend", "tcp://127.0.0.1:*", "--backend",
            "tcp://127.0.0.1:*", "--no-worker-grace-s", "3600", "--log-level", "WARNING", *extra]
    if state_dir:
        argv += ["--state-dir", state_dir]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("ready "):
            return proc, line.split()[1]
    raise RuntimeError("broker did not start")


def body(request_id: str, image: bytes) -> bytes:
    return msgpack.packb({"message_type": "generate_sdxl_enhanced", "request_id": request_id,
                          "prompt": "memory", "model_base": "tiny-sdxl", "width": 256,
                          "height": 256, "steps": 2, "init_image": image, "stream": True},
                         use_bin_type=True)


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def dir_mb(path: str | None) -> float:
    if not path:
        return 0.0
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def measure(jobs: int, image_mb: int, state_dir: str | None, extra: list[str]) -> dict:
    proc, endpoint = start_broker(state_dir, extra)
    ctx = zmq.Context()
    try:
        time.sleep(0.5)
        before = rss_mb(proc.pid)
        image = os.urandom(image_mb * 2**20)
        answers = {}
        for index in range(jobs):
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(endpoint)
            dealer.send(body(f"mem-{index}", image))
            if not dealer.poll(120_000):
                raise RuntimeError(f"job {index}: no answer")
            reply = msgpack.unpackb(dealer.recv(), raw=False)
            answers[reply.get("stage") or reply.get("error_code")] = \
                answers.get(reply.get("stage") or reply.get("error_code"), 0) + 1
            dealer.close()
        time.sleep(1.0)
        return {"before_mb": before, "after_mb": rss_mb(proc.pid), "journal_mb": dir_mb(state_dir),
                "answers": answers}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        ctx.destroy(linger=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--image-mb", type=int, default=60)
    parser.add_argument("broker_args", nargs="*", help="more `broker` flags (after --)")
    args = parser.parse_args()
    print(f"{args.jobs} queued jobs of one {args.image_mb} MB msgpack image each")
    print(f"{'journal':<8} {'RSS before MB':>14} {'RSS after MB':>13} {'per job MB':>11} "
          f"{'journal MB':>11}  answers")
    for name in ("memory", "sqlite"):
        with tempfile.TemporaryDirectory() as tmp:
            row = measure(args.jobs, args.image_mb, tmp if name == "sqlite" else None,
                          args.broker_args)
        per_job = (row["after_mb"] - row["before_mb"]) / args.jobs
        print(f"{name:<8} {row['before_mb']:>14.0f} {row['after_mb']:>13.0f} {per_job:>11.1f} "
              f"{row['journal_mb']:>11.0f}  {row['answers']}")


if __name__ == "__main__":
    main()
