"""What a real worker's work costs, measured in-process on the tiny kit (prints figures).

    .venv/bin/python bench/worker_costs.py [--models-dir DIR] [--size 512] [--steps 8] [--repeats 3]

Measured here: import of torch+diffusers, cold pipeline load, first job (includes the load),
the same job warm, and a cache hit vs a cache miss for `load_model`, plus the same job made by
plain diffusers in this process (the baseline the broker round trip will be compared with).
Not measured yet (printed as such): worker cold start (spawn to READY) and the broker + worker
round trip ratio; see the TODO section at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _median_s(samples: list[float]) -> str:
    if len(samples) == 1:
        return f"{samples[0]:.3f} s"
    return f"{statistics.median(samples):.3f} s (median of {len(samples)}, min {min(samples):.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", default=None, help="a built kit (default: build one in a temp dir)")
    parser.add_argument("--size", type=int, default=512, help="width and height (default 512)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="warm repetitions (default 3)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    import diffusers  # noqa: F401
    import torch
    import_s = time.perf_counter() - started

    from gpu_worker.executor import DiffusersExecutor
    from protocol.job import Job

    with tempfile.TemporaryDirectory(prefix="worker-costs-") as scratch:
        models_dir = args.models_dir
        if models_dir is None:
            from gpu_worker.demo_models import build_demo_models
            models_dir = os.path.join(scratch, "kit")
            build_demo_models(models_dir)
        executor = DiffusersExecutor("cpu", models_dir=models_dir, output_dir=os.path.join(scratch, "out"),
                                     input_dir=scratch, worker_id="bench")
        job = Job.model_validate(dict(request_id="bench", prompt="a photo of a cat", models={"base": "tiny-sdxl"},
                                      width=args.size, height=args.size, steps=args.steps, seed=1,
                                      scheduler="EulerDiscreteScheduler", precision={"dtype": "float32"}))

        def run_job() -> float:
            t0 = time.perf_counter()
            executor.run(job, lambda *a: None, lambda: False)
            return time.perf_counter() - t0

        cold_load = executor.load_model("tiny-sdxl")["load_time_s"]
        executor.cleanup()
        first_job_s = run_job()  # loads the model again (the cache was emptied)
        warm = [run_job() for _ in range(args.repeats)]
        hit = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            executor.load_model("tiny-sdxl")
            hit.append(time.perf_counter() - t0)
        miss = []
        for _ in range(args.repeats):
            executor.cleanup()
            t0 = time.perf_counter()
            executor.load_model("tiny-sdxl")
            miss.append(time.perf_counter() - t0)

        # the same job through plain diffusers, no executor: the in-process baseline
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(os.path.join(models_dir, "tiny-sdxl"),
                                                                   dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.enable_attention_slicing()
        pipe.vae.enable_slicing()
        plain = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pipe(prompt=job.prompt, width=args.size, height=args.size, num_inference_steps=args.steps,
                 generator=torch.Generator("cpu").manual_seed(1)).images[0].save(os.path.join(scratch, "plain.png"))
            plain.append(time.perf_counter() - t0)
        step_times = executor.telemetry()["step_time_s"]

    print(f"worker costs, in-process, CPU ({torch.get_num_threads()} threads), {args.size}x{args.size}, "
          f"{args.steps} steps, tiny kit")
    print(f"  import torch + diffusers      {import_s:.3f} s")
    print(f"  cold pipeline load            {cold_load:.3f} s")
    print(f"  first job (with model load)   {first_job_s:.3f} s")
    print(f"  same job, warm                {_median_s(warm)}")
    print(f"  load_model cache hit          {_median_s(hit)}")
    print(f"  load_model cache miss         {_median_s(miss)}")
    print(f"  plain diffusers, same job     {_median_s(plain)}")
    print(f"  executor / plain diffusers    {statistics.median(warm) / statistics.median(plain):.3f}x")
    print(f"  step time (moving average)    {step_times}")
    # TODO(broker round trip): spawn `sdxl-broker serve` with one CPU worker, time spawn -> READY,
    # then the same job through a DEALER client vs in-process (goal: within 1.05x at 512x512, 8 steps).
    print("  worker cold start (spawn to READY)        not measured yet")
    print("  broker + worker round trip / in-process   not measured yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
