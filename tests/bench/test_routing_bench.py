"""The routing benchmark's plumbing: percentiles, goal verdicts, the dispatch replay, and one
tiny real run (a real broker and two SIMULATED worker processes over ipc://)."""

import math

import pytest

from bench import workload as W
from bench.oracle import cold_start_floor
from bench.replay import replay
from bench.routing import RunFigures, check_goals, percentile, run_policy

# activations as broker/routing.py estimates them (2048 MB per megapixel), so the router and
# the simulated devices agree on what fits
COST = W.CostModel(steps=1, step_time_1024_s=1.0, load_time_s=4.0, base_model_mb=1000.0,
                   refiner_mb=1000.0, controlnet_mb=500.0, activation_mb_per_megapixel=2048.0)


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([3.0], 99) == 3.0
    assert math.isnan(percentile([], 50))


def _row(policy, loads, p99, oom=0, load=0.7):
    return RunFigures(policy=policy, n_workers=4, load=load, jobs=10, completed=10, failed=0,
                      unanswered=0, error_codes={}, model_loads=loads, evictions=0,
                      out_of_memory=oom, latency_mean_s=1.0, latency_p50_s=1.0,
                      latency_p99_s=p99, throughput_jobs_per_s=1.0, busy_share=0.5)


def test_goal_verdicts_follow_issue_8():
    met = check_goals([_row("oracle", 10, 5.0), _row("smart", 12, 10.0), _row("round-robin", 36, 20.0)])
    assert [v["met"] for v in met] == [True, True, True, True]
    missed = check_goals([_row("oracle", 10, 5.0), _row("smart", 13, 10.1, oom=1),
                          _row("round-robin", 38, 20.0)])
    assert [v["met"] for v in missed] == [False, False, False, False]


def test_replay_follows_the_sim_workers_lru_cache():
    # one device with room for two models, jobs far apart: A B C A D A under LRU
    # loads A, B, C (evicts A), A (evicts B), D (evicts C), then A hits: 5 loads
    items = [W.WorkItem(i, f"r{i}", i * 100.0, m, 1024, 1024, 1) for i, m in enumerate("ABCADA")]
    specs = [W.WorkerSpec("w0", 2, 2 * 1000.0 + 2200.0)]  # 3 models do not fit
    out = replay(items, specs, COST, "smart")
    assert out.loads == 5
    assert out.latencies_s == [5.0, 5.0, 5.0, 5.0, 5.0, 1.0]


@pytest.mark.slow
def test_one_tiny_run_through_the_real_broker(tmp_path):
    cost = W.CostModel()
    specs = W.worker_specs(2, cost)
    items = W.make_workload(W.WorkloadConfig(n_jobs=12, n_workers=2, load=0.5, seed=4, cost=cost))
    figures = run_policy("smart", items, specs, 0.5, cost, time_scale=40.0, keep_dir=tmp_path)
    assert figures.completed == 12 and figures.failed == 0 and figures.unanswered == 0
    assert figures.model_loads >= cold_start_floor(items)  # read from the workers' counters
    assert figures.out_of_memory == 0
    assert sum(figures.jobs_per_worker.values()) == 12
    assert set(figures.jobs_per_worker) <= {s.worker_id for s in specs}
    assert 0 < figures.busy_share <= 1.0
    assert figures.latency_p50_s >= min(i.compute_s(cost) for i in items)


def test_replay_mirrors_the_broker_holding_jobs_for_the_best_worker():
    # broker.routing's smart ranks busy workers too and holds a job for the best one, so in the
    # deterministic replay it loads less than round-robin on the benchmark's own workload
    cost = W.CostModel()
    specs = W.worker_specs(4, cost)
    items = W.make_workload(W.WorkloadConfig(n_jobs=120, n_workers=4, load=0.7, seed=8, cost=cost))
    smart, rr = (replay(items, specs, cost, p) for p in ("smart", "round-robin"))
    assert len(smart.latencies_s) == len(rr.latencies_s) == 120
    assert smart.loads < rr.loads
    remaining = replay(items, specs, cost, "smart", exact_progress=True)
    assert len(remaining.latencies_s) == 120 and remaining.loads >= cold_start_floor(items)


def test_replay_batches_compatible_jobs_through_the_real_core():
    # one device: two incompatible jobs fill its two slots (model load 4 s, then 1 s and 0.25 s
    # of compute); 4 compatible jobs arrive meanwhile and queue in the core. When the first
    # finishes (5 s) the core sends them as one group (batch_of 4) and the device runs them as
    # one call of 1 + 0.5 * 3 = 2.5 lone computes after the second (5.25..7.75 s).
    cost = W.CostModel(steps=1, step_time_1024_s=1.0, load_time_s=4.0, base_model_mb=1000.0,
                       activation_mb_per_megapixel=2048.0, max_batch=4, batch_cost=0.5)
    specs = [W.WorkerSpec("w0", 2, 20000.0)]
    items = [W.WorkItem(0, "first", 0.0, "A", 1024, 1024, 1), W.WorkItem(1, "second", 0.0, "A", 512, 512, 1)]
    items += [W.WorkItem(i, f"b{i}", 4.5, "A", 1024, 1024, 1) for i in range(2, 6)]
    out = replay(items, specs, cost, "smart")
    assert out.latencies_s == [5.0, 5.25, 3.25, 3.25, 3.25, 3.25]
    # without batching: one after another, 1 s each from 5.25 s
    alone = replay(items, specs, W.CostModel(**{**cost.__dict__, "max_batch": 1}), "smart")
    assert alone.latencies_s == [5.0, 5.25, 1.75, 2.75, 3.75, 4.75]
