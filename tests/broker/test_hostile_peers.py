"""Issue 16 attacks on a real Broker with real sockets and real (SIMULATED-executor) worker
processes: what the attacked clients see."""

from __future__ import annotations

import time

import zmq

from broker_harness import flat_request


def _streaming_job_running(cluster, rid: str):
    """A DEALER that streams a slow job; returns it once the job runs on the worker."""
    cluster.start_broker()
    cluster.start_worker("w1", step_s=0.1)
    cluster.wait_workers("w1")
    streamer = cluster.client()
    streamer.send(flat_request(rid, steps=30, stream=True))
    cluster.running_on(rid)
    return streamer


def _assert_streamer_got_progress_then_final(streamer) -> None:
    messages = []
    while not (messages and messages[-1].get("final")):
        msg = streamer.recv(20.0)
        assert msg is not None, f"streamer got no final reply; so far {messages}"
        messages.append(msg)
    assert any(m.get("message_type") == "progress" for m in messages[:-1])
    assert messages[-1]["success"] is True


def test_req_peer_resending_a_streamed_job_id_gets_only_the_final_reply(cluster):
    streamer = _streaming_job_running(cluster, "streamed-1")
    # the REQ sends the same request, once without and (another REQ) once with stream
    plain_req = cluster.client(zmq.REQ)
    plain_req.send(flat_request("streamed-1", steps=30))
    stream_req = cluster.client(zmq.REQ)
    stream_req.send(flat_request("streamed-1", steps=30, stream=True))
    for req in (plain_req, stream_req):
        first = req.recv(20.0)   # a REQ's one reply: must be the final one
        assert first is not None, "the REQ peer got no reply"
        assert first.get("final") is True and first.get("message_type") != "progress", first
        assert first["success"] is True and first["request_id"] == "streamed-1"
    _assert_streamer_got_progress_then_final(streamer)


def test_dealer_without_stream_attaching_to_a_streamed_job_gets_no_progress(cluster):
    streamer = _streaming_job_running(cluster, "streamed-2")
    quiet = cluster.client()
    quiet.send(flat_request("streamed-2", steps=30))
    seen = []
    while not (seen and seen[-1].get("final")):
        msg = quiet.recv(20.0)
        assert msg is not None, f"no final reply; so far {seen}"
        seen.append(msg)
    assert [m.get("message_type") for m in seen] != [] and len(seen) == 1, \
        f"a peer that did not ask for progress got {len(seen) - 1} progress messages: {seen[:3]}"
    assert seen[0]["success"] is True
    assert quiet.drain(0.3) == []   # nothing after the final reply either
    _assert_streamer_got_progress_then_final(streamer)


# --- item 2: a rogue DEALER speaking the worker protocol beside a real worker ---------------------
def _rogue_worker(cluster, worker_id: str = "rogue"):
    from protocol import worker_protocol as W
    sock = cluster.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.backend)
    from gpu_worker.sim_executor import ALL_FEATURES   # it claims to run anything
    sock.send(W.encode(W.Ready(worker_id=worker_id, memory_total_mb=100_000.0,
                               capabilities=list(ALL_FEATURES))))
    return sock


def _poison_heartbeats():
    import msgpack
    deep = (b"\x83" + b"".join(msgpack.packb(x) for x in ("t", "HEARTBEAT", "v", 1, "telemetry"))
            + b"\x81\xa1a" * 100_000 + msgpack.packb(1))   # killed the broker's loop once
    return [msgpack.packb({"t": "HEARTBEAT", "v": 1, "telemetry": "x"}),
            msgpack.packb({"t": "HEARTBEAT", "v": 1,
                           "telemetry": {"memory": {"total_mb": 1000, "free_mb": "abc"}}}),
            b"\xc1not msgpack at all", deep]


def _status(cluster) -> dict:
    req = cluster.client(zmq.REQ)
    req.send({"message_type": "status_request", "request_id": "st"})
    reply = req.recv(10.0)
    assert reply is not None, "status_request went unanswered"
    assert reply["success"] is True
    return reply["data"]


def _bad_frames_counted(cluster) -> float:
    return cluster.broker.metrics.registry.get_sample_value(
        "sdxl_broker_bad_worker_frames_total", {"worker_id": "rogue"}) or 0.0


def test_poison_heartbeats_break_neither_status_nor_dispatch(cluster, caplog):
    cluster.start_broker()
    cluster.start_worker("w1")
    cluster.wait_workers("w1")
    rogue = _rogue_worker(cluster)
    cluster.wait_workers("w1", "rogue")
    for frame in _poison_heartbeats():   # a few bad frames: dropped, counted, logged once
        rogue.send(frame)
    clients = [cluster.client() for _ in range(3)]
    for i, c in enumerate(clients):
        c.send(flat_request(f"poisoned-{i}"))
    data = _status(cluster)
    assert {w["worker_id"] for w in data["workers"]} >= {"w1", "rogue"}
    assert all(c.recv_final(30.0)["success"] is True for c in clients)
    assert _bad_frames_counted(cluster) == len(_poison_heartbeats())
    logged = [r for r in caplog.records if "rogue" in r.getMessage() and "bad" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]


def test_repeated_garbage_disconnects_the_worker_and_requeues_its_jobs(cluster):
    from protocol import worker_protocol as W
    cluster.start_broker()
    rogue = _rogue_worker(cluster)
    cluster.wait_workers("rogue")
    assert rogue.poll(5000) and type(W.decode_from_broker(rogue.recv())) is W.BrokerHeartbeat
    # with only the rogue registered, the jobs go to it (it holds up to two)
    clients = [cluster.client() for _ in range(2)]
    for i, c in enumerate(clients):
        c.send(flat_request(f"held-{i}"))
    cluster.running_on("held-0")
    cluster.start_worker("w1")
    while cluster.worker_state("w1") in (None, "lost"):   # the rogue stays alive meanwhile
        rogue.send(W.encode(W.WorkerHeartbeat()))
        time.sleep(0.05)
    assert cluster.worker_state("rogue") not in (None, "lost")
    for i in range(25):
        rogue.send(_poison_heartbeats()[i % 3])
    told = []
    while rogue.poll(5000):
        message = W.decode_from_broker(rogue.recv())
        told.append(message)
        if type(message) is W.Disconnect:
            break
    assert type(told[-1]) is W.Disconnect, told
    assert "rogue" not in {w["worker_id"] for w in _status(cluster)["workers"]
                           if w["state"] != "lost"}
    # its jobs were re-queued and ran on the real worker: each client gets one successful reply
    for c in clients:
        reply = c.recv_final(30.0)
        assert reply["success"] is True, reply
        assert reply["data"]["processing_metrics"]["worker_id"] == "w1"
    assert _bad_frames_counted(cluster) >= 20


def test_backend_drops_frames_over_the_size_limit(cluster):
    cluster.start_broker(max_message_mb=1)
    cluster.start_worker("w1")
    cluster.wait_workers("w1")
    assert cluster.broker.backend.getsockopt(zmq.MAXMSGSIZE) == 2**20
    big = cluster.ctx.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(cluster.backend)
    big.send(b"\x80" + b" " * (2 * 2**20))
    c = cluster.client()
    c.send(flat_request("after-big"))
    assert c.recv_final(30.0)["success"] is True
    assert cluster.worker_state("w1") != "lost"
    big.close(linger=0)


# --- item 6: a rogue worker taking a real worker's id ------------------------------------------------
def test_rogue_ready_with_a_live_workers_id_is_ignored(cluster):
    from protocol import worker_protocol as W
    cluster.start_broker()
    real = cluster.start_worker("w1", step_s=0.1)
    cluster.wait_workers("w1")
    client = cluster.client()
    client.send(flat_request("victim", steps=20))
    cluster.running_on("victim")
    rogue = _rogue_worker(cluster, "w1")      # READY with the real worker's id
    assert not rogue.poll(1000), "the rogue was answered"
    rows = [w for w in cluster.broker.status()["workers"] if w["worker_id"] == "w1"]
    assert len(rows) == 1 and rows[0]["pid"] == real.pid and rows[0]["state"] != "lost"
    reply = client.recv_final(30.0)            # the legitimate job is not lost
    assert reply["success"] is True, reply
    assert reply["data"]["processing_metrics"]["worker_id"] == "w1"
    for _ in range(25):                        # insisting gets it disconnected
        rogue.send(W.encode(W.Ready(worker_id="w1")))
    assert rogue.poll(5000) and type(W.decode_from_broker(rogue.recv())) is W.Disconnect
    rows = [w for w in cluster.broker.status()["workers"] if w["worker_id"] == "w1"]
    assert len(rows) == 1 and rows[0]["pid"] == real.pid and rows[0]["state"] != "lost"
    rogue.close(linger=0)


def test_second_dealer_with_the_same_routing_identity_is_answered(cluster):
    """Two DEALERs with one routing identity (a client retrying from a fresh socket with a fixed
    identity): the newer connection takes the identity over (ROUTER_HANDOVER) and gets replies."""
    cluster.start_broker()
    socks = []
    for n in range(2):
        sock = cluster.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, b"same-identity")
        sock.connect(cluster.frontend)
        socks.append(sock)
        sock.send_multipart([b"", b'{"message_type": "status_request", "request_id": "st-%d"}' % n])
        assert sock.poll(10_000), f"DEALER {n} with a reused identity got no reply"
        reply = sock.recv_multipart()[-1]
        assert b'"status_response"' in reply and b'"st-%d"' % n in reply
    for sock in socks:
        sock.close(linger=0)
