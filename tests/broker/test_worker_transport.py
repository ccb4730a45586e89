"""A real `sdxl-broker worker --sim` process driven by a hand-held backend ROUTER: JOB ->
PROGRESS/RESULT with the dispatch id echoed, ABORT -> ERROR cancelled while heartbeats go on,
MANAGE, reconnect on DISCONNECT, exit on a fatal refusal."""

from __future__ import annotations

import time

import pytest
import zmq

from protocol import worker_protocol as W
from protocol.job import Job, ModelSpec

pytestmark = pytest.mark.slow


def _next(router, kinds, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if router.poll(50):
            identity, frame = router.recv_multipart()
            msg = W.unpack(frame)
            if msg["t"] == W.HEARTBEAT:   # play the broker's part: a worker with a silent
                router.send_multipart([identity, W.pack(W.HEARTBEAT)])  # broker reconnects
            if msg["t"] in kinds:
                return identity, msg
    raise AssertionError(f"no {kinds} from the worker")


def test_worker_transport_end_to_end(cluster):
    router = cluster.ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"ipc://{cluster.tmp}/be")
    proc = cluster.start_worker("tw", step_s=0.1, backend=f"ipc://{cluster.tmp}/be")
    identity, ready = _next(router, {W.READY})
    assert ready["v"] == W.PROTOCOL_VERSION and ready["worker_id"] == "tw" and ready["simulated"]
    router.send_multipart([identity, W.pack(W.HEARTBEAT, registered=True)])

    job = Job(request_id="j1", prompt="p", models=ModelSpec(base="m"), width=256, height=256,
              steps=3, stream=True).to_wire()
    router.send_multipart([identity, W.pack(W.JOB, request_id="j1", attempt=1, dispatch_id=77, job=job)])
    stages = []
    while True:
        _, msg = _next(router, {W.PROGRESS, W.RESULT})
        assert msg["dispatch_id"] == 77
        if msg["t"] == W.RESULT:
            break
        stages.append(msg["stage"])
    assert stages[0] == "loading" and stages.count("denoising") == 3
    assert msg["data"]["generated_images"][0]["width"] == 256

    # a long job: heartbeats keep coming while it runs, and ABORT stops it
    long_job = dict(job, request_id="j2", steps=100, stream=False)
    router.send_multipart([identity, W.pack(W.JOB, request_id="j2", attempt=1, dispatch_id=78, job=long_job)])
    beats = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        _, msg = _next(router, {W.HEARTBEAT})
        beats += 1
        busy = msg["busy"]
    assert beats >= 3 and busy is True
    router.send_multipart([identity, W.pack(W.ABORT, request_id="j2", dispatch_id=78, reason="cancelled")])
    _, err = _next(router, {W.ERROR}, timeout_s=2.0)
    assert err["code"] == "cancelled" and err["dispatch_id"] == 78

    router.send_multipart([identity, W.pack(W.MANAGE, op_id=5, op=W.MANAGE_CLEANUP, args={"models": None})])
    _, reply = _next(router, {W.MANAGE_REPLY})
    assert reply["success"] and reply["data"]["unloaded"] == ["m"]

    router.send_multipart([identity, W.pack(W.DISCONNECT, reason="test: come back")])
    identity, ready = _next(router, {W.READY})       # reconnects and registers again
    assert ready["worker_id"] == "tw"
    router.send_multipart([identity, W.pack(W.DISCONNECT, fatal=True, reason="test: go away")])
    assert proc.wait(timeout=10) == 1
