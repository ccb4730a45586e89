"""Issue 15, broker side, on the socket-free core: a job no registered worker can ever run is
answered at once (unsupported_feature naming what is missing); with no worker registered a job
waits a bounded, configurable grace; queue_position is sent again whenever it changes, at most
once per interval."""

from __future__ import annotations

import json

from broker.core import BrokerConfig, BrokerCore, ClientRequest, ToClient, ToWorkers
from broker.journal import MemoryJournal
from protocol import constants as C
from protocol import worker_protocol as W

from broker_harness import flat_request

CLIENT = (b"client-1", b"")


def _core(**config) -> BrokerCore:
    core = BrokerCore(BrokerConfig(**config), now=0.0, first_dispatch_id=100)
    core.open(MemoryJournal(), 0.0, wall_now=0.0)
    return core


def _register(core, worker_id: str, now: float, **ready) -> bytes:
    identity = f"id-{worker_id}".encode()
    ready.setdefault("capabilities", ["txt2img"])
    core.on_worker(identity, W.Ready(worker_id=worker_id, memory_total_mb=8000.0, **ready), now)
    return identity


def _submit(core, rid: str, now: float, client=CLIENT, **fields) -> list:
    return core.on_client(ClientRequest(client, json.dumps(flat_request(rid, **fields)).encode()), now)


def _finals(outputs) -> list[dict]:
    return [o.message for o in outputs if isinstance(o, ToClient) and o.message.get("final")]


def _positions(outputs, rid: str) -> list:
    return [o.message["queue_position"] for o in outputs if isinstance(o, ToClient)
            and o.message.get("request_id") == rid and o.message.get("stage") == "queued"]


def test_a_job_for_a_device_the_pool_lacks_is_refused_at_once():
    core = _core()
    _register(core, "cpu-0", 0.0, device="cpu", device_type="cpu")
    [reply] = _finals(_submit(core, "gpu-job", 1.0, device="cuda:0"))
    assert reply["error_code"] == C.UNSUPPORTED_FEATURE
    assert "cuda:0" in reply["error"]
    assert reply["errors"] == [{"field": "device", "message": "no worker on device cuda:0"}]
    assert core.status(1.0)["broker"]["queue_depth"] == 0
    # a feature no worker offers, named
    [reply] = _finals(_submit(core, "inpaint", 1.0, init_image="i.png", mask_image="m.png"))
    assert reply["error_code"] == C.UNSUPPORTED_FEATURE and "inpaint" in reply["error"]
    # what the pool can run still runs
    assert _finals(_submit(core, "fine", 1.0)) == []


def test_with_no_worker_a_job_waits_the_grace_and_a_worker_in_time_runs_it():
    core = _core(no_worker_grace_s=5.0)
    assert _finals(_submit(core, "early", 0.0)) == []
    assert _finals(core.tick(4.9)) == []
    [reply] = _finals(core.tick(5.0))
    assert reply["request_id"] == "early" and reply["error_code"] == C.UNSUPPORTED_FEATURE
    assert "no worker has been registered for 5 s" in reply["error"]
    _submit(core, "patient", 6.0)
    worker = _register(core, "late", 9.0)
    out = core.tick(9.0)
    assert _finals(out) == []
    assert [o.identities for o in out if isinstance(o, ToWorkers)
            and isinstance(o.message, W.RunJob)] == [[worker]]


def test_jobs_queued_for_a_worker_that_leaves_fail_once_no_one_left_can_run_them():
    core = _core(no_worker_grace_s=30.0, heartbeat_interval_s=1.0, heartbeat_liveness=3)
    _register(core, "gpu", 0.0, device="cuda:0", device_type="cuda")
    _register(core, "cpu", 0.0)
    # the cpu worker is busy with a long job, the gpu job waits behind it for the gpu worker
    gpu_busy = _submit(core, "first", 0.0, device="cuda:0")
    assert _finals(gpu_busy) == []
    core.tick(0.1)
    assert _finals(_submit(core, "second", 0.2, device="cuda:0")) == []
    # the gpu worker goes silent and is lost: nobody left can run "second"
    cpu = b"id-cpu"
    for t in (1.0, 2.0, 3.0):
        core.on_worker(cpu, W.WorkerHeartbeat(), t)
    finals = _finals(core.tick(3.5))
    assert {r["request_id"]: r["error_code"] for r in finals}.get("second") == C.UNSUPPORTED_FEATURE


def test_queue_position_is_sent_again_when_it_changes_at_most_once_per_interval():
    core = _core(max_jobs_per_worker=1, queue_position_interval_s=1.0)
    worker = _register(core, "w1", 0.0)
    _submit(core, "a", 0.0)
    core.tick(0.0)                                   # a runs
    assert _positions(_submit(core, "b", 0.1, stream=True), "b") == [0]
    assert _positions(_submit(core, "c", 0.1, stream=True), "c") == [1]
    assert _positions(_submit(core, "d", 0.1, stream=True), "d") == [2]
    core.tick(0.2)
    # a finishes: b runs, c and d move up one
    core.on_worker(worker, W.JobResult(request_id="a", dispatch_id=100), 1.5)
    out = core.tick(1.5)
    assert (_positions(out, "c"), _positions(out, "d")) == ([0], [1])
    # b finishes at once too: c runs, d moves again, but within the interval: not yet
    core.on_worker(worker, W.JobResult(request_id="b", dispatch_id=101), 1.6)
    assert _positions(core.tick(1.6), "d") == []
    assert _positions(core.tick(2.6), "d") == [0]    # the latest place, once the interval passed
    assert _positions(core.tick(4.0), "d") == []     # unchanged: nothing more


def test_an_upscaler_no_worker_has_is_refused_at_once_naming_the_field():
    """Workers report the upscaler names they hold (Telemetry.upscalers): a named upscaler none
    of them has is answered before queueing, with errors[] on the client's own field."""
    core = _core()
    _register(core, "w-0", 0.0, capabilities=["txt2img", "upscale"],
              telemetry=W.Telemetry(upscalers=["realesrgan", "tiny-esrgan"]))
    [reply] = _finals(_submit(core, "bicubic", 1.0, upscale_factor=2.0, upscale_method="bicubic"))
    assert reply["error_code"] == C.UNSUPPORTED_FEATURE
    message = "unknown upscaler 'bicubic'; this pool has: lanczos, realesrgan, tiny-esrgan"
    assert reply["errors"] == [{"field": "upscale_method", "message": message}]
    assert core.status(1.0)["broker"]["queue_depth"] == 0
    # names the pool has, the default's aliases, lanczos and paths (only the worker can look
    # for a file) are queued
    for rid, method in (("named", "tiny-esrgan"), ("alias", "Real-ESRGAN"), ("built-in", "lanczos"),
                        ("path", "upscalers/other.safetensors")):
        assert _finals(_submit(core, rid, 1.0, upscale_factor=2.0, upscale_method=method)) == [], rid
    # no upscaling asked: the method is not used, so not judged
    assert _finals(_submit(core, "unused", 1.0, upscale_method="bicubic")) == []


def test_a_worker_that_reports_no_upscalers_is_not_judged():
    core = _core()
    _register(core, "sim-0", 0.0, capabilities=["txt2img", "upscale"])  # telemetry without the list
    assert _finals(_submit(core, "any", 1.0, upscale_factor=2.0, upscale_method="bicubic")) == []
