"""bench/worker_costs.py, run for real with tiny settings: a real broker subprocess, a real
`sdxl-broker worker` (cold start) and a warm worker for the round trip, diffusers in-process.
Checks the table a person reads, not the speed (speed goals are the benchmark's to print)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "worker_costs.py")
NUMBER = r"\d+\.\d+"

# every row of the table, each must carry a figure
ROWS = [
    "import torch + diffusers", "cold pipeline load", "first job (with model load)", "same job, warm",
    "plain diffusers, same job (interleaved)", "executor / plain diffusers", "load_model cache hit",
    "load_model cache miss", "step time (moving average)", "spawn to READY (row in status_request)",
    "spawn to executor built (worker log)", "spawn to READY sent (worker log)",
    "warm-up job through broker (loads)", "through broker, send to final reply",
    "in-process plain diffusers + PNG save", "round trip / in-process", "per pair; fastest / fastest",
    "worker pre-processing (cache, scheduler)", "worker inference (denoise + VAE decode)",
    "worker post-processing (PNG+meta+save)", "worker executor total",
    "broker + transport (trip - executor)", "outside the diffusers call", "CPU per job, worker process",
    "worker CPU while the baseline ran", "other processes' CPU per sample",
]


def _figure(table: str, label: str) -> float:
    """The first number on the row `label`; fails the test when the row has none."""
    match = re.search(rf"^  {re.escape(label)}\s+.*?({NUMBER})", table, re.MULTILINE)
    assert match, f"row {label!r} missing or without a number in:\n{table}"
    return float(match.group(1))


def _left_in_group(pgid: int) -> list[psutil.Process]:
    left = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return left


@pytest.mark.slow
def test_tiny_run_prints_every_row_with_a_figure(demo_models_dir):
    # own process group: the broker and workers the script starts stay in it, so a hung run is
    # killed whole, and the check below sees anything the script left behind
    proc = subprocess.Popen([sys.executable, SCRIPT, "--models-dir", demo_models_dir, "--size", "256",
                             "--steps", "2", "--repeats", "1", "--cold-starts", "1"],
                            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        left = _left_in_group(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    assert proc.returncode == 0, err[-4000:]
    assert not left, f"the script left processes behind: {[p.pid for p in left]}"
    assert "not measured yet" not in out
    figures = {label: _figure(out, label) for label in ROWS}

    assert "256x256, 2 steps" in out.splitlines()[0]
    # both sides report torch's thread count, main thread and a fresh thread (like the busy thread)
    threads_here = re.search(r"torch threads in this process: main (\d+), fresh thread (\d+)", out)
    threads_worker = re.search(r"worker process\s+torch threads: main (\d+), fresh thread (\d+)", out)
    assert threads_here and threads_worker, out
    assert int(threads_here.group(1)) >= 1 and int(threads_worker.group(2)) >= 1
    # figures that must hold whatever the machine's load
    assert figures["spawn to READY (row in status_request)"] >= figures["spawn to executor built (worker log)"] > 0
    assert 0 < figures["worker executor total"] <= figures["through broker, send to final reply"]
    assert figures["worker inference (denoise + VAE decode)"] <= figures["worker executor total"]
    assert figures["broker + transport (trip - executor)"] >= 0
    broker_s = figures["through broker, send to final reply"]
    plain_s = figures["in-process plain diffusers + PNG save"]
    ratio = broker_s / plain_s
    # both times are printed with 3 decimals: on a fast machine (tiny jobs take ~0.05 s) their
    # rounding alone moves the ratio by more than 0.01, so allow what the rounding allows
    slack = ratio * (0.0005 / broker_s + 0.0005 / plain_s) + 0.001
    assert figures["round trip / in-process"] == pytest.approx(ratio, abs=slack)
    assert re.search(r"goal <= 1\.05x: (met|missed) \(the goal is set for 512x512, 8 steps\)", out)
    assert re.search(r"^  pairs with other load <= 0\.5 core\s+(0 of 1: |1 of 1, median ratio \d+\.\d+x; goal: )",
                     out, re.MULTILINE), out
