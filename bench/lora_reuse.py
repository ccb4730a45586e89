"""What each job pays around its pipeline call when LoRA sets change (prints figures).

    python bench/lora_reuse.py [--models-dir DIR] [--passes 4] [--steps 2]

A DiffusersExecutor in this process on the tiny kit (built into a temp dir unless --models-dir
names one) runs the same sequence of txt2img jobs --passes times:

    no LoRA, A, A again, A at another weight, B, A+B, no LoRA, A

and prints, per position, the median over the passes after the first (the first pass reads the
LoRA files and warms up) of:
  - before: the executor's preprocessing_time (models from the cache, LoRAs attached, scheduler
    swapped, memory switches): what the job pays before its first denoising step
  - after: total_time minus pre-processing, inference and post-processing: what the job pays
    after its images are saved (taking adapters off again), before its reply can leave
The sum is the per-job cost of LoRA handling. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

A, B = "tiny-lora-a", "tiny-lora-b"
SEQUENCE = (
    ("no LoRA", []),
    ("A (set changed)", [(A, 0.8)]),
    ("A again (same set)", [(A, 0.8)]),
    ("A at another weight", [(A, 0.5)]),
    ("B (different set)", [(B, 0.8)]),
    ("A+B (different set)", [(A, 0.8), (B, 0.8)]),
    ("no LoRA after LoRA", []),
    ("A after a job without LoRA", [(A, 0.8)]),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", default=None, help="the tiny kit (default: built into a temp dir)")
    parser.add_argument("--passes", type=int, default=4, help="runs of the whole sequence (default 4)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per job (default 2)")
    args = parser.parse_args(argv)

    from diffusers.utils import logging as diffusers_logging

    from gpu_worker.demo_models import build_demo_models
    from gpu_worker.executor import DiffusersExecutor
    from protocol.job import Job

    diffusers_logging.set_verbosity_error()
    scratch = tempfile.mkdtemp(prefix="lora-reuse-")
    models_dir = args.models_dir or os.path.join(scratch, "models")
    if not args.models_dir:
        build_demo_models(models_dir)
    executor = DiffusersExecutor("cpu", models_dir=models_dir, output_dir=os.path.join(scratch, "out"),
                                 input_dir=scratch, worker_id="lora-reuse-bench")
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in SEQUENCE}
    for index in range(args.passes):
        for label, loras in SEQUENCE:
            job = Job.model_validate(dict(
                request_id=f"p{index}-{label}", prompt="a photo of a cat", models={"base": "tiny-sdxl"},
                width=256, height=256, steps=args.steps, seed=7, precision={"dtype": "float32"},
                scheduler="EulerDiscreteScheduler",
                loras=[{"name": name, "weight": weight} for name, weight in loras]))
            metrics = executor.run(job, lambda *a: None, lambda: False)["processing_metrics"]
            after = metrics["total_time"] - metrics["preprocessing_time"] - metrics["inference_time"] \
                - metrics["postprocessing_time"]
            if index:  # the first pass is the warm-up
                samples[label].append((metrics["preprocessing_time"], after))

    print(f"per-job LoRA handling on the tiny kit, CPU, median of {args.passes - 1} passes (ms)")
    print(f"  {'job (in this order)':<32}{'before':>10}{'after':>10}{'sum':>10}")
    for label, values in samples.items():
        before = statistics.median(v[0] for v in values) * 1000
        after = statistics.median(v[1] for v in values) * 1000
        print(f"  {label:<32}{before:10.1f}{after:10.1f}{before + after:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
