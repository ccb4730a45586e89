"""Issue 16 attacks on a real Broker with real sockets and real (SIMULATED-executor) worker
processes: what the attacked clients see."""

from __future__ import annotations

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
