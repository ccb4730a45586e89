"""Issue 16 item 1: one client's 60 MB bodies never make a healthy worker look dead.

A real `serve` (SIMULATED worker, SQLite journal, 0.3 s heartbeats: a worker is lost after
0.9 s of silence) runs another client's jobs one after another while one client sends legal
62 MB bodies (31 M zeros in JSON, 62 M in msgpack). Decoding, validating and fingerprinting one
took the loop ~8 s before the decode stage (broker/decode_stage.py). The other client's jobs
all succeed on the same worker, which is never declared lost or re-registered, and every big
body gets its own final reply. The journal holds the big bodies as files the decode process
wrote (broker/staged_bodies.py), removed when their jobs finish.
"""

from __future__ import annotations

import struct
import threading
import time

import msgpack
import orjson
import zmq

from clients.client import BrokerClient

_FIELDS = {"message_type": "generate_sdxl_enhanced", "prompt": "a red cube",
           "model_base": "tiny-sdxl", "width": 256, "height": 256, "steps": 2}
_JSON_ZEROS = 31_000_000     # "0," each: 62 MB, under the 64 MB message limit
_MSGPACK_ZEROS = 62_000_000  # one byte each


def big_json_body(request_id: str) -> bytes:
    """A legal generate body with an unknown field of 31 M zeros, built as bytes (encoding it
    with orjson would hold this process's GIL, and the test's own clients, for seconds)."""
    head = orjson.dumps({**_FIELDS, "request_id": request_id})[:-1]
    return head + b',"padding":[' + b"0," * (_JSON_ZEROS - 1) + b"0]}"


def big_msgpack_body(request_id: str) -> bytes:
    fields = {**_FIELDS, "request_id": request_id}
    head = bytes([0x80 | (len(fields) + 1)]) + b"".join(
        msgpack.packb(k) + msgpack.packb(v) for k, v in fields.items())
    return head + msgpack.packb("padding") + b"\xdd" + struct.pack(">I", _MSGPACK_ZEROS) \
        + b"\x00" * _MSGPACK_ZEROS


def _decode(frame: bytes) -> dict:
    return orjson.loads(frame) if frame[:1] == b"{" else msgpack.unpackb(frame, raw=False)


def _status(endpoint: str) -> dict:
    with BrokerClient(endpoint, timeout_s=30.0) as client:
        return client.request({"message_type": "status_request"})["data"]


def test_big_bodies_do_not_lose_a_healthy_worker_or_other_clients_jobs(start_serve, tmp_path):
    state_dir = tmp_path / "state"
    sp = start_serve(["--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
                      "--sim-workers", "1", "--sim-step-s", "0.05", "--sim-load-s", "0.05",
                      "--heartbeat-interval-s", "0.3", "--state-dir", str(state_dir)])
    before = _status(sp.endpoint)
    worker_before = before["workers"][0]
    bodies = [("big-json-0", big_json_body("big-json-0")),
              ("big-msgpack-0", big_msgpack_body("big-msgpack-0")),
              ("big-json-1", big_json_body("big-json-1")),
              ("big-msgpack-1", big_msgpack_body("big-msgpack-1"))]
    assert all(60_000_000 < len(body) < 64 * 2**20 for _, body in bodies)   # 60 MB, under the limit

    # the other client: one small job after another until the big bodies are all answered
    other_replies: list[dict] = []
    attacker_done = threading.Event()

    def other_client():
        with BrokerClient(sp.endpoint, timeout_s=120.0) as client:
            n = 0
            while not attacker_done.is_set() or n < 5:
                other_replies.append(client.generate(
                    prompt="a fox", model_base="tiny-sdxl", steps=4, width=256, height=256,
                    request_id=f"other-{n}", raise_on_error=False).reply)
                n += 1

    thread = threading.Thread(target=other_client, daemon=True)
    thread.start()
    ctx = zmq.Context()
    attacker = ctx.socket(zmq.DEALER)
    attacker.setsockopt(zmq.LINGER, 0)
    attacker.connect(sp.endpoint)
    try:
        for _, body in bodies:
            attacker.send_multipart([b"", body])
        big_replies = {}
        deadline = time.monotonic() + 300
        while len(big_replies) < len(bodies) and time.monotonic() < deadline:
            if attacker.poll(1000):
                reply = _decode(attacker.recv_multipart()[-1])
                if reply.get("final"):
                    big_replies[reply["request_id"]] = reply
    finally:
        attacker_done.set()
        attacker.close(linger=0)
        ctx.term()
    thread.join(180)
    assert not thread.is_alive(), sp.log()

    # every big body got its own final reply: accepted, run, the unknown field named
    assert set(big_replies) == {rid for rid, _ in bodies}, sp.log()
    for rid, reply in big_replies.items():
        assert reply["success"] is True, (reply.get("error_code"), reply.get("error"))
        assert any("padding" in w for w in reply["warnings"]), reply["warnings"]
    # the other client's jobs all succeeded, none re-queued off a worker declared lost
    assert len(other_replies) >= 5
    assert all(r["success"] is True for r in other_replies), \
        [r.get("error") for r in other_replies if not r["success"]]
    after = _status(sp.endpoint)
    worker = after["workers"][0]
    assert worker["worker_id"] == worker_before["worker_id"] and worker["pid"] == worker_before["pid"]
    assert worker["state"] != "lost"
    assert after["broker"]["completed"] == \
        before["broker"]["completed"] + len(other_replies) + len(bodies)
    assert after["broker"]["failed"] == before["broker"]["failed"]
    # the finished big jobs' staged bodies are gone with their journal rows
    assert list((state_dir / "bodies").iterdir()) == []
    log = "".join(sp.stderr_lines)
    for sign_of_a_lost_worker in ("no heartbeat", "re-queued", "reconnecting", "re-registered"):
        assert sign_of_a_lost_worker not in log, sp.log()
