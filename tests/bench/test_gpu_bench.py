"""bench/gpu_bench.py end to end on CPU (tiny kit, automatic there): in-process diffusers, a real
`sdxl-broker serve` with one worker, then one with two. Checks that every figure the GPU run
prints has its row with a number (or its honest "n/a" / "not available"), not the speed.

Also: the random SDXL architecture the GPU run builds is the published one (parameter counts
of every component, on the meta device: no memory, no weights)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "gpu_bench.py")
NUMBER = r"\d+\.\d+"

ROWS_WITH_FIGURES = [
    "in-process (from_pretrained + to(device))",
    "worker (model_load_request, worker's load_time_s)",
    "batch 1", "batch 2", "batch 4",
    "in-process attach (load_lora_weights + set_adapters)",
    "in-process detach (unload_lora_weights)",
    "through serve, before the first step: no LoRA",
    "through serve, before the first step: LoRA, first job",
    "through serve, before the first step: same LoRA again",
    "through serve, before the first step: no LoRA after LoRA",
    "one worker (cpu-0)",
    "two workers (cpu-0 on cpu, cpu-1 on cpu)",
    "two workers scaling ratio (throughput 2 / 1)",
]


def _numbers(output: str, label: str) -> list[float]:
    match = re.search(rf"^  {re.escape(label)}\s+(.*)$", output, re.MULTILINE)
    assert match, f"row {label!r} missing in:\n{output}"
    figures = [float(x) for x in re.findall(NUMBER, match.group(1))]
    assert figures, f"row {label!r} has no figure: {match.group(0)!r}"
    return figures


@pytest.mark.slow
def test_cpu_run_prints_every_figure(demo_models_dir, tmp_path):
    proc = subprocess.Popen([sys.executable, SCRIPT, "--device", "cpu", "--models-dir", demo_models_dir,
                             "--work-dir", str(tmp_path), "--steps", "2", "--scaling-jobs", "2"],
                            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err[-4000:]}"
    assert "tiny kit (CPU smoke run: NOT SDXL speed)" in out
    for label in ROWS_WITH_FIGURES:
        _numbers(out, label)
    # batch rows: in-process steps/s and images/s, serve steps/s and images/s, ratio, worker time
    for batch in (1, 2, 4):
        steps_local, images_local, steps_served, images_served, ratio, _inference = _numbers(out, f"batch {batch}")
        # 2 steps per call: steps/s = 2 / t and images/s = batch / t for the same t
        assert steps_local * batch == pytest.approx(images_local * 2, rel=0.02, abs=0.002)
        assert steps_served * batch == pytest.approx(images_served * 2, rel=0.02, abs=0.002)
    # dynamic batching: the 8 requests sent at once ran in fewer calls than 8 (e.g. "1+7 jobs")
    calls = re.search(r"one after another / all at once\s+[\d.]+ s / [\d.]+ s: gain [\d.]+x "
                      r"\(the worker's calls: ([\d+]+) jobs\)", out)
    assert calls, out
    assert sum(map(int, calls[1].split("+"))) == 8 and len(calls[1].split("+")) < 8, calls[1]
    assert re.search(r"in-process: 8 calls / one call of 8 prompts\s+[\d.]+ s / [\d.]+ s: gain", out), out
    assert re.search(r"worker memory vs max_memory_allocated\s+n/a on cpu", out), out
    # nothing the bench started is left running
    left = [p for p in psutil.process_iter(["cmdline"])
            if any(str(tmp_path) in part for part in (p.info["cmdline"] or []))]
    assert not left, [p.info["cmdline"] for p in left]


def test_random_sdxl_has_the_published_architecture():
    from gpu_worker import sdxl_architecture

    components = sdxl_architecture.build_components("meta")
    assert sdxl_architecture.parameter_counts(components) == sdxl_architecture.PUBLISHED_PARAMETERS
    unet = components["unet"]
    assert unet.config.cross_attention_dim == (components["text_encoder"].config.hidden_size
                                               + components["text_encoder_2"].config.hidden_size)
    lora = sdxl_architecture.lora_state_dict(unet, rank=2)
    # 70 transformer blocks x 2 attentions x 4 projections, down and up each
    assert len(lora) == 70 * 2 * 4 * 2
    assert all(k.startswith("unet.") and k.endswith(("lora.down.weight", "lora.up.weight")) for k in lora)
