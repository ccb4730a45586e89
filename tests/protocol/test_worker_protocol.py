"""The typed broker <-> worker messages (protocol/worker_protocol.py): every message survives
the wire, and a bad frame is one WorkerProtocolError, never a KeyError/TypeError later."""

from __future__ import annotations

import msgpack
import pytest

from protocol import worker_protocol as W

TELEMETRY = W.Telemetry.from_dict({
    "memory": {"total_mb": 8000, "used_mb": 1000.5, "free_mb": 6999.5},
    "models_loaded": [{"name": "tiny-sdxl", "kind": "base", "size_mb": 10.2}],
    "models_loading": ["vae"], "step_time_s": {"tiny-sdxl@256x256": 0.08},
    "load_time_s": {"tiny-sdxl": 2.9}, "cache_hits": 3, "simulated": True,
    "oom_events": 4,   # an executor's own counter: not part of the wire
})

FROM_WORKER = [
    W.Ready(worker_id="w1", host="h", pid=12, device="cuda:1", device_type="cuda",
            device_name="RTX", memory_total_mb=24000.0, capabilities=["txt2img", "lora"],
            worker_types=["sdxl_worker"], simulated=False, telemetry=TELEMETRY),
    W.WorkerHeartbeat(telemetry=TELEMETRY, busy=True, current_job="r1", current_step=7,
                      jobs_done=2, jobs_failed=1),
    W.JobProgress(request_id="r1", dispatch_id=2**62, stage="denoising", step=3, total_steps=10),
    W.JobResult(request_id="r1", dispatch_id=5, data={"generated_images": [{"image": b"\x89PNG"}]},
                warnings=["w"], execution_time=1.5),
    W.JobFailed(request_id="r1", dispatch_id=5, code="out_of_memory", message="no room",
                details={"need_mb": 9000}),
    W.ManageReply(op_id=3, success=False, code="timeout", error="slow"),
    W.Disconnect(reason="worker stopping"),
]
FROM_BROKER = [
    W.BrokerHeartbeat(registered=True),
    W.RunJob(request_id="r1", attempt=2, dispatch_id=9, job={"request_id": "r1", "init_image": b"x"}),
    W.AbortJob(request_id="r1", dispatch_id=9, reason="timeout"),
    W.Manage(op_id=4, op=W.MANAGE_LOAD_MODEL, args=W.ManageArgs(model_name="tiny-sdxl")),
    W.Manage(op_id=5, op=W.MANAGE_CLEANUP, args=W.ManageArgs(models=None)),
    W.Disconnect(reason="go away", fatal=True),
]


@pytest.mark.parametrize("message", FROM_WORKER, ids=lambda m: type(m).__name__)
def test_worker_messages_round_trip(message):
    assert W.decode_from_worker(W.encode(message)) == message


@pytest.mark.parametrize("message", FROM_BROKER, ids=lambda m: type(m).__name__)
def test_broker_messages_round_trip(message):
    assert W.decode_from_broker(W.encode(message)) == message


def test_the_wire_is_a_msgpack_map_with_type_and_version():
    wire = msgpack.unpackb(W.encode(FROM_BROKER[1]))
    assert wire["t"] == W.JOB and wire["v"] == W.PROTOCOL_VERSION
    assert wire["job"]["init_image"] == b"x"          # bytes stay msgpack binary
    beat = msgpack.unpackb(W.encode(W.WorkerHeartbeat(telemetry=TELEMETRY)))
    assert "oom_events" not in beat["telemetry"] and beat["telemetry"]["cache_hits"] == 3


def test_a_hand_written_map_with_missing_optional_fields_decodes_with_defaults():
    msg = W.decode_from_worker(msgpack.packb({"t": "READY", "v": 1, "worker_id": "w"}))
    assert isinstance(msg, W.Ready) and msg.device == "cpu" and msg.telemetry.models_loaded == []
    assert msg.telemetry.memory.free_mb is None
    # a field a newer worker adds is ignored
    msg = W.decode_from_worker(msgpack.packb({"t": "DISCONNECT", "v": 1, "reason": "x", "new": 1}))
    assert msg == W.Disconnect(reason="x")


def _nested_heartbeat(depth: int) -> bytes:
    """A HEARTBEAT whose telemetry is `depth` maps deep (by hand: msgpack's packer stops at 512)."""
    head = b"\x83" + b"".join(msgpack.packb(x) for x in ("t", "HEARTBEAT", "v", 1, "telemetry"))
    return head + b"\x81\xa1a" * depth + msgpack.packb(1)


@pytest.mark.parametrize("frame", [
    b"",
    b"\xc1",                                                          # not msgpack
    _nested_heartbeat(100_000),                                       # deeper than msgspec recurses
    msgpack.packb([1, 2]),                                            # not a map
    msgpack.packb({"v": 1}),                                          # no type
    msgpack.packb({"t": "NOPE", "v": 1}),                             # unknown type
    msgpack.packb({"t": "JOB", "v": 1}),                              # a broker message
    msgpack.packb({"t": "PROGRESS", "v": 1, "request_id": "r", "stage": "x"}),  # no dispatch_id
    msgpack.packb({"t": "PROGRESS", "v": 1, "request_id": "r", "dispatch_id": -1, "stage": "x"}),
    msgpack.packb({"t": "PROGRESS", "v": 1, "request_id": "r", "dispatch_id": 1, "stage": "x",
                   "step": "3"}),                                     # wrong type
    msgpack.packb({"t": "RESULT", "v": 1, "request_id": "r" * 10_000, "dispatch_id": 1}),
    msgpack.packb({"t": "HEARTBEAT", "v": 1, "telemetry": {"memory": {"total_mb": -5}}}),
    msgpack.packb({"t": "HEARTBEAT", "v": 1, "telemetry": {"models_loaded": [{"size_mb": 1}]}}),
    msgpack.packb({"t": "MANAGE_REPLY", "v": 1, "op_id": 1}),        # no success
])
def test_bad_worker_frames_raise_one_error_type(frame):
    with pytest.raises(W.WorkerProtocolError):
        W.decode_from_worker(frame)


@pytest.mark.parametrize("frame", [
    msgpack.packb({"t": "JOB", "v": 1, "request_id": "r", "attempt": 0, "dispatch_id": 1, "job": {}}),
    msgpack.packb({"t": "JOB", "v": 1, "request_id": "r", "attempt": 1, "dispatch_id": 1}),
    msgpack.packb({"t": "MANAGE", "v": 1, "op_id": 1, "op": "load_model", "args": []}),
    msgpack.packb({"t": "RESULT", "v": 1, "request_id": "r", "dispatch_id": 1}),  # a worker message
    _nested_heartbeat(100_000),
])
def test_bad_broker_frames_raise_one_error_type(frame):
    with pytest.raises(W.WorkerProtocolError):
        W.decode_from_broker(frame)


def test_another_version_is_told_apart_from_garbage():
    frame = msgpack.packb({"t": "READY", "v": 7, "worker_id": "future", "device": {"new": "shape"}})
    with pytest.raises(W.WorkerVersionError) as caught:
        W.decode_from_worker(frame)
    assert (caught.value.kind, caught.value.version, caught.value.worker_id) == ("READY", 7, "future")
    # a READY of another version that does decode reaches the broker, which refuses it by `v`
    assert W.decode_from_worker(msgpack.packb({"t": "READY", "v": 7, "worker_id": "f"})).v == 7


def test_telemetry_from_a_bad_executor_dict_is_a_protocol_error():
    with pytest.raises(W.WorkerProtocolError):
        W.Telemetry.from_dict({"models_loaded": "not a list"})


def test_numpy_like_scalars_and_paths_are_encoded_as_plain_values(tmp_path):
    class Scalar:   # what numpy / torch scalars look like to the encoder
        def item(self):
            return 2.5
    frame = W.encode(W.JobResult(request_id="r", dispatch_id=1,
                                 data={"x": Scalar(), "path": tmp_path}))
    data = W.decode_from_worker(frame).data
    assert data == {"x": 2.5, "path": str(tmp_path)}
