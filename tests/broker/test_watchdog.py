"""The stuck-job watchdog in simulated time (BrokerCore without sockets, issue 16 item 7).

A worker that heart-beats but never finishes once took 3 of 6 jobs, and all 6 timed out while a
healthy worker stood idle. Here: a worker holding jobs without progress for stuck_job_s has them
aborted there and re-run elsewhere within max_attempts, is unhealthy (status, metric) until it
finishes a job, and routing gives it only probe jobs meanwhile. The same path with real
processes: tests/serve/test_stuck_worker.py.
"""

from __future__ import annotations

import json

import pytest

from broker import routing, watchdog
from broker.core import BrokerConfig, BrokerCore, ClientRequest, ToClient, ToWorkers
from broker.journal import MemoryJournal
from broker.registry import WorkerRecord
from protocol import parse
from protocol import worker_protocol as W

from broker_harness import flat_request

CLIENT = (b"client-1", b"")
STUCK_S = 10.0


def _core(**config) -> BrokerCore:
    config.setdefault("stuck_job_s", STUCK_S)
    core = BrokerCore(BrokerConfig(**config), now=0.0, first_dispatch_id=100)
    core.open(MemoryJournal(), 0.0, wall_now=0.0)
    return core


def _submit(core, rid: str, now: float, **fields) -> list:
    return core.on_client(ClientRequest(CLIENT, json.dumps(flat_request(rid, **fields)).encode()), now)


def _register(core, worker_id: str, now: float, pid: int = 0) -> bytes:
    identity = f"id-{worker_id}".encode()
    core.on_worker(identity, W.Ready(worker_id=worker_id, memory_total_mb=8000.0, pid=pid,
                                     capabilities=["txt2img"]), now)
    return identity


def _beat(core, identity: bytes, now: float, job: str | None = None, step: int = 0,
          loading: tuple[str, ...] = ()) -> list:
    telemetry = W.Telemetry.from_dict({"models_loading": list(loading)})
    return core.on_worker(identity, W.WorkerHeartbeat(telemetry=telemetry, busy=job is not None,
                                                      current_job=job, current_step=step), now)


def _sent(outputs, kind) -> list[tuple[list[bytes], W.Message]]:
    return [(o.identities, o.message) for o in outputs
            if isinstance(o, ToWorkers) and isinstance(o.message, kind)]


def _finals(outputs) -> list[dict]:
    return [o.message for o in outputs if isinstance(o, ToClient) and o.message.get("final")]


def _result(rid: str, dispatch_id: int) -> W.JobResult:
    return W.JobResult(request_id=rid, dispatch_id=dispatch_id,
                       data={"generated_images": [], "processing_metrics": {"total_time": 1.0}})


def _row(core, worker_id: str, now: float) -> dict:
    return next(r for r in core.status(now)["workers"] if r["worker_id"] == worker_id)


def _firings(core, worker_id: str) -> float:
    return core.metrics.registry.get_sample_value(
        "sdxl_broker_watchdog_firings_total", {"worker_id": worker_id}) or 0.0


def _run_until(core, start: float, end: float, beats: dict[bytes, dict]) -> list:
    """Tick every 0.5 s from start to end, each worker heart-beating what `beats` says every
    second; returns every output."""
    out, now = [], start
    while now <= end:
        if now == int(now):
            for identity, report in beats.items():
                out += _beat(core, identity, now, **report)
        out += core.tick(now)
        now += 0.5
    return out


def test_a_stuck_job_is_aborted_there_and_rerun_on_a_healthy_worker():
    core = _core(max_attempts=2)
    stuck = _register(core, "stuck", 0.0)
    _submit(core, "a", 0.0)
    [(to, first)] = _sent(core.tick(0.0), W.RunJob)
    assert to == [stuck]
    good = _register(core, "good", 0.5)
    # "stuck" heart-beats every second, always at step 0 of job a: alive, not moving
    quiet = _run_until(core, 1.0, STUCK_S - 0.5, {stuck: {"job": "a"}, good: {}})
    assert _sent(quiet, W.AbortJob) == [] and _sent(quiet, W.RunJob) == []
    fired = _run_until(core, STUCK_S, STUCK_S + 1.0, {stuck: {"job": "a"}, good: {}})
    [(abort_to, abort)] = _sent(fired, W.AbortJob)
    assert abort_to == [stuck] and (abort.request_id, abort.dispatch_id, abort.reason) == \
        ("a", first.dispatch_id, "stuck")
    [(run_to, rerun)] = _sent(fired, W.RunJob)
    assert run_to == [good] and rerun.attempt == 2
    row = _row(core, "stuck", STUCK_S + 1.0)
    assert row["healthy"] is False and row["stalls"] == 1 and row["current_jobs"] == []
    assert "no progress for 10 s (running a at step 0)" in row["unhealthy_reason"]
    assert _row(core, "good", STUCK_S + 1.0)["healthy"] is True
    assert _firings(core, "stuck") == 1
    # the client gets the healthy worker's result, once; the stuck one's late answer is ignored
    [reply] = _finals(core.on_worker(good, _result("a", rerun.dispatch_id), STUCK_S + 2.0))
    assert reply["success"] is True
    assert _finals(core.on_worker(stuck, _result("a", first.dispatch_id), STUCK_S + 3.0)) == []


def test_steps_loads_and_answers_are_progress():
    core = _core()
    w = _register(core, "w", 0.0)
    _submit(core, "a", 0.0)
    _submit(core, "b", 0.0)
    assert len(_sent(core.tick(0.0), W.RunJob)) == 2      # one running, one prefetched

    def report(t: float) -> dict:
        """Job a: two model loads of 8 s each, then a step every 8 s; each stretch under
        STUCK_S, 56 s in all."""
        if t < 8:
            return {"job": "a", "loading": ("base",)}
        if t < 16:
            return {"job": "a", "loading": ("refiner",)}
        return {"job": "a", "step": int((t - 16) // 8) + 1}

    out, now = [], 0.0
    while now <= 56.0:
        if now == int(now):
            out += _beat(core, w, now, **report(now))
        out += core.tick(now)
        now += 0.5
    out += core.on_worker(w, _result("a", 100), 56.5)     # a answered; b starts at once
    assert _sent(out, W.AbortJob) == [] and _row(core, "w", 56.5)["healthy"] is True
    # b then stays at step 0: judged from the heartbeat that said it began
    assert _sent(_run_until(core, 57.0, 66.0, {w: {"job": "b"}}), W.AbortJob) == []
    assert [m.request_id for _, m in _sent(_run_until(core, 66.5, 67.5, {w: {"job": "b"}}),
                                           W.AbortJob)] == ["b"]


def test_one_model_load_longer_than_stuck_job_s_fires():
    """What the default must stay above: a load shows no step, only that it began."""
    core = _core()
    w = _register(core, "w", 0.0)
    _submit(core, "a", 0.0)
    core.tick(0.0)
    out = _run_until(core, 0.0, STUCK_S + 1.0, {w: {"job": "a", "loading": ("huge",)}})
    [(_, abort)] = _sent(out, W.AbortJob)
    assert "loading huge" in _row(core, "w", STUCK_S + 1.0)["unhealthy_reason"]


def test_the_job_prefetched_behind_a_stuck_one_is_rerun_too():
    core = _core(max_attempts=2)
    stuck = _register(core, "stuck", 0.0)
    _submit(core, "a", 0.0)
    _submit(core, "b", 0.0)
    assert len(_sent(core.tick(0.0), W.RunJob)) == 2
    good = _register(core, "good", 1.0)
    out = _run_until(core, 1.0, STUCK_S + 1.0, {stuck: {"job": "a"}, good: {}})
    assert sorted(m.request_id for _, m in _sent(out, W.AbortJob)) == ["a", "b"]
    assert sorted((m.request_id, to == [good]) for to, m in _sent(out, W.RunJob)) == \
        [("a", True), ("b", True)]


def test_past_max_attempts_the_job_fails_worker_lost_naming_the_stall():
    core = _core(max_attempts=1)
    stuck = _register(core, "stuck", 0.0)
    _submit(core, "a", 0.0)
    core.tick(0.0)
    [reply] = _finals(_run_until(core, 1.0, STUCK_S + 1.0, {stuck: {"job": "a"}}))
    assert reply["error_code"] == "worker_lost" and reply["request_id"] == "a"
    assert "1 of 1 attempts" in reply["error"] and "no progress for 10 s" in reply["error"]


def test_an_unhealthy_worker_gets_only_one_probe_job_and_a_success_makes_it_healthy(caplog):
    caplog.set_level("INFO", logger="broker.server")
    core = _core(max_attempts=3)
    stuck = _register(core, "stuck", 0.0)
    _submit(core, "a", 0.0)
    core.tick(0.0)
    good = _register(core, "good", 1.0)
    _run_until(core, 1.0, STUCK_S + 1.0, {stuck: {"job": "a"}, good: {}})   # a -> good
    # while it still reports running a, it gets nothing, even with the healthy worker full
    for rid in ("b", "c", "d"):
        _submit(core, rid, 12.0)
    out = _run_until(core, 12.0, 13.0, {stuck: {"job": "a"}, good: {"job": "a"}})
    assert [to for to, _ in _sent(out, W.RunJob)] == [[good]]      # b prefetched on good
    assert _row(core, "stuck", 13.0)["current_jobs"] == []
    # it lets go of a (the abort got through): one probe job, not two
    out = _run_until(core, 14.0, 15.0, {stuck: {}, good: {"job": "a"}})
    [(to, probe)] = _sent(out, W.RunJob)
    assert to == [stuck] and _row(core, "stuck", 15.0)["current_jobs"] == [probe.request_id]
    assert f"job {probe.request_id} -> unhealthy worker stuck as a probe" in caplog.text
    assert _row(core, "stuck", 15.0)["healthy"] is False
    core.on_worker(stuck, _result(probe.request_id, probe.dispatch_id), 16.0)
    row = _row(core, "stuck", 16.0)
    assert row["healthy"] is True and row["unhealthy_reason"] is None and row["stalls"] == 1
    assert row["last_success_s"] == 0.0
    assert "worker stuck finished job" in caplog.text and "healthy again" in caplog.text
    assert "watchdog: worker stuck holds job(s) a but showed no progress for 10 s" in caplog.text


def test_a_reconnect_of_the_same_process_does_not_wash_it_healthy():
    core = _core()
    stuck = _register(core, "stuck", 0.0, pid=42)
    _submit(core, "a", 0.0)
    core.tick(0.0)
    _run_until(core, 1.0, STUCK_S + 1.0, {stuck: {"job": "a"}})
    assert _row(core, "stuck", 11.0)["healthy"] is False
    core.tick(20.0)                                       # silent since 11 s: lost
    assert _row(core, "stuck", 20.0)["state"] == "lost"
    again = b"id-stuck-again"
    core.on_worker(again, W.Ready(worker_id="stuck", pid=42, memory_total_mb=8000.0,
                                  capabilities=["txt2img"]), 30.0)   # after the old one was lost
    assert _row(core, "stuck", 30.0)["healthy"] is False
    core.on_worker(b"id-new", W.Ready(worker_id="fresh", pid=43, memory_total_mb=8000.0,
                                      capabilities=["txt2img"]), 30.0)
    assert _row(core, "fresh", 30.0)["healthy"] is True


def test_off_with_zero_and_a_management_load_is_not_judged():
    core = _core(stuck_job_s=0)
    w = _register(core, "w", 0.0)
    _submit(core, "a", 0.0)
    core.tick(0.0)
    assert _sent(_run_until(core, 1.0, 100.0, {w: {"job": "a"}}), W.AbortJob) == []
    for bad in (-1, 1.5):   # 1.5 s: under two heartbeat intervals, every job would look stuck
        with pytest.raises(ValueError, match="stuck-job-s"):
            _core(stuck_job_s=bad)
    records = [WorkerRecord("w", b"w", jobs={"a": 1}, progress_at=0.0, loading=True)]
    assert watchdog.stalled(records, 1000.0, STUCK_S) == []
    records[0].loading = False
    [stall] = watchdog.stalled(records, 1000.0, STUCK_S)
    assert stall.silent_s == 1000.0 and stall.doing == "running nothing"


def test_a_queued_job_timing_out_says_every_worker_is_unhealthy():
    core = _core(max_attempts=2)
    stuck = _register(core, "stuck", 0.0)
    _submit(core, "a", 0.0, timeout=30)
    core.tick(0.0)
    [reply] = _finals(_run_until(core, 1.0, 31.0, {stuck: {"job": "a"}}))
    assert reply["error_code"] == "timeout"
    assert "every worker is unhealthy" in reply["error"]


@pytest.mark.parametrize("policy", routing.POLICIES)
def test_every_policy_prefers_a_healthy_worker(policy):
    healthy = WorkerRecord("b-healthy", b"b", capabilities=frozenset({"txt2img"}))
    idle_unhealthy = WorkerRecord("a-unhealthy", b"a", capabilities=frozenset({"txt2img"}),
                                  unhealthy_since=1.0)
    job = parse.parse_request(flat_request("r")).job
    rr = routing.RoundRobin()
    for _ in range(3):
        assert routing.choose_worker(job, [idle_unhealthy, healthy], policy, rr) is healthy
    # no healthy worker: the idle unhealthy one is probed
    assert routing.choose_worker(job, [idle_unhealthy], policy, rr) is idle_unhealthy
    # ... but not while it still reports running something
    idle_unhealthy.current_job = "stuck-job"
    assert routing.choose_worker(job, [idle_unhealthy], policy, rr) is None


def test_a_job_waiting_behind_a_long_model_load_is_not_stuck():
    core = _core()
    w = _register(core, "w", 0.0)
    load = json.dumps({"message_type": "model_load_request", "request_id": "ld",
                       "data": {"model_name": "tiny-sdxl"}}).encode()
    [(_, manage)] = _sent(core.on_client(ClientRequest(CLIENT, load), 0.0), W.Manage)
    _submit(core, "a", 0.0)
    assert len(_sent(core.tick(0.0), W.RunJob)) == 1      # queued on the worker behind the load
    # a 50 s load (the worker's busy thread runs it; job a waits)
    out = _run_until(core, 1.0, 50.0, {w: {"loading": ("tiny-sdxl",)}})
    out += core.on_worker(w, W.ManageReply(op_id=manage.op_id, success=True, data={}), 50.0)
    out += core.tick(51.0)                                # the next watchdog pass
    assert _sent(out, W.AbortJob) == [] and _row(core, "w", 51.0)["healthy"] is True
