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


def _next(router, kinds: tuple[type, ...], timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if router.poll(50):
            identity, frame = router.recv_multipart()
            msg = W.decode_from_worker(frame)
            if isinstance(msg, W.WorkerHeartbeat):   # play the broker's part: a worker with a
                router.send_multipart([identity, W.encode(W.BrokerHeartbeat())])  # silent broker reconnects
            if isinstance(msg, kinds):
                return identity, msg
    raise AssertionError(f"no {kinds} from the worker")


def test_worker_transport_end_to_end(cluster):
    router = cluster.ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"ipc://{cluster.tmp}/be")
    proc = cluster.start_worker("tw", step_s=0.1, backend=f"ipc://{cluster.tmp}/be")
    identity, ready = _next(router, (W.Ready,))
    assert ready.v == W.PROTOCOL_VERSION and ready.worker_id == "tw" and ready.simulated
    router.send_multipart([identity, W.encode(W.BrokerHeartbeat(registered=True))])

    job = Job(request_id="j1", prompt="p", models=ModelSpec(base="m"), width=256, height=256,
              steps=3, stream=True).to_wire()
    router.send_multipart([identity, W.encode(W.RunJob(request_id="j1", attempt=1, dispatch_id=77, job=job))])
    stages = []
    while True:
        _, msg = _next(router, (W.JobProgress, W.JobResult))
        assert msg.dispatch_id == 77
        if isinstance(msg, W.JobResult):
            break
        stages.append(msg.stage)
    assert stages[0] == "loading" and stages.count("denoising") == 3
    assert msg.data["generated_images"][0]["width"] == 256

    # a long job: heartbeats keep coming while it runs, and ABORT stops it
    long_job = dict(job, request_id="j2", steps=100, stream=False)
    router.send_multipart([identity, W.encode(W.RunJob(request_id="j2", attempt=1, dispatch_id=78, job=long_job))])
    beats = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        _, msg = _next(router, (W.WorkerHeartbeat,))
        beats += 1
        busy = msg.busy
    assert beats >= 3 and busy is True
    router.send_multipart([identity, W.encode(W.AbortJob(request_id="j2", dispatch_id=78, reason="cancelled"))])
    _, err = _next(router, (W.JobFailed,), timeout_s=2.0)
    assert err.code == "cancelled" and err.dispatch_id == 78

    router.send_multipart([identity, W.encode(W.Manage(op_id=5, op=W.MANAGE_CLEANUP))])
    _, reply = _next(router, (W.ManageReply,))
    assert reply.success and reply.data["unloaded"] == ["m"]

    router.send_multipart([identity, W.encode(W.Disconnect(reason="test: come back"))])
    identity, ready = _next(router, (W.Ready,))       # reconnects and registers again
    assert ready.worker_id == "tw"
    router.send_multipart([identity, W.encode(W.Disconnect(fatal=True, reason="test: go away"))])
    assert proc.wait(timeout=10) == 1
