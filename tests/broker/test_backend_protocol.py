"""The backend worker protocol driven by hand from a fake worker DEALER (no subprocess):
version refusal, late RESULT from a lost worker discarded, re-registration after DISCONNECT."""

from __future__ import annotations

import time

import zmq

from protocol import worker_protocol as W
from broker_harness import flat_request


def _ready(sock, worker_id, version=W.PROTOCOL_VERSION):
    sock.send(W.encode(W.Ready(v=version, worker_id=worker_id, device="cpu", device_type="cpu",
                               memory_total_mb=8000.0, capabilities=["txt2img"],
                               worker_types=["sdxl_worker"])))


def _recv_until(sock, kind: type, timeout_s=5.0):
    """The next message of type `kind` (a worker_protocol struct) the broker sends this DEALER."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(50):
            msg = W.decode_from_broker(sock.recv())
            if isinstance(msg, kind):
                return msg
    raise AssertionError(f"no {kind.__name__} from the broker")


def test_version_mismatch_refused(cluster):
    cluster.start_broker()
    w = cluster.ctx.socket(zmq.DEALER)
    w.connect(cluster.backend)
    _ready(w, "old", version=99)
    msg = _recv_until(w, W.Disconnect)
    assert msg.fatal is True and "protocol version 99" in msg.reason
    assert cluster.broker.status()["workers"] == []
    w.close(0)


def test_late_result_from_lost_worker_is_discarded(cluster):
    cluster.start_broker(max_attempts=1)
    w = cluster.ctx.socket(zmq.DEALER)
    w.connect(cluster.backend)
    _ready(w, "fake")
    assert _recv_until(w, W.BrokerHeartbeat).registered is True
    client = cluster.client()
    client.send(flat_request("late"))
    job = _recv_until(w, W.RunJob)
    assert job.request_id == "late" and job.attempt == 1
    # stay silent: after 3 missed heartbeats the worker is lost; 1 attempt allowed -> worker_lost
    reply = client.recv_final(5)
    assert reply["error_code"] == "worker_lost" and "fake" in reply["error"]
    w.send(W.encode(W.JobResult(request_id="late", dispatch_id=job.dispatch_id,
                                data={"generated_images": []}, execution_time=0.1)))
    assert _recv_until(w, W.Disconnect).reason.startswith("not registered")
    assert client.drain(0.5) == []       # the late RESULT never reached the client
    _ready(w, "fake")                    # it re-registers and is live again
    cluster.wait_workers("fake")
    assert cluster.broker.status()["broker"]["failed"] == 1
    w.close(0)


def test_pending_model_load_is_answered_when_the_broker_stops(cluster):
    cluster.start_broker()
    w = cluster.ctx.socket(zmq.DEALER)
    w.connect(cluster.backend)
    _ready(w, "mute")
    cluster.wait_workers("mute")
    client = cluster.client()
    client.send({"message_type": "model_load_request", "request_id": "ld",
                 "data": {"model_name": "tiny-sdxl"}})
    manage = _recv_until(w, W.Manage)               # the worker never answers it
    assert manage.op == W.MANAGE_LOAD_MODEL and manage.args.model_name == "tiny-sdxl"
    cluster.broker.stop()
    cluster.broker = None
    reply = client.recv_final(5)
    assert reply["message_type"] == "model_load_response" and reply["error_code"] == "internal_error"
    assert "stopped" in reply["error"]
    w.close(0)


def test_bad_frames_from_a_registered_worker_are_ignored_and_the_job_still_finishes(cluster):
    """Garbage, a message of the wrong shape and an unknown type are each logged and dropped;
    the worker stays registered and its real RESULT still reaches the client."""
    import msgpack

    cluster.start_broker()
    w = cluster.ctx.socket(zmq.DEALER)
    w.connect(cluster.backend)
    _ready(w, "sloppy")
    assert _recv_until(w, W.BrokerHeartbeat).registered is True
    client = cluster.client()
    client.send(flat_request("ok"))
    job = _recv_until(w, W.RunJob)
    w.send(b"\xc1 not msgpack")
    w.send(msgpack.packb({"t": "PROGRESS", "v": 1, "request_id": "ok", "dispatch_id": "x"}))
    w.send(msgpack.packb({"t": "TELEPORT", "v": 1}))
    w.send(W.encode(W.JobResult(request_id="ok", dispatch_id=job.dispatch_id,
                                data={"generated_images": []})))
    reply = client.recv_final(5)
    assert reply["success"] is True and reply["request_id"] == "ok"
    assert [row["worker_id"] for row in cluster.broker.status()["workers"]] == ["sloppy"]
    w.close(0)
