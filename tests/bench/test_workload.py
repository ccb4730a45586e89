"""The seeded workload generator: the statistics issue 8 asks for, and determinism."""

import statistics

import pytest

from bench import workload as W
from protocol import constants as C

N = 20000  # large enough that the shares below sit well inside their tolerances


@pytest.fixture(scope="module")
def mix():
    return W.draw_jobs(N, seed=3)


def test_base_models_follow_zipf_1_1_over_12(mix):
    expected = W.zipf_weights(12, 1.1)
    counts = {name: 0 for name in W.BASE_MODEL_NAMES}
    for job in mix:
        counts[job.base_model] += 1
    shares = [counts[name] / N for name in W.BASE_MODEL_NAMES]
    assert len(W.BASE_MODEL_NAMES) == 12
    assert expected[0] == pytest.approx(0.3550, abs=1e-3)  # 1 / (1 + 2**-1.1 + ... + 12**-1.1)
    for got, want in zip(shares, expected):
        assert got == pytest.approx(want, abs=0.012)
    assert shares[0] > shares[1] > shares[2] > shares[5] > shares[11] > 0


def test_feature_shares(mix):
    with_lora = [j for j in mix if j.loras]
    assert len(with_lora) / N == pytest.approx(0.20, abs=0.012)
    sizes = [len(j.loras) for j in with_lora]
    assert set(sizes) == {1, 2, 3}
    for k in (1, 2, 3):
        assert sizes.count(k) / len(sizes) == pytest.approx(1 / 3, abs=0.03)
    assert all(len(set(j.loras)) == len(j.loras) for j in with_lora)  # no LoRA twice in a job
    assert sum(1 for j in mix if j.controlnet) / N == pytest.approx(0.10, abs=0.008)
    assert sum(1 for j in mix if j.refiner) / N == pytest.approx(0.05, abs=0.006)


def test_sizes_span_512_to_1024_and_are_valid(mix):
    widths = {j.width for j in mix}
    heights = {j.height for j in mix}
    assert min(widths) == min(heights) == 512 and max(widths) == max(heights) == 1024
    assert all(s % C.SIZE_MULTIPLE == 0 for s in widths | heights)


def test_step_time_and_memory_scale_with_pixels():
    cost = W.CostModel()
    small = W.WorkItem(0, "a", 0.0, "sim-base-00", 512, 512, 25)
    large = W.WorkItem(1, "b", 0.0, "sim-base-00", 1024, 1024, 25)
    assert large.compute_s(cost) == pytest.approx(25 * 0.040)
    assert small.compute_s(cost) == pytest.approx(large.compute_s(cost) / 4)
    activations = [j.memory_mb(cost) - cost.base_model_mb for j in (small, large)]
    assert activations[1] == pytest.approx(4 * activations[0])
    assert cost.model_load_s("sim-base-03") == pytest.approx(4.0)
    assert cost.model_load_s(W.REFINER_NAME) < 4.0  # smaller file, shorter load
    with_all = W.WorkItem(2, "c", 0.0, "sim-base-00", 1024, 1024, 25, controlnet="depth",
                          refiner=W.REFINER_NAME)
    assert with_all.models == ("sim-base-00", W.REFINER_NAME, "controlnet-depth")


@pytest.mark.parametrize("load", [0.5, 0.7, 0.9])
def test_poisson_arrivals_hit_the_offered_load(load):
    cfg = W.WorkloadConfig(n_jobs=8000, n_workers=4, load=load, seed=5)
    jobs = W.make_workload(cfg)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(jobs, jobs[1:])]
    rate = load * W.warm_capacity_jobs_per_s(jobs, 4, cfg.cost)
    assert statistics.mean(gaps) == pytest.approx(1 / rate, rel=0.04)
    # exponential gaps: standard deviation equals the mean
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.05)
    assert W.offered_load(jobs, 4, cfg.cost) == pytest.approx(load, rel=0.05)
    assert all(g >= 0 for g in gaps)


def test_same_seed_same_workload_and_loads_share_the_mix():
    a = W.make_workload(W.WorkloadConfig(n_jobs=300, load=0.5, seed=11))
    b = W.make_workload(W.WorkloadConfig(n_jobs=300, load=0.5, seed=11))
    c = W.make_workload(W.WorkloadConfig(n_jobs=300, load=0.9, seed=11))
    d = W.make_workload(W.WorkloadConfig(n_jobs=300, load=0.5, seed=12))
    assert a == b
    assert [j.base_model for j in a] == [j.base_model for j in c]
    # the same gaps, closer together: arrival times scale by 0.5 / 0.9
    assert c[-1].arrival_s == pytest.approx(a[-1].arrival_s * 0.5 / 0.9)
    assert [j.base_model for j in a] != [j.base_model for j in d]


def test_worker_budgets_hold_two_to_four_models():
    cost = W.CostModel()
    specs = W.worker_specs(8, cost)
    assert [s.model_slots for s in specs] == [2, 3, 4, 2, 3, 4, 2, 3]
    largest_job_act = cost.activation_mb(1024, 1024)
    for s in specs:
        assert s.model_slots * cost.base_model_mb + largest_job_act <= s.memory_mb
        assert (s.model_slots + 1) * cost.base_model_mb > s.memory_mb
    assert len({s.worker_id for s in specs}) == 8


def test_request_body_carries_the_job():
    item = W.WorkItem(7, "bench-1-00007", 1.5, "sim-base-04", 768, 1024, 25,
                      loras=("sim-lora-01", "sim-lora-02"), controlnet="canny",
                      refiner=W.REFINER_NAME)
    body = W.to_request(item, timeout_s=30.0)
    assert body["message_type"] == C.GENERATE_FLAT
    assert (body["model_base"], body["width"], body["height"]) == ("sim-base-04", 768, 1024)
    assert body["model_refiner"] == W.REFINER_NAME
    assert len(body["lora_names"]) == len(body["lora_weights"]) == 2
    assert body["controlnet_types"] == ["canny"] and len(body["controlnet_images"]) == 1
    assert body["timeout"] == 30.0
