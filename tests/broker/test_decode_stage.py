"""The decode stage (broker/decode_stage.py) with a real broker, real decode processes, real
sockets and a SIMULATED worker: big bodies keep their peer's order, and a big body the journal
keeps as a staged file survives a broker restart."""

from __future__ import annotations

import os
import struct
import time

import msgpack

from broker_harness import flat_request

_BIG = "x" * 100_000   # an unknown field (a warning) past the 64 KB inline limit: decoded off the loop


def test_a_peers_messages_reach_the_core_in_order_behind_its_big_body(cluster):
    cluster.start_broker()
    client = cluster.client()
    # a big generate, then at once a cancel of it and a status: the cancel must find the job
    client.send(flat_request("big-1", padding=_BIG, timeout=60))
    client.send({"message_type": "cancel_request", "request_id": "big-1"})
    replies = [client.recv_final(30), client.recv_final(30)]
    by_type = {r["message_type"]: r for r in replies}
    cancel = by_type["cancel_response"]
    assert cancel["success"] is True and cancel["data"]["cancelled"] is True, (cancel["error_code"], cancel["error"])
    job = by_type["generate_sdxl_enhanced_response"]
    assert job["error_code"] == "cancelled"
    assert cluster.broker._stage.decoded_count == 1   # the big body went through the stage


def test_a_staged_big_body_survives_a_broker_restart(cluster):
    state_dir = os.path.join(cluster.tmp, "state")
    cluster.start_broker(state_dir=state_dir)   # no worker yet: the job stays queued
    client = cluster.client()
    body = flat_request("big-restart", padding=_BIG)
    client.send(body)
    bodies = os.path.join(state_dir, "bodies")
    deadline = time.monotonic() + 30
    while cluster.broker.status()["broker"]["queue_depth"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.broker.status()["broker"]["queue_depth"] == 1
    staged = os.listdir(bodies)
    assert len(staged) == 1 and os.path.getsize(os.path.join(bodies, staged[0])) > 100_000
    cluster.broker.stop()

    cluster.start_broker(state_dir=state_dir)   # same endpoints, same journal
    cluster.start_worker("w1")
    deadline = time.monotonic() + 30   # the re-queued job runs from the staged body
    while cluster.broker.status()["broker"]["completed"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.broker.status()["broker"]["completed"] == 1
    assert os.listdir(bodies) == []   # removed with the finished job's row
    resend = cluster.client()
    resend.send(body)   # the same request again: its stored reply; its new staged file goes
    reply = resend.recv_final(30)
    assert reply["success"] is True, reply
    assert reply["request_id"] == "big-restart"
    assert os.listdir(bodies) == []


def test_a_small_body_from_another_peer_does_not_wait_behind_a_60_mb_one(cluster):
    cluster.start_broker()
    attacker, other = cluster.client(), cluster.client()
    # a first 100 KB body starts the decode processes; wait until both lanes are ready
    other.send({"message_type": "status_request", "request_id": "warm", "padding": _BIG})
    assert other.recv_final(60)["success"] is True
    stage = cluster.broker._stage
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
            len(stage._decoders) == 2 and all(d.ready for d in stage._decoders.values())):
        time.sleep(0.02)
    # 62 M msgpack zeros in an unknown field of a status request: seconds in a decode process
    head = {"message_type": "status_request", "request_id": "huge"}
    huge = bytes([0x80 | 3]) + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in head.items()) \
        + msgpack.packb("padding") + b"\xdd" + struct.pack(">I", 62_000_000) + b"\x00" * 62_000_000
    attacker.sock.send_multipart([b"", huge])
    # the decode process has taken the huge body before the other client's 100 KB one comes
    deadline = time.monotonic() + 60
    while not cluster.broker._stage._in_decoder and time.monotonic() < deadline:
        time.sleep(0.01)
    other.send({"message_type": "status_request", "request_id": "small", "padding": _BIG})
    reply = other.recv_final(60)
    assert reply["request_id"] == "small" and reply["success"] is True
    assert attacker.recv(0) is None   # the huge one is still being decoded
    late = attacker.recv_final(120)
    assert late["request_id"] == "huge" and late["success"] is True
