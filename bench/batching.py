"""Dynamic batching on CPU (issue 17 item 3): 8 compatible jobs through `serve` with one real
CPU worker on the tiny kit, batched (`--max-batch 8`) vs one at a time (`--max-batch 1`), plus
plain diffusers in this process (8 prompts in one call vs 8 calls) for reference. Prints
figures, asserts nothing.

    .venv/bin/python bench/batching.py [--models-dir DIR] [--jobs 8] [--runs 3] [--size 256]
                                       [--steps 4]

The jobs differ in prompt and seed only (same model, size, steps, scheduler, guidance), so they
can share one call. Through serve, one client DEALER sends all of them at once (a burst, as a
client submitting a batch would) and the time runs from the first send to the last final reply;
the replies' `processing_metrics.batch` say how the worker grouped them into calls (the first
job may start alone: an idle worker never waits for companions with the default
--batch-window-ms 0). Both serve setups are started and warm first; the runs then go round
robin, so a neighbour's load hits them alike, and each run prints the CPU other processes used
meanwhile (in cores): this machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# as serve runs its workers: idle OpenMP threads sleep (the in-process rows are otherwise
# 10x noisier on a shared host)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.cpu_workers import (MODEL, SCHEDULER, OtherLoad, Serve,  # noqa: E402
                               host_cores, tiny_kit)

JOB_TIMEOUT_S = 600.0
GUIDANCE = 5.0


def prompt_of(index: int) -> str:
    return f"a photo of animal number {index}"


# --- in-process reference -----------------------------------------------------------------------
class InProcess:
    """Plain diffusers: the n prompts as n calls, or as one call with a generator per image."""

    def __init__(self, models_dir: str, args):
        import diffusers
        import torch

        self.torch, self.args = torch, args
        self.pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
            os.path.join(models_dir, MODEL), dtype=torch.float32, local_files_only=True)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        self.one_by_one(2)   # warm

    def _call(self, indexes: list[int]):
        a = self.args
        return self.pipe(prompt=[prompt_of(i) for i in indexes], width=a.size, height=a.size,
                         num_inference_steps=a.steps, guidance_scale=GUIDANCE,
                         generator=[self.torch.Generator("cpu").manual_seed(i) for i in indexes]).images

    def one_by_one(self, n: int) -> None:
        for i in range(n):
            self._call([i])

    def batched(self, n: int) -> None:
        self._call(list(range(n)))


# --- through serve -----------------------------------------------------------------------------------
def send_bodies(frontend: str, bodies: list[dict], timeout_s: float = JOB_TIMEOUT_S) -> list[dict]:
    """Every body from one DEALER at once (a burst); every final reply, in the bodies' order
    (raises on a failure)."""
    import msgpack
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(frontend)
    try:
        for body in bodies:
            sock.send_multipart([b"", msgpack.packb(body)])
        replies: dict[str, dict] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < len(bodies):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no reply within {timeout_s:.0f} s")
            if sock.poll(1000):
                reply = msgpack.unpackb(sock.recv_multipart()[-1])
                if reply.get("final"):
                    if not reply.get("success"):
                        raise RuntimeError(f"job {reply['request_id']} failed: {reply.get('error')}")
                    replies[reply["request_id"]] = reply
        return [replies[body["request_id"]] for body in bodies]
    finally:
        sock.close(0)


def send_burst(frontend: str, args, run: str) -> list[dict]:
    """The compatible jobs (prompt and seed of their own) as one burst."""
    from clients.client import generation_body

    return send_bodies(frontend, [
        generation_body(request_id=f"{run}-{i}-{uuid.uuid4().hex[:6]}", prompt=prompt_of(i),
                        model_base=MODEL, width=args.size, height=args.size, steps=args.steps,
                        seed=i, scheduler=SCHEDULER, guidance_scale=GUIDANCE)
        for i in range(args.jobs)])


def calls_of(replies: list[dict]) -> str:
    """How the worker grouped the jobs: '1+7' (two calls), '1+1+...' (one job per call)."""
    groups: dict[tuple, int] = {}
    for reply in replies:
        batch = reply["data"]["processing_metrics"].get("batch")
        key = tuple(sorted(batch["request_ids"])) if batch else (reply["request_id"],)
        groups[key] = len(key)
    return "+".join(str(n) for n in sorted(groups.values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", default=None, help="the tiny kit (default: built in a temp dir)")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="batching-bench-") as tmp:
        models_dir = tiny_kit(tmp, args.models_dir)
        cores = host_cores()
        print(f"{args.jobs} compatible jobs (own prompt and seed each), {args.size}x{args.size}, "
              f"{args.steps} steps, float32, {MODEL}, {args.runs} runs each; this machine: {cores} "
              f"cores, load average {os.getloadavg()[0]:.2f} at start")
        in_process = InProcess(models_dir, args)
        serves = {}
        rows = {name: ([], [], []) for name in ("in-process, one call per prompt",
                                                "in-process, one call of all prompts",
                                                "serve --max-batch 1 (one at a time)",
                                                f"serve --max-batch {args.jobs} (batched)")}
        names = list(rows)
        try:
            for max_batch in (1, args.jobs):
                serve = Serve(1, models_dir, os.path.join(tmp, f"serve-{max_batch}"),
                              extra_argv=["--max-batch", str(max_batch)])
                serves[max_batch] = serve
                send_burst(serve.frontend, args, "warm")
            for run in range(args.runs):
                for name, action in ((names[0], lambda: in_process.one_by_one(args.jobs)),
                                     (names[1], lambda: in_process.batched(args.jobs))):
                    with OtherLoad([os.getpid()]) as load:
                        action()
                    rows[name][0].append(load.wall_s)
                    rows[name][1].append(load.other_cores)
                for max_batch, name in ((1, names[2]), (args.jobs, names[3])):
                    serve = serves[max_batch]
                    with OtherLoad([serve.proc.pid, os.getpid()]) as load:
                        replies = send_burst(serve.frontend, args, f"run{run}")
                    rows[name][0].append(load.wall_s)
                    rows[name][1].append(load.other_cores)
                    rows[name][2].append(calls_of(replies))
        finally:
            for serve in serves.values():
                serve.stop()
    print(f"\n| setup | wall time for {args.jobs} jobs ({args.runs} runs) | median | calls per run | "
          f"other processes' CPU per run (cores) |")
    print("| --- | --- | --- | --- | --- |")
    medians = {}
    for name, (walls, others, calls) in rows.items():
        medians[name] = statistics.median(walls)
        print(f"| {name} | {', '.join(f'{w:.2f}' for w in walls)} s | {medians[name]:.2f} s | "
              f"{', '.join(calls) or '-'} | {', '.join(f'{o:.2f}' for o in others)} |")
    print(f"\nbatching gain through serve: {medians[names[2]] / medians[names[3]]:.2f}x "
          f"(one at a time / batched, medians)")
    print(f"batching gain in plain diffusers: {medians[names[0]] / medians[names[1]]:.2f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
