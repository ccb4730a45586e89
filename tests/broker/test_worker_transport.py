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


def test_abort_of_a_queued_job_cancels_it_without_touching_the_running_one(cluster):
    """JOB j2 runs, j3 waits behind it on the busy thread's queue; an ABORT for j3 (received by
    the IO thread) cancels j3 before it starts while j2 goes on; an ABORT for a job the worker
    does not hold changes nothing; the heartbeat counts both outcomes."""
    router = cluster.ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"ipc://{cluster.tmp}/be2")
    cluster.start_worker("tq", step_s=0.05, backend=f"ipc://{cluster.tmp}/be2")
    identity, _ = _next(router, (W.Ready,))
    router.send_multipart([identity, W.encode(W.BrokerHeartbeat(registered=True))])
    job = Job(request_id="j2", prompt="p", models=ModelSpec(base="m"), width=256, height=256,
              steps=60, stream=True).to_wire()
    router.send_multipart([identity, W.encode(W.RunJob(request_id="j2", attempt=1, dispatch_id=1, job=job))])
    router.send_multipart([identity, W.encode(W.RunJob(request_id="j3", attempt=1, dispatch_id=2,
                                                       job=dict(job, request_id="j3", steps=2)))])
    _, progress = _next(router, (W.JobProgress,))
    assert progress.request_id == "j2"
    router.send_multipart([identity, W.encode(W.AbortJob(request_id="j3", dispatch_id=2))])
    router.send_multipart([identity, W.encode(W.AbortJob(request_id="nobody", dispatch_id=9))])
    finals = []
    while len(finals) < 2:
        _, msg = _next(router, (W.JobResult, W.JobFailed), timeout_s=30.0)
        finals.append(msg)
    assert isinstance(finals[0], W.JobResult) and finals[0].request_id == "j2"   # ran to the end
    assert isinstance(finals[1], W.JobFailed) and finals[1].request_id == "j3"
    assert finals[1].code == "cancelled" and "before it started" in finals[1].message
    _, beat = _next(router, (W.WorkerHeartbeat,))
    assert (beat.jobs_done, beat.jobs_failed, beat.busy) == (1, 1, False)


def test_job_book_keeps_both_threads_views_consistent():
    from gpu_worker.transport import _JobBook

    book = _JobBook()
    assert book.abort(("a", 1)) is False          # not held: nothing to abort, nothing kept
    book.hold(("a", 1))
    book.hold(("b", 2))
    book.start(("a", 1))
    book.step(3)
    assert book.snapshot() == (("a", 1), 3, 0, 0)
    book.abort_all()                              # a reconnect: every held job is aborted
    assert book.is_aborted(("a", 1)) and book.is_aborted(("b", 2))
    book.finish(("a", 1), ok=False)
    assert book.snapshot() == (None, 0, 0, 1) and not book.is_aborted(("a", 1))
    book.finish(("b", 2), ok=True)
    assert book.snapshot() == (None, 0, 1, 1) and book.abort(("b", 2)) is False


def test_a_group_sent_together_runs_as_one_call_and_an_abort_drops_only_its_job(cluster):
    """Dynamic batching in the transport (with the SIMULATED executor's batched call): the jobs
    of a RunJob.batch_of group arriving in separate reads still run as one call; an ABORT of
    one of them answers it cancelled while the others finish; an incompatible job runs alone."""
    router = cluster.ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"ipc://{cluster.tmp}/be-batch")
    cluster.start_worker("tb", "--max-batch", "4", step_s=0.05, backend=f"ipc://{cluster.tmp}/be-batch")
    identity, ready = _next(router, (W.Ready,))
    assert ready.max_batch == 4
    router.send_multipart([identity, W.encode(W.BrokerHeartbeat(registered=True))])

    def job(rid: str, steps: int = 20) -> dict:
        return Job(request_id=rid, prompt=f"prompt of {rid}", models=ModelSpec(base="m"), width=256,
                   height=256, steps=steps, seed=len(rid), stream=True).to_wire()
    for index, rid in enumerate(("g1", "g2", "g3")):
        router.send_multipart([identity, W.encode(W.RunJob(request_id=rid, attempt=1, dispatch_id=10 + index,
                                                            job=job(rid), batch_of=3))])
        time.sleep(0.05)   # separate reads of the worker's socket
    router.send_multipart([identity, W.encode(W.RunJob(request_id="odd", attempt=1, dispatch_id=20,
                                                        job=job("odd", steps=3)))])
    finals: dict = {}
    while len(finals) < 4:
        _, msg = _next(router, (W.JobProgress, W.JobResult, W.JobFailed))
        if isinstance(msg, W.JobProgress) and msg.request_id == "g2" and msg.step == 2:
            router.send_multipart([identity, W.encode(W.AbortJob(request_id="g2", dispatch_id=11))])
        elif not isinstance(msg, W.JobProgress):
            finals[msg.request_id] = msg
    assert isinstance(finals["g2"], W.JobFailed) and finals["g2"].code == "cancelled"
    for rid in ("g1", "g3"):
        assert isinstance(finals[rid], W.JobResult)
        batch = finals[rid].data["processing_metrics"]["batch"]
        assert batch["jobs"] == 3 and batch["request_ids"] == ["g1", "g2", "g3"]
        assert finals[rid].data["generated_images"][0]["seed"] == len(rid)
    assert "batch" not in finals["odd"].data["processing_metrics"]


def test_batch_window_waits_for_a_companion_and_no_window_runs_a_lone_job_at_once(cluster):
    """--batch-window-ms: a job about to run waits that long for compatible jobs that arrive
    later (no batch_of group); without a window (the default) it starts alone at once."""
    for window_ms, together in (("400", True), ("0", False)):
        router = cluster.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(f"ipc://{cluster.tmp}/be-window-{window_ms}")
        cluster.start_worker(f"tw{window_ms}", "--max-batch", "4", "--batch-window-ms", window_ms,
                             step_s=0.02, backend=f"ipc://{cluster.tmp}/be-window-{window_ms}")
        identity, _ = _next(router, (W.Ready,))
        router.send_multipart([identity, W.encode(W.BrokerHeartbeat(registered=True))])
        for index, rid in enumerate(("first", "late")):
            job = Job(request_id=rid, prompt=rid, models=ModelSpec(base="m"), width=256, height=256,
                      steps=3, seed=index).to_wire()
            router.send_multipart([identity, W.encode(W.RunJob(request_id=rid, attempt=1,
                                                                dispatch_id=30 + index, job=job))])
            time.sleep(0.15)
        results = {}
        while len(results) < 2:
            _, msg = _next(router, (W.JobResult,))
            results[msg.request_id] = msg
        batched = ["batch" in r.data["processing_metrics"] for r in results.values()]
        assert batched == [together, together], (window_ms, results)
        router.close(0)
