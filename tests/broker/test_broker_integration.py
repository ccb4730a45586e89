"""The broker with real sockets and real (SIMULATED-executor) worker processes over ipc://."""

from __future__ import annotations

import os
import signal
import time

import pytest
import zmq

from broker_harness import flat_request

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("codec", ["json", "msgpack"])
def test_req_and_dealer_clients_each_codec(cluster, codec):
    cluster.start_broker()
    cluster.start_worker("w1")
    cluster.wait_workers("w1")
    req = cluster.client(zmq.REQ)
    dealer = cluster.client(zmq.DEALER, delimiter=True)
    bare = cluster.client(zmq.DEALER, delimiter=False)   # DEALER sending just [body]

    req.send(flat_request(f"req-{codec}", stream=True), codec)
    dealer.send(flat_request(f"dealer-{codec}", stream=True), codec)
    bare.send(flat_request(f"bare-{codec}"), codec)

    req_msgs = [req.recv(10)]
    assert req_msgs[0]["final"] is True, "a REQ peer must get only the final reply"
    assert req_msgs[0]["success"], req_msgs[0]
    assert req_msgs[0]["message_type"] == "generate_sdxl_enhanced_response"
    assert req_msgs[0]["data"]["generated_images"][0]["width"] == 256

    dealer_msgs = []
    while not (dealer_msgs and dealer_msgs[-1]["final"]):
        msg = dealer.recv(10)
        assert msg is not None
        dealer_msgs.append(msg)
    stages = [m["stage"] for m in dealer_msgs[:-1]]
    assert stages[0] == "queued" and "denoising" in stages and stages[-1] == "postprocessing"
    steps = [m["step"] for m in dealer_msgs if m.get("stage") == "denoising"]
    assert steps == [1, 2, 3, 4]
    assert dealer_msgs[-1]["success"] and dealer_msgs[-1]["request_id"] == f"dealer-{codec}"

    bare_final = bare.recv_final()          # Client.recv asserts no delimiter frame mix-up
    assert bare_final["success"] and bare_final["request_id"] == f"bare-{codec}"
    assert bare.drain(0.2) == [] and dealer.drain(0.2) == []


def test_garbage_frames_then_valid_request(cluster):
    cluster.start_broker()
    cluster.start_worker("w1")
    cluster.wait_workers("w1")
    c = cluster.client(zmq.DEALER, delimiter=False)
    garbage = [b"", b"\x00\xff", b"not json", b"{broken", b"\xde\xad\xbe\xef", b"[1,2]",
               b'{"message_type": 5}', b"\x81\xa1a"]
    for i in range(1000):
        c.sock.send(garbage[i % len(garbage)] + (b"x" * (i % 3) if i % 8 == 2 else b""))
    replies = [c.recv(10) for _ in range(1000)]
    assert all(r is not None and r["final"] and not r["success"] for r in replies)
    codes = {r["error_code"] for r in replies}
    assert codes <= {"malformed_message", "unknown_message_type", "validation_error"}
    assert "malformed_message" in codes
    c.send(flat_request("after-garbage"))
    reply = c.recv_final()
    assert reply["success"] and reply["request_id"] == "after-garbage"


def test_kill_9_worker_mid_job_completes_elsewhere_with_one_reply(cluster):
    cluster.start_broker()
    procs = {wid: cluster.start_worker(wid, step_s=0.05) for wid in ("w1", "w2")}
    cluster.wait_workers("w1", "w2")
    c = cluster.client()
    c.send(flat_request("victim", steps=30))
    first = cluster.running_on("victim")
    time.sleep(0.3)
    procs[first].kill()
    reply = c.recv_final(20)
    assert reply["success"], reply
    other = "w2" if first == "w1" else "w1"
    assert reply["data"]["processing_metrics"]["worker_id"] == other
    assert c.drain(1.0) == []          # exactly one final reply
    assert cluster.worker_state(first) == "lost"


def test_sigstop_worker_declared_lost_and_late_result_dropped(cluster):
    cluster.start_broker()
    procs = {wid: cluster.start_worker(wid, step_s=0.05) for wid in ("w1", "w2")}
    cluster.wait_workers("w1", "w2")
    c = cluster.client()
    c.send(flat_request("frozen", steps=20))
    first = cluster.running_on("frozen")
    time.sleep(0.2)
    os.kill(procs[first].pid, signal.SIGSTOP)
    reply = c.recv_final(20)
    assert reply["success"]
    other = "w2" if first == "w1" else "w1"
    assert reply["data"]["processing_metrics"]["worker_id"] == other
    assert cluster.worker_state(first) == "lost"
    os.kill(procs[first].pid, signal.SIGCONT)   # it finishes its copy; the broker must drop it
    assert c.drain(2.0) == []
    cluster.wait_workers(first)                 # and it re-registers after it wakes up
    assert cluster.broker.status()["broker"]["completed"] == 1


def test_priorities_come_out_in_order(cluster):
    cluster.start_broker()
    cluster.start_worker("w1", step_s=0.05)
    cluster.wait_workers("w1")
    c = cluster.client()
    # two blockers fill the worker (1 running + 1 prefetched); the rest wait in the broker queue
    c.send(flat_request("block-1", steps=10))
    c.send(flat_request("block-2", steps=10))
    cluster.running_on("block-2")
    for rid, prio in [("low-1", "low"), ("normal-1", "normal"), ("high-1", "high"),
                      ("low-2", "low"), ("high-2", "high"), ("normal-2", "normal")]:
        c.send(flat_request(rid, steps=1, priority=prio))
    order = [c.recv_final(20)["request_id"] for _ in range(8)]
    assert order == ["block-1", "block-2", "high-1", "high-2", "normal-1", "normal-2",
                     "low-1", "low-2"]


def test_queue_full_while_no_worker_is_registered(cluster):
    cluster.start_broker(max_queue=2)   # no worker yet: jobs wait (the no-worker grace)
    c = cluster.client()
    c.send(flat_request("first"))
    c.send(flat_request("second"))
    c.send(flat_request("third"))
    full = c.recv(2)
    assert full["request_id"] == "third" and full["error_code"] == "queue_full"


def test_unroutable_jobs_are_refused_at_once_naming_what_is_missing(cluster):
    # issue 15: they used to wait out their timeout and be answered `timeout`
    cluster.start_broker()
    cluster.start_worker("basic", "--sim-capabilities", "txt2img")
    cluster.wait_workers("basic")
    c = cluster.client()
    c.send(flat_request("needs-refiner", model_refiner="tiny-sdxl-refiner"))
    c.send(flat_request("too-big", width=2048, height=2048))
    replies = {r["request_id"]: r for r in (c.recv_final(5), c.recv_final(5))}
    assert replies["needs-refiner"]["error_code"] == "unsupported_feature"
    assert "no worker offers feature refiner" in replies["needs-refiner"]["error"]
    assert replies["too-big"]["error_code"] == "unsupported_feature"
    assert "largest worker has 8000 MB" in replies["too-big"]["error"]


def test_running_timeout_aborts_the_worker(cluster):
    cluster.start_broker()
    cluster.start_worker("w1", step_s=0.1)
    cluster.wait_workers("w1")
    c = cluster.client()
    started = time.monotonic()
    c.send(flat_request("slow", steps=100, timeout=1))
    reply = c.recv_final(5)
    assert reply["error_code"] == "timeout" and "running on worker w1" in reply["error"]
    # it ran 1 s, longer than the 0.6 s liveness window: heartbeats went on meanwhile
    assert cluster.worker_state("w1") != "lost"
    c.send(flat_request("next", steps=2))
    assert c.recv_final(5)["success"]
    # the aborted job (10 s of steps) was stopped: the next one did not wait behind it
    assert time.monotonic() - started < 5


def test_cancel_queued_and_running(cluster):
    """The submitting DEALER cancels its own queued and running jobs on the same socket (the
    owner without CURVE); another connection is refused and the job goes on."""
    cluster.start_broker()
    cluster.start_worker("w1", step_s=0.1)
    cluster.wait_workers("w1")
    c, other = cluster.client(), cluster.client(zmq.REQ)
    c.send(flat_request("run-a", steps=100))
    c.send(flat_request("pre-b", steps=2))
    c.send(flat_request("queued-c", steps=2))
    cluster.running_on("pre-b")
    other.send({"message_type": "cancel_request", "request_id": "other-c", "data": {"request_id": "queued-c"}})
    refused = other.recv(5)
    assert refused["success"] is False and refused["error_code"] == "forbidden", refused

    def finals(count: int) -> dict[str, dict]:
        replies = [c.recv_final(5) for _ in range(count)]
        return {r["request_id"]: r for r in replies}

    c.send({"message_type": "cancel_request", "request_id": "cancel-c", "data": {"request_id": "queued-c"}})
    got = finals(2)
    resp = got["cancel-c"]
    assert resp["message_type"] == "cancel_response" and resp["success"], resp
    assert resp["data"]["state"] == "queued"
    assert got["queued-c"]["error_code"] == "cancelled"

    c.send({"message_type": "cancel_request", "request_id": "cancel-a", "data": {"request_id": "run-a"}})
    got = finals(2)
    assert got["cancel-a"]["data"]["state"] == "running"
    assert got["run-a"]["error_code"] == "cancelled"
    reply_b = c.recv_final(5)   # the worker stopped run-a, so the prefetched job runs now
    assert reply_b["request_id"] == "pre-b" and reply_b["success"]
    c.send({"message_type": "cancel_request", "request_id": "cancel-a2", "data": {"request_id": "run-a"}})
    assert c.recv_final(5)["success"] is False
    assert c.drain(0.3) == []


def test_dedupe_attach_stored_and_different_body(cluster):
    cluster.start_broker()
    cluster.start_worker("w1", step_s=0.05)
    cluster.wait_workers("w1")
    a, b, late, other = (cluster.client() for _ in range(4))
    body = flat_request("same-id", steps=10)
    a.send(body)
    cluster.running_on("same-id")
    b.send(body, "msgpack")                      # attaches: no second job
    ra, rb = a.recv_final(), b.recv_final()
    assert ra["success"] and rb["success"]
    assert ra["data"]["generated_images"] == rb["data"]["generated_images"]
    late.send(body)                              # after it finished: the stored reply
    rl = late.recv_final(5)
    assert rl["data"]["generated_images"] == ra["data"]["generated_images"]
    other.send(flat_request("same-id", steps=11))  # different body
    assert other.recv_final(5)["error_code"] == "duplicate_request_id"
    status = cluster.broker.status()
    assert status["broker"]["completed"] == 1 and status["workers"][0]["jobs_done"] == 1


def test_management_messages(cluster):
    cluster.start_broker()
    cluster.start_worker("w1")
    cluster.wait_workers("w1")
    c = cluster.client(zmq.REQ)
    c.send({"message_type": "initialize", "request_id": "init"})
    init = c.recv(5)
    assert init["message_type"] == "initialize_response" and init["data"]["ready"] is True
    assert init["data"]["devices"][0]["worker_id"] == "w1"
    assert {"DPM++ 2M SDE Karras", "Euler a Karras", "LCM", "EulerDiscreteScheduler"} <= set(init["data"]["schedulers"])

    c.send({"message_type": "model_load_request", "request_id": "load",
            "data": {"model_name": "tiny-sdxl"}})
    load = c.recv(10)
    assert load["message_type"] == "model_load_response" and load["success"], load
    assert load["data"]["worker_id"] == "w1"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:   # telemetry arrives with the next heartbeat
        c.send({"message_type": "status_request", "request_id": "st"})
        status = c.recv(5)
        if status["data"]["workers"][0]["models_loaded"] == ["tiny-sdxl"]:
            break
    row = status["data"]["workers"][0]
    assert status["message_type"] == "status_response"
    assert row["models_loaded"] == ["tiny-sdxl"] and row["state"] == "idle"
    assert set(row["memory"]) >= {"total_mb", "used_mb", "free_mb"} and row["pid"] > 0
    assert set(status["data"]["broker"]) >= {"uptime_s", "queue_depth", "inflight", "completed", "failed"}

    c.send({"message_type": "cleanup", "request_id": "clean"})
    clean = c.recv(5)
    assert clean["message_type"] == "cleanup_response" and clean["success"], clean
    assert clean["data"]["workers"]["w1"]["unloaded"] == ["tiny-sdxl"]


def test_broker_killed_and_restarted_resend_gets_result(cluster):
    """`sdxl-broker broker` as a subprocess with --state-dir, killed -9 mid-job and restarted."""
    import subprocess
    from broker_harness import SDXL_BROKER

    state_dir = os.path.join(cluster.tmp, "state")
    argv = [SDXL_BROKER, "broker", "--frontend", cluster.frontend, "--backend", cluster.backend,
            "--state-dir", state_dir, "--heartbeat-interval-s", "0.2"]

    def start_broker() -> subprocess.Popen:
        log = open(os.path.join(cluster.tmp, "broker.log"), "ab")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log)
        cluster.procs.append(proc)
        line = proc.stdout.readline().decode()
        assert line.startswith("ready "), line
        return proc

    broker = start_broker()
    cluster.start_worker("w1", step_s=0.1)
    c = cluster.client()
    body = flat_request("survivor", steps=15)
    c.send(body)
    time.sleep(1.0)                     # accepted and running on w1 (1.5 s of steps)
    broker.kill()
    broker.wait()
    assert c.recv(0.1) is None
    start_broker()                      # same state dir: the job is queued again
    late = cluster.client()
    late.send(body)                     # resend: attaches (still running) or stored reply
    reply = late.recv_final(20)
    assert reply["success"] and reply["request_id"] == "survivor", reply
    late.send({"message_type": "status_request", "request_id": "st"})
    status = late.recv(5)
    assert status["data"]["broker"]["queue_depth"] == 0
    assert status["data"]["workers"][0]["worker_id"] == "w1"   # the worker re-registered


def test_oversized_frame_dropped_and_broker_keeps_serving(cluster):
    cluster.start_broker(max_message_mb=1)
    big, small = cluster.client(), cluster.client(zmq.REQ)
    big.sock.send_multipart([b"", b"{" + b" " * (2 * 2**20) + b"}"])
    assert big.recv(1.0) is None                     # dropped by the socket, never answered
    small.send({"message_type": "status_request", "request_id": "st"})
    assert small.recv(5)["success"] is True
    small.send({"message_type": "model_load_request", "request_id": "ld",
                "data": {"model_name": "tiny-sdxl", "device": "cuda:7"}})
    reply = small.recv(5)
    assert reply["error_code"] == "validation_error" and "cuda:7" in reply["error"]


def test_stop_without_journal_answers_open_jobs(cluster):
    cluster.start_broker()
    c = cluster.client()
    c.send(flat_request("never-runs"))      # no worker: stays queued
    time.sleep(0.2)
    cluster.broker.stop()
    reply = c.recv_final(5)
    assert reply["error_code"] == "internal_error" and "stopped" in reply["error"]
    cluster.broker = None


def test_second_broker_on_a_used_endpoint_fails_cleanly(cluster):
    from broker.server import Broker, BrokerConfig
    cluster.start_broker(backend="tcp://127.0.0.1:*")
    taken = cluster.broker.backend_endpoint            # tcp://127.0.0.1:<port>
    clash = Broker(BrokerConfig(frontend="tcp://127.0.0.1:*", backend=taken))
    with pytest.raises(zmq.ZMQError):
        clash.start()
    assert clash._ctx is None and clash.journal is None   # nothing left bound or open


def test_smart_routing_sends_jobs_to_the_warm_worker(cluster):
    cluster.start_broker()
    for wid in ("w1", "w2"):
        cluster.start_worker(wid, load_s=1.0, step_s=0.01)
    cluster.wait_workers("w1", "w2")
    c = cluster.client()
    c.send(flat_request("first-a", model_base="model-a"))
    warm_a = c.recv_final(10)["data"]["processing_metrics"]["worker_id"]
    time.sleep(0.5)                      # a heartbeat tells the broker model-a is loaded there
    for i in range(3):
        c.send(flat_request(f"again-a-{i}", model_base="model-a"))
        assert c.recv_final(10)["data"]["processing_metrics"]["worker_id"] == warm_a
    c.send(flat_request("first-b", model_base="model-b"))
    # both idle: the cold one (fewer models) takes model-b, leaving model-a warm where it is
    assert c.recv_final(10)["data"]["processing_metrics"]["worker_id"] != warm_a


def test_queue_time_counts_the_wait_behind_a_job_on_the_worker(cluster):
    cluster.start_broker()
    cluster.start_worker("w1", step_s=0.05)
    cluster.wait_workers("w1")
    c = cluster.client()
    started = time.monotonic()
    c.send(flat_request("first", steps=10))    # runs ~0.5 s
    c.send(flat_request("second", steps=2))    # prefetched onto the same worker, waits for it
    replies = {r["request_id"]: r for r in (c.recv_final(20), c.recv_final(20))}
    elapsed_s = time.monotonic() - started
    first = replies["first"]["data"]["processing_metrics"]
    second = replies["second"]["data"]["processing_metrics"]
    # the second job waited at least the first one's run, though it left the broker at once
    assert second["queue_time"] >= first["total_time"] * 0.9
    # queue + worker time adds up to what the caller saw (transport is milliseconds)
    assert second["queue_time"] + second["total_time"] <= elapsed_s
    assert second["queue_time"] + second["total_time"] >= elapsed_s - 0.5


def test_queue_position_is_sent_again_as_the_queue_moves(cluster):
    # issue 15: it used to be sent once, at acceptance; real sockets, a simulated worker
    cluster.start_broker(max_jobs_per_worker=1)
    cluster.start_worker("w1", step_s=0.05)
    cluster.wait_workers("w1")
    c = cluster.client()
    for rid in ("p1", "p2", "p3"):
        c.send(flat_request(rid, steps=30, stream=True))   # 1.5 s each
    seen: dict[str, list] = {}
    finals = 0
    while finals < 3:
        message = c.recv(15)
        assert message is not None, seen
        if message.get("final"):
            assert message["success"], message
            finals += 1
        elif message["stage"] == "queued":
            seen.setdefault(message["request_id"], []).append(message["queue_position"])
    # p3 waited behind p1 and p2 and heard its place go down, once per change
    assert seen["p3"][0] >= 1 and seen["p3"][-1] == 0, seen
    assert seen["p3"] == sorted(set(seen["p3"]), reverse=True), seen
