"""No job is lost silently when its worker goes away: every path where a worker holding jobs
(the running one and the prefetched one) re-registers, goes silent and comes back, or says
DISCONNECT ends with exactly one final reply per job. Driven by hand from fake worker DEALERs
(no subprocess), so each interleaving is deterministic."""

from __future__ import annotations

import time

import zmq

from protocol import worker_protocol as W
from broker_harness import flat_request

from test_backend_protocol import _ready, _recv_until

# fake workers here do not heart-beat: a slow liveness keeps them registered for the whole
# test, so only the event under test (a READY, a DISCONNECT) can move their jobs
SLOW_HEARTBEAT_S = 2.0


def _worker(cluster, worker_id: str) -> zmq.Socket:
    sock = cluster.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.backend)
    _ready(sock, worker_id)
    assert _recv_until(sock, W.BrokerHeartbeat).registered is True
    return sock


def _take_jobs(sock, count: int, timeout_s: float = 5.0) -> dict[str, W.RunJob]:
    """request_id -> JOB message, for the next `count` JOBs sent to this fake worker."""
    jobs = {}
    deadline = time.monotonic() + timeout_s
    while len(jobs) < count and time.monotonic() < deadline:
        msg = _recv_until(sock, W.RunJob, max(deadline - time.monotonic(), 0.1))
        jobs[msg.request_id] = msg
    assert len(jobs) == count, f"expected {count} JOBs, got {sorted(jobs)}"
    return jobs


def _result(sock, job: W.RunJob) -> None:
    sock.send(W.encode(W.JobResult(request_id=job.request_id, dispatch_id=job.dispatch_id,
                                   data={"generated_images": []}, execution_time=0.01)))


def _finals(client, count: int, window_s: float = 1.0, timeout_s: float = 8.0) -> dict[str, list[dict]]:
    """Every final reply the client gets until `count` request ids are answered and then
    `window_s` passes quietly (so a duplicate would be seen)."""
    finals: dict[str, list[dict]] = {}
    deadline = time.monotonic() + timeout_s
    while len(finals) < count and time.monotonic() < deadline:
        msg = client.recv(max(deadline - time.monotonic(), 0.05))
        if msg is not None and msg.get("final"):
            finals.setdefault(msg["request_id"], []).append(msg)
    for msg in client.drain(window_s):
        if msg.get("final"):
            finals.setdefault(msg["request_id"], []).append(msg)
    return finals


def _answer_and_expect_one_success_each(worker, jobs: dict, client) -> dict[str, list[dict]]:
    """The worker answers every job; "a" and "b" each get exactly one final reply, a success."""
    for job in jobs.values():
        _result(worker, job)
    finals = _finals(client, 2)
    assert sorted(finals) == ["a", "b"], finals
    assert all(len(replies) == 1 and replies[0]["success"] for replies in finals.values()), finals
    return finals


def _submit(cluster, *rids: str):
    client = cluster.client()
    for rid in rids:
        client.send(flat_request(rid))
    return client


def test_ready_again_from_a_new_socket_requeues_running_and_prefetched_jobs(cluster):
    """A restarted worker process with the same stable id (serve's sim-0): its READY is ignored
    while the old connection is live (a worker id is bound to the connection that registered
    it, so a rogue cannot take it); once the old one is lost, both its jobs are re-run on the
    new registration, the old process's late answers are discarded, each client gets one
    final reply."""
    cluster.start_broker(heartbeat_interval_s=SLOW_HEARTBEAT_S)
    old = _worker(cluster, "sim-0")
    client = _submit(cluster, "a", "b")
    first = _take_jobs(old, 2)                      # one running, one in the prefetch slot
    new = cluster.ctx.socket(zmq.DEALER)            # same id, new DEALER identity
    new.setsockopt(zmq.LINGER, 0)
    new.connect(cluster.backend)
    _ready(new, "sim-0")
    assert not new.poll(500)                        # ignored while the old connection is live
    # the old process is gone (it no longer heart-beats): once it is declared lost, the new
    # one's next READY (a real worker sends it after its own liveness timeout) registers
    deadline = time.monotonic() + 10
    while cluster.worker_state("sim-0") != "lost" and time.monotonic() < deadline:
        time.sleep(0.05)
    _ready(new, "sim-0")
    assert _recv_until(new, W.BrokerHeartbeat).registered is True
    second = _take_jobs(new, 2)
    for rid in ("a", "b"):
        assert second[rid].dispatch_id != first[rid].dispatch_id
        assert second[rid].attempt == 2
    for job in first.values():                      # the old process answers late
        _result(old, job)
    time.sleep(0.3)
    assert client.drain(0.2) == []                  # its answers reached nobody
    _answer_and_expect_one_success_each(new, second, client)
    status = cluster.broker.status()
    assert status["broker"]["inflight"] == 0 and status["broker"]["queue_depth"] == 0
    old.close(0)
    new.close(0)


def test_ready_again_from_the_same_socket_requeues_its_jobs(cluster):
    """A READY from an identity that is registered and holds jobs (a worker that restarted its
    transport in place): its jobs are re-dispatched with new dispatch ids, answers to the old
    dispatch are discarded."""
    cluster.start_broker(heartbeat_interval_s=SLOW_HEARTBEAT_S)
    w = _worker(cluster, "w")
    client = _submit(cluster, "a", "b")
    first = _take_jobs(w, 2)
    _ready(w, "w")
    second = _take_jobs(w, 2)
    for job in first.values():
        _result(w, job)
    assert client.drain(0.4) == []
    _answer_and_expect_one_success_each(w, second, client)
    w.close(0)


def test_silent_worker_lost_then_back_reruns_its_jobs_once(cluster):
    """The SIGSTOP/SIGCONT case: the stopped worker is declared lost with a running and a
    prefetched job; both are re-queued; when it wakes up its late RESULTs are discarded, the
    broker tells it to register again, and the jobs then run on it exactly once more."""
    cluster.start_broker(max_attempts=2)
    w = _worker(cluster, "sim-0")
    client = _submit(cluster, "a", "b")
    first = _take_jobs(w, 2)
    deadline = time.monotonic() + 5.0               # stay silent until declared lost
    while cluster.worker_state("sim-0") != "lost" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.worker_state("sim-0") == "lost"
    status = cluster.broker.status()["broker"]
    assert status["queue_depth"] == 2 and status["inflight"] == 0   # re-queued, not dropped
    while w.poll(0):                                # what the broker sent while it "slept"
        w.recv()
    for job in first.values():                      # SIGCONT: the late answers come in
        _result(w, job)
    assert _recv_until(w, W.Disconnect).reason.startswith("not registered")
    _ready(w, "sim-0")
    second = _take_jobs(w, 2)
    assert {j.attempt for j in second.values()} == {2}
    _answer_and_expect_one_success_each(w, second, client)
    w.close(0)


def test_disconnect_with_jobs_requeues_them_to_another_worker(cluster):
    cluster.start_broker(heartbeat_interval_s=SLOW_HEARTBEAT_S)
    leaving = _worker(cluster, "leaving")
    client = _submit(cluster, "a", "b")
    _take_jobs(leaving, 2)
    other = _worker(cluster, "other")
    leaving.send(W.encode(W.Disconnect(reason="worker stopping")))
    second = _take_jobs(other, 2)
    _answer_and_expect_one_success_each(other, second, client)
    leaving.close(0)
    other.close(0)


def test_attempts_used_up_by_re_registrations_fail_with_worker_lost_once(cluster):
    """A worker that keeps re-registering while holding the job uses up max_attempts: the job
    then fails with worker_lost, once, and is not dispatched again."""
    cluster.start_broker(max_attempts=2, heartbeat_interval_s=SLOW_HEARTBEAT_S)
    w = _worker(cluster, "flaky")
    client = _submit(cluster, "a")
    first = _take_jobs(w, 1)["a"]
    _ready(w, "flaky")
    second = _take_jobs(w, 1)["a"]
    assert second.attempt == 2
    _ready(w, "flaky")
    finals = _finals(client, 1)
    assert len(finals["a"]) == 1 and finals["a"][0]["error_code"] == "worker_lost"
    _result(w, first)
    _result(w, second)
    assert client.drain(0.4) == []
    while w.poll(100):
        assert not isinstance(W.decode_from_broker(w.recv()), W.RunJob)
    w.close(0)


def test_pending_model_load_fails_fast_when_its_worker_re_registers(cluster):
    """A management op sent to the old process of a worker id will never be answered by the
    new one: it is answered worker_lost at the re-registration, not left to time out."""
    cluster.start_broker(heartbeat_interval_s=SLOW_HEARTBEAT_S)
    w = _worker(cluster, "mute")
    client = cluster.client()
    client.send({"message_type": "model_load_request", "request_id": "ld",
                 "data": {"model_name": "tiny-sdxl"}})
    _recv_until(w, W.Manage)
    _ready(w, "mute")                               # its transport restarted in place
    reply = client.recv_final(1.5)                  # well before the 6 s liveness expiry
    assert reply["message_type"] == "model_load_response" and reply["success"] is False
    assert reply["error_code"] == "worker_lost" and "mute" in reply["error"]
    w.close(0)


def test_a_failure_while_handling_a_lost_worker_does_not_strand_its_jobs(cluster):
    """The stress run's lost jobs: the worker was marked lost but its jobs stayed "running"
    for ever. Here the lost-worker handling raises part-way (a bug anywhere on that path);
    the orphan sweep still re-queues both jobs and they finish once each on another worker."""
    cluster.start_broker()
    broker = cluster.broker

    def broken(worker_id):
        raise RuntimeError("simulated bug while handling a lost worker")

    broker.metrics.heartbeat_missed = broken
    silent = _worker(cluster, "silent")
    client = _submit(cluster, "a", "b")
    _take_jobs(silent, 2)                           # then it never speaks again: lost after 0.6 s
    deadline = time.monotonic() + 5.0
    while cluster.worker_state("silent") != "lost" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.worker_state("silent") == "lost"
    assert cluster.broker.status()["broker"]["queue_depth"] == 2   # re-queued, not stranded
    helper = _worker(cluster, "helper")
    _answer_and_expect_one_success_each(helper, _take_jobs(helper, 2), client)
    silent.close(0)
    helper.close(0)
