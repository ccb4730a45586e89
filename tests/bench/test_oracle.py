"""The clairvoyant oracle on tiny cases worked out by hand.

Cost model for all cases: one step of 1 s at 1024x1024 (so a 1024x1024 job computes 1 s), a
base model of 1000 MB loads in 4 s, activations negligible (1 MB per megapixel)."""

import math

import pytest

from bench.oracle import cold_start_floor, run_oracle
from bench.workload import CostModel, WorkerSpec, WorkItem

COST = CostModel(steps=1, step_time_1024_s=1.0, load_time_s=4.0, base_model_mb=1000.0,
                 refiner_mb=1000.0, controlnet_mb=500.0, activation_mb_per_megapixel=1.0)


def jobs(models, gap_s=100.0):
    """One 1024x1024 job per model name, `gap_s` apart (far apart: no queueing)."""
    return [WorkItem(i, f"r{i}", i * gap_s, m, 1024, 1024, 1) for i, m in enumerate(models)]


def worker(worker_id, n_models):
    return WorkerSpec(worker_id, n_models, n_models * 1000.0 + 10.0)


def test_belady_beats_lru_on_one_device():
    # room for two models; A B C A D A.
    # Belady: {A,B}; C evicts B (never used again); A hits; D evicts C; A hits -> 4 loads.
    # (LRU would evict A for C, B for A, C for D: 5 loads.)
    seq = jobs("ABCADA")
    out = run_oracle(seq, [worker("w0", 2)], COST)
    assert out.loads == 4
    assert out.evictions == 2
    assert out.latencies_s == [5.0, 5.0, 5.0, 1.0, 5.0, 1.0]
    assert cold_start_floor(seq) == 4


def test_one_slot_device_reloads_every_switch():
    out = run_oracle(jobs("ABAB"), [worker("w0", 1)], COST)
    assert out.loads == 4 and out.evictions == 3


def test_two_devices_keep_one_model_each():
    out = run_oracle(jobs("ABABAB"), [worker("w0", 1), worker("w1", 1)], COST)
    assert out.loads == 2
    assert out.assignments == ["w0", "w1", "w0", "w1", "w0", "w1"]
    assert out.latencies_s == [5.0, 5.0, 1.0, 1.0, 1.0, 1.0]
    # busy: w0 and w1 each load once (4 s) and compute three jobs (3 s)
    assert out.busy_s == {"w0": 7.0, "w1": 7.0}
    assert out.makespan_s == pytest.approx(5 * 100.0 + 1.0)


def test_queueing_versus_loading_and_patience():
    # w0 holds A after job 0 and is busy until t=5; job 1 (A) arrives at t=0.5.
    # Waiting for w0 finishes at 5 + 1 = 6; loading A on idle w1 finishes at 0.5 + 4 + 1 = 5.5.
    seq = [WorkItem(0, "r0", 0.0, "A", 1024, 1024, 1), WorkItem(1, "r1", 0.5, "A", 1024, 1024, 1)]
    workers = [worker("w0", 1), worker("w1", 1)]
    eager = run_oracle(seq, workers, COST, patience_s=0.0)
    assert eager.assignments == ["w0", "w1"] and eager.loads == 2
    assert eager.latencies_s == [5.0, 5.0]
    patient = run_oracle(seq, workers, COST, patience_s=1.0)  # 0.5 s later is within patience
    assert patient.assignments == ["w0", "w0"] and patient.loads == 1
    assert patient.latencies_s == [5.0, 5.5]


def test_eviction_choice_across_devices_uses_the_future():
    # A and B arrive together (A on w0, B on the idle w1), then C lands on w0 and D on w1:
    # w0 = {A, C}, w1 = {B, D}, both full. E comes; afterwards A, C and B come back, D never.
    # The oracle puts E on w1 and evicts D, so nothing is loaded twice (w0 would win a tie).
    arrivals = [("A", 0.0), ("B", 0.1), ("C", 100.0), ("D", 200.0), ("E", 300.0),
                ("A", 400.0), ("C", 500.0), ("B", 600.0)]
    seq = [WorkItem(i, f"r{i}", t, m, 1024, 1024, 1) for i, (m, t) in enumerate(arrivals)]
    out = run_oracle(seq, [worker("w0", 2), worker("w1", 2)], COST)
    assert out.assignments == ["w0", "w1", "w0", "w1", "w1", "w0", "w0", "w1"]
    assert out.loads == 5 and out.evictions == 1
    assert out.latencies_s[-3:] == [1.0, 1.0, 1.0]


def test_a_job_that_fits_nowhere_is_counted_not_placed():
    big = WorkItem(0, "r0", 0.0, "A", 1024, 1024, 1, refiner="R")  # needs 2000 MB
    out = run_oracle([big], [worker("w0", 1)], COST)
    assert out.unplaceable == 1 and out.loads == 0 and math.isinf(out.latencies_s[0])
