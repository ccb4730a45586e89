"""BrokerCore without sockets: inputs are decoded messages and a time, outputs are what the loop
would send. Every path here also runs through real sockets in test_broker_integration.py and
test_lost_jobs.py; these pin the core's interface (what it sends, to whom, when)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from broker.core import BrokerConfig, BrokerCore, ClientRequest, ToClient, ToWorkers
from broker.journal import Journal, JournalError, MemoryJournal
from protocol import worker_protocol as W

from broker_harness import flat_request

CLIENT = (b"client-1", b"")


def _core(**config) -> BrokerCore:
    core = BrokerCore(BrokerConfig(**config), now=0.0, first_dispatch_id=100)
    assert core.open(MemoryJournal(), 0.0, wall_now=0.0) == []
    return core


def _submit(core, rid: str, now: float, **fields) -> list:
    body = json.dumps(flat_request(rid, **fields)).encode()
    return core.on_client(ClientRequest(CLIENT, body), now)


def _register(core, worker_id: str, now: float) -> bytes:
    identity = f"id-{worker_id}".encode()
    out = core.on_worker(identity, W.Ready(worker_id=worker_id, memory_total_mb=8000.0,
                                           capabilities=["txt2img"]), now)
    assert [(o.identities, o.message) for o in out] == [([identity], W.BrokerHeartbeat(registered=True))]
    return identity


def _to_workers(outputs, kind) -> list[tuple[list[bytes], W.Message]]:
    return [(o.identities, o.message) for o in outputs
            if isinstance(o, ToWorkers) and isinstance(o.message, kind)]


def _finals(outputs) -> list[dict]:
    return [o.message for o in outputs if isinstance(o, ToClient) and o.message.get("final")]


def test_a_job_is_dispatched_on_tick_and_its_result_is_the_one_final_reply():
    core = _core()
    w = _register(core, "w1", 0.0)
    assert _submit(core, "a", 1.0) == []          # accepted quietly (no stream)
    sent = _to_workers(core.tick(1.0), W.RunJob)
    assert len(sent) == 1 and sent[0][0] == [w]
    job = sent[0][1]
    assert (job.request_id, job.attempt, job.dispatch_id) == ("a", 1, 100)
    assert job.job["prompt"] == "a red cube"
    assert core.status(1.5)["broker"]["inflight"] == 1
    out = core.on_worker(w, W.JobResult(request_id="a", dispatch_id=100,
                                        data={"generated_images": [],
                                              "processing_metrics": {"total_time": 2.0}}), 4.0)
    [reply] = _finals(out)
    assert reply["success"] is True and reply["request_id"] == "a"
    # accepted at 1 s, answered at 4 s after 2 s on the worker: 1 s waiting
    assert reply["data"]["processing_metrics"]["queue_time"] == 1.0
    assert reply["execution_time"] == 3.0
    # a resend of the same body gets the stored reply; the worker holds nothing any more
    [again] = _finals(_submit(core, "a", 5.0))
    assert again["success"] is True
    assert core.status(5.0)["workers"][0]["current_jobs"] == []


def test_a_silent_worker_is_lost_on_tick_and_its_job_goes_to_the_next_worker():
    core = _core(heartbeat_interval_s=1.0, heartbeat_liveness=3, max_attempts=2)
    silent = _register(core, "silent", 0.0)
    _submit(core, "a", 0.0)
    assert _to_workers(core.tick(0.1), W.RunJob)[0][0] == [silent]
    beats = _to_workers(core.tick(1.0), W.BrokerHeartbeat)
    assert beats == [([silent], W.BrokerHeartbeat())]   # one message for every live worker
    helper = _register(core, "helper", 2.5)
    core.on_worker(helper, W.WorkerHeartbeat(), 3.0)
    out = core.tick(3.5)                                 # silent since 0.0: lost after 3 s
    assert {row["worker_id"]: row["state"] for row in core.status(3.5)["workers"]} == \
        {"silent": "lost", "helper": "busy"}
    [(to, job)] = _to_workers(out, W.RunJob)
    assert to == [helper] and job.attempt == 2 and job.dispatch_id == 101
    # the lost worker's late answer is refused and it is told to register again
    late = core.on_worker(silent, W.JobResult(request_id="a", dispatch_id=100), 4.0)
    assert _to_workers(late, W.Disconnect)[0][1].reason.startswith("not registered")
    assert _finals(late) == []


def test_progress_goes_to_a_streaming_client_and_only_for_the_current_dispatch():
    core = _core()
    w = _register(core, "w1", 0.0)
    queued = _submit(core, "s", 0.0, stream=True)
    assert [o.message["stage"] for o in queued] == ["queued"]
    core.tick(0.0)
    out = core.on_worker(w, W.JobProgress(request_id="s", dispatch_id=100, stage="denoising",
                                          step=2, total_steps=4), 1.0)
    assert [(o.message["stage"], o.message["step"]) for o in out] == [("denoising", 2)]
    assert core.on_worker(w, W.JobProgress(request_id="s", dispatch_id=99, stage="denoising",
                                           step=3, total_steps=4), 1.0) == []


def test_model_load_goes_to_one_worker_and_times_out_on_tick():
    core = _core()
    w = _register(core, "w1", 0.0)
    body = json.dumps({"message_type": "model_load_request", "request_id": "ld",
                       "data": {"model_name": "tiny-sdxl"}}).encode()
    [(to, manage)] = _to_workers(core.on_client(ClientRequest(CLIENT, body), 1.0), W.Manage)
    assert to == [w] and manage.op == W.MANAGE_LOAD_MODEL and manage.args.model_name == "tiny-sdxl"
    assert core.status(1.0)["workers"][0]["state"] == "loading"
    core.on_worker(w, W.WorkerHeartbeat(), 600.5)          # alive, but silent about the op
    [reply] = _finals(core.tick(601.5))
    assert reply["error_code"] == "timeout" and reply["success"] is False


def test_a_management_reply_completes_the_operation():
    core = _core()
    a, b = _register(core, "a", 0.0), _register(core, "b", 0.0)
    body = json.dumps({"message_type": "cleanup", "request_id": "cl"}).encode()
    [(to, manage)] = _to_workers(core.on_client(ClientRequest(CLIENT, body), 1.0), W.Manage)
    assert sorted(to) == sorted([a, b])               # one message, both workers
    assert core.on_worker(a, W.ManageReply(op_id=manage.op_id, success=True,
                                           data={"unloaded": ["m"]}), 2.0) == []
    [reply] = _finals(core.on_worker(b, W.ManageReply(op_id=manage.op_id, success=True,
                                                      data={"unloaded": []}), 3.0))
    assert reply["success"] is True and reply["data"]["workers"]["a"] == {"unloaded": ["m"]}


def test_a_ready_of_another_version_is_refused_with_a_fatal_disconnect():
    core = _core()
    out = core.on_worker(b"x", W.Ready(v=7, worker_id="future"), 0.0)
    [(to, msg)] = _to_workers(out, W.Disconnect)
    assert to == [b"x"] and msg.fatal and "version 7" in msg.reason
    assert core.status(0.0)["workers"] == []


def test_a_bug_in_a_handler_is_logged_and_the_core_keeps_working(caplog):
    core = _core()
    w = _register(core, "w1", 0.0)
    _submit(core, "a", 0.0)
    core.tick(0.0)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    core.metrics.job_finished = broken    # fails in the middle of finishing the job
    core.on_worker(w, W.JobResult(request_id="a", dispatch_id=100), 1.0)
    assert any("simulated bug" in r.getMessage() or r.exc_info for r in caplog.records)
    _submit(core, "b", 2.0)
    assert _to_workers(core.tick(2.0), W.RunJob)[0][1].request_id == "b"


def test_the_core_module_imports_no_zmq():
    code = "import sys, broker.core; print('zmq' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_queue_full_refuses_new_jobs_never_requeued_ones():
    core = _core(max_queue=2, heartbeat_interval_s=1.0, heartbeat_liveness=3)
    _submit(core, "a", 0.0)
    _submit(core, "b", 0.0)
    [full] = _finals(_submit(core, "c", 0.0))
    assert full["request_id"] == "c" and full["error_code"] == "queue_full"
    w = _register(core, "w", 0.0)
    assert len(_to_workers(core.tick(0.0), W.RunJob)) == 2       # a and b leave the queue
    _submit(core, "d", 0.5)
    _submit(core, "e", 0.5)
    core.tick(3.5)                                                # w silent: lost, a and b back
    assert core.status(3.5)["broker"]["queue_depth"] == 4          # past max_queue, none refused
    assert _finals(core.on_worker(w, W.Disconnect(), 3.6)) == []


def _register_batching(core, worker_id: str, now: float, max_batch: int) -> bytes:
    identity = f"id-{worker_id}".encode()
    core.on_worker(identity, W.Ready(worker_id=worker_id, memory_total_mb=8000.0,
                                     capabilities=["txt2img"], max_batch=max_batch), now)
    return identity


def test_compatible_queued_jobs_go_to_one_worker_together_up_to_its_max_batch():
    core = _core()
    for rid, fields in [("a", {}), ("odd", {"steps": 9}), ("b", {"prompt": "x", "seed": 5}),
                        ("c", {"batch_size": 2}), ("d", {}), ("e", {})]:
        _submit(core, rid, 0.0, **fields)
    w = _register_batching(core, "w1", 0.0, max_batch=4)
    sent = [m for _, m in _to_workers(core.tick(0.1), W.RunJob)]
    # a with its companions b, c (2 images), the rest of 4 images; then odd (the second slot)
    assert [(m.request_id, m.batch_of) for m in sent] == [("a", 3), ("b", 3), ("c", 3), ("odd", 1)]
    # the companions ride in a's call: the worker still has its prefetch slot, which odd took
    assert core.registry.get("w1").calls == 2
    # the companions count a share of their steps in the worker's backlog, no loads
    record = core.registry.get("w1")
    assert record.estimates["b"].total_s < record.estimates["a"].total_s
    for m in sent:
        core.on_worker(w, W.JobResult(request_id=m.request_id, dispatch_id=m.dispatch_id,
                                      data={"generated_images": []}), 1.0)
    sent = [m for _, m in _to_workers(core.tick(1.1), W.RunJob)]
    assert [(m.request_id, m.batch_of) for m in sent] == [("d", 2), ("e", 2)]
    # the worker says in each reply whether the job shared a call; /metrics counts those
    for m in sent:
        core.on_worker(w, W.JobResult(request_id=m.request_id, dispatch_id=m.dispatch_id, data={
            "generated_images": [{"index": 0}], "processing_metrics": {
                "worker_id": "w1", "batch": {"jobs": 2, "images": 2, "request_ids": ["d", "e"]}}}), 2.0)
    assert core.metrics.registry.get_sample_value("sdxl_broker_batched_jobs_total",
                                                  {"worker_id": "w1"}) == 2.0


def test_a_worker_without_batching_gets_one_job_per_slot_and_batches_are_shared_out():
    core = _core()
    for rid in "abcdefgh":
        _submit(core, rid, 0.0)
    _register(core, "plain", 0.0)   # READY without max_batch: 1
    sent = [m for _, m in _to_workers(core.tick(0.1), W.RunJob)]
    assert [(m.request_id, m.batch_of) for m in sent] == [("a", 1), ("b", 1)]
    # two batching workers and six compatible queued jobs: three each, not six and none
    core = _core()
    for rid in "abcdef":
        _submit(core, rid, 0.0)
    _register_batching(core, "w1", 0.0, max_batch=8)
    _register_batching(core, "w2", 0.0, max_batch=8)
    sent = _to_workers(core.tick(0.1), W.RunJob)
    by_worker: dict = {}
    for identities, m in sent:
        by_worker.setdefault(identities[0], []).append(m.batch_of)
    assert sorted(by_worker.values()) == [[3, 3, 3], [3, 3, 3]]


class _FailingJournal:
    """A real journal whose writes (and reads, when `reads` is set) raise JournalError while
    `failing` is set, as a full disk makes the SQLite journal do."""

    def __init__(self, journal):
        self.inner, self.failing, self.reads = journal, False, False

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        writes = name in ("accept", "finish", "expire")
        if not callable(attr) or not (writes or (self.reads and name in ("stored_reply", "recent"))):
            return attr

        def call(*args, **kwargs):
            if self.failing:
                raise JournalError(f"journal test.sqlite3 could not {name}: database or disk is full")
            return attr(*args, **kwargs)
        return call


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_a_failing_journal_refuses_new_jobs_and_keeps_replies_until_stored(kind, caplog):
    journal = _FailingJournal(Journal(None) if kind == "sqlite" else MemoryJournal())
    core = BrokerCore(BrokerConfig(state_dir="somewhere"), now=0.0, first_dispatch_id=100)
    core.open(journal, 0.0, wall_now=0.0)
    w = _register(core, "w1", 0.0)
    _submit(core, "a", 0.0)
    [run] = _to_workers(core.tick(0.1), W.RunJob)
    journal.failing = True
    # a new job cannot be journalled: unavailable at once, nothing queued
    [refused] = _finals(_submit(core, "b", 0.2))
    assert refused["error_code"] == "unavailable" and "test.sqlite3" in refused["error"]
    assert core.status(0.2)["broker"]["queue_depth"] == 0 and "b" not in core.jobs
    # the running job finishes: its reply goes out and is kept; a resend gets that one reply
    [reply] = _finals(core.on_worker(w, W.JobResult(request_id="a", dispatch_id=100, data={
        "generated_images": [{"seed": 7}], "processing_metrics": {}}), 1.0))
    assert reply["success"] is True
    assert core.status(1.0)["broker"]["unstored_replies"] == 1
    [again] = _finals(_submit(core, "a", 1.5))
    assert again == reply and not _to_workers(core.tick(1.5), W.RunJob)
    # timers keep running while retries and expiry fail; then the disk has room again
    core.tick(100.0)
    assert core.status(100.0)["broker"]["unstored_replies"] == 1
    journal.failing = False
    core.tick(103.0)
    assert core.status(103.0)["broker"]["unstored_replies"] == 0
    assert journal.inner.stored_reply("a").reply == reply
    assert journal.inner.counts()["jobs"] == 1 - 1   # the job row went with the stored reply
    _submit(core, "b", 104.0)    # accepted again now
    assert "b" in core.jobs
    # a reply still unstored when the broker stops is logged with what runs again
    journal.failing = True
    w2 = _register(core, "w2", 104.2)   # w1 went silent during the jump to 100 s
    [run_b] = _to_workers(core.tick(104.5), W.RunJob)
    core.on_worker(w2, W.JobResult(request_id="b", dispatch_id=run_b[1].dispatch_id, data={
        "generated_images": [], "processing_metrics": {}}), 105.0)
    core.close(106.0)
    assert "run again after a restart" in caplog.text and "b" in caplog.text


def test_a_failing_journal_read_answers_unavailable():
    journal = _FailingJournal(MemoryJournal())
    core = BrokerCore(BrokerConfig(), now=0.0)
    core.open(journal, 0.0, wall_now=0.0)
    journal.failing = journal.reads = True
    [refused] = _finals(_submit(core, "a", 0.1))
    assert refused["error_code"] == "unavailable"


def test_a_batch_companion_never_overtakes_a_job_of_higher_priority():
    core = _core()
    _submit(core, "high", 0.0, priority="high")
    _submit(core, "normal-odd", 0.0, priority="normal", steps=9)   # cannot share high's call
    _submit(core, "low", 0.0, priority="low")                      # could, but would overtake it
    _submit(core, "high-2", 0.0, priority="high")
    _register_batching(core, "w1", 0.0, max_batch=8)
    sent = [m for _, m in _to_workers(core.tick(0.1), W.RunJob)]
    assert [(m.request_id, m.batch_of) for m in sent] == [("high", 2), ("high-2", 2), ("normal-odd", 1)]
    # once nothing of higher priority waits behind, a lower-priority job may ride along
    core = _core()
    _submit(core, "high", 0.0, priority="high")
    _submit(core, "normal", 0.0, priority="normal")
    _register_batching(core, "w1", 0.0, max_batch=8)
    sent = [m for _, m in _to_workers(core.tick(0.1), W.RunJob)]
    assert [(m.request_id, m.batch_of) for m in sent] == [("high", 2), ("normal", 2)]


def test_timing_out_one_job_of_a_batch_aborts_only_that_one_and_the_others_complete():
    core = _core()
    _submit(core, "short", 0.0, timeout=5)
    _submit(core, "long-1", 0.0)
    _submit(core, "long-2", 0.0)
    w = _register_batching(core, "w1", 0.0, max_batch=4)
    sent = [m for _, m in _to_workers(core.tick(0.1), W.RunJob)]
    assert [(m.request_id, m.batch_of) for m in sent] == [("short", 3), ("long-1", 3), ("long-2", 3)]
    for t in (1.5, 3.0, 4.5):   # the worker stays alive
        core.on_worker(w, W.WorkerHeartbeat(busy=True, current_job="short", current_step=1), t)
    out = core.tick(5.5)
    aborts = [m for _, m in _to_workers(out, W.AbortJob)]
    assert [(m.request_id, m.reason) for m in aborts] == [("short", "timeout")]
    assert [r["error_code"] for r in _finals(out)] == ["timeout"]
    # the call went on for the others: their results are accepted
    for m in sent[1:]:
        [reply] = _finals(core.on_worker(w, W.JobResult(request_id=m.request_id, dispatch_id=m.dispatch_id,
                                                        data={"generated_images": []}), 6.0))
        assert reply["success"] is True and reply["request_id"] == m.request_id


def test_forged_answers_are_dropped_and_logged_once_a_minute_per_connection(caplog):
    """A rogue worker sending results for jobs it does not run (thousands in the stress run)
    cannot flood the log: the first per connection per minute is logged, the rest dropped."""
    core = _core()
    rogue = _register(core, "rogue", 0.0)
    caplog.set_level("INFO", logger="broker.server")   # the core logs under this name
    for n in range(50):
        out = core.on_worker(rogue, W.JobResult(request_id=f"forged-{n}", dispatch_id=7), 1.0 + n)
        assert not _finals(out)                         # nobody gets a forged reply
    for n in range(50):   # from a connection that never registered
        core.on_worker(b"stranger", W.JobResult(request_id=f"late-{n}", dispatch_id=7), 1.0 + n)
    logged = [r.getMessage() for r in caplog.records if "discarding" in r.getMessage()]
    assert len(logged) == 2, logged
    core.on_worker(rogue, W.JobResult(request_id="forged-again", dispatch_id=7), 61.5)
    logged = [r.getMessage() for r in caplog.records if "discarding" in r.getMessage()]
    assert len(logged) == 3 and "forged-again" in logged[-1]
