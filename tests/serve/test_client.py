"""The Python client against a scripted stand-in ROUTER (a fake broker in a thread, named as
such): Lazy Pirate resends, progress events, decoding of images, async variant. The real
broker is exercised in test_serve_process.py."""

import asyncio
import io
import threading

import pytest
import zmq
from PIL import Image

from clients.client import (AsyncBrokerClient, BrokerClient, BrokerUnavailable, RequestFailed,
                            generation_body)
from protocol import codec
from protocol.replies import final_reply, progress_message


def _png(size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


class FakeBroker:
    """A ROUTER that records every request and answers by a script: of the first `drop_first`
    requests, the very first gets only the broker's `queued` acknowledgement and the others no
    answer at all (as if the broker died after accepting the job); later ones get progress then
    a final reply."""

    def __init__(self, tmp_path, drop_first=0, codec_out=None, mute=False):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)   # as the broker's frontend: a resend's
        # fresh socket keeps the request's identity and takes it over
        self.endpoint = f"ipc://{tmp_path}/fake-broker.sock"
        self.sock.bind(self.endpoint)
        self.drop_first = drop_first
        self.mute = mute   # records requests, never answers
        self.received = []  # (identity, body dict)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            frames = self.sock.recv_multipart()
            identity, body = frames[0], frames[-1]
            msg, used_codec = codec.decode(body)
            self.received.append((identity, msg))
            if self.mute:
                continue
            rid = msg.get("request_id")
            envelope = frames[:-1]
            if len(self.received) <= self.drop_first:
                if len(self.received) == 1:
                    ack = progress_message(rid, "queued", queue_position=0)
                    self.sock.send_multipart(envelope + [codec.encode(ack, used_codec)])
                continue
            for step in (1, 2):
                p = progress_message(rid, "denoising", step=step, total_steps=2, worker_id="w")
                self.sock.send_multipart(envelope + [codec.encode(p, used_codec)])
            ok = msg.get("prompt") != "fail"
            data = {"generated_images": [{"index": 0, "seed": 5, "width": 8, "height": 8,
                                          "format": "png", "path": "/nowhere/x.png",
                                          "sha256": "x", "image": _png()}]} if ok else None
            reply = final_reply("generate_sdxl_enhanced_response", rid, success=ok, data=data,
                                error=None if ok else "bad", error_code=None if ok else "validation_error",
                                errors=[] if ok else [{"field": "prompt", "message": "bad"}])
            self.sock.send_multipart(envelope + [codec.encode(reply, used_codec)])

    def close(self):
        self._stop.set()
        self.thread.join(2)
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def fake_broker(tmp_path):
    brokers = []

    def make(**kw):
        b = FakeBroker(tmp_path, **kw)
        brokers.append(b)
        return b
    yield make
    for b in brokers:
        b.close()


@pytest.mark.parametrize("codec_name", ["msgpack", "json"])
def test_lazy_pirate_resends_the_same_request_on_a_fresh_socket(fake_broker, codec_name):
    broker = fake_broker(drop_first=2)
    events = []
    with BrokerClient(broker.endpoint, timeout_s=0.3, retries=3, codec_name=codec_name) as client:
        result = client.generate(prompt="a fox", model_base="tiny-sdxl", on_progress=events.append)
    assert len(broker.received) == 3
    ids = {msg["request_id"] for _, msg in broker.received}
    assert len(ids) == 1                                  # the same request_id every time
    # a fresh socket each time, with the request's one routing identity: the broker hands it
    # over (ROUTER_HANDOVER), so a resend is still the job's owner and may cancel it
    assert len({identity for identity, _ in broker.received}) == 1
    assert broker.received[0][1] == broker.received[2][1]  # and the very same body
    assert broker.received[0][1]["stream"] is True         # progress asked for by generate
    assert [e.get("step") for e in events] == [0, 1, 2]     # the queued ack, then steps
    assert result.images[0].bytes()[:4] == b"\x89PNG"      # msgpack bin or base64 in JSON
    assert result.images[0].pil().size == (8, 8)


def test_gives_up_with_a_clear_error_when_the_broker_stops_answering(fake_broker):
    broker = fake_broker(drop_first=100)   # accepts the job, then silence
    with BrokerClient(broker.endpoint, timeout_s=0.2, retries=2) as client:
        with pytest.raises(BrokerUnavailable, match="stopped answering .* no answer to 2 resends"):
            client.generate(prompt="a fox")
    assert len(broker.received) == 3  # the first send and two resends


def test_a_silent_peer_fails_first_contact_at_once_without_resending(fake_broker):
    broker = fake_broker(mute=True)   # not even the acknowledgement
    # connected, so it waits up to timeout_s (a loaded broker may answer late), then fails
    with BrokerClient(broker.endpoint, timeout_s=2.0, connect_timeout_s=0.5) as client:
        with pytest.raises(BrokerUnavailable, match="accepted the connection but did not answer"):
            client.status()
    assert len(broker.received) == 1


def test_failure_reply_raises_with_the_code_and_every_field_error(fake_broker):
    broker = fake_broker()
    with BrokerClient(broker.endpoint, timeout_s=2.0) as client:
        with pytest.raises(RequestFailed) as info:
            client.generate(prompt="fail")
        assert info.value.code == "validation_error"
        assert info.value.errors == [{"field": "prompt", "message": "bad"}]
        reply = client.generate(prompt="fail", raise_on_error=False).reply
        assert reply["success"] is False


def test_stream_yields_progress_then_the_final_reply(fake_broker):
    broker = fake_broker()
    with BrokerClient(broker.endpoint, timeout_s=2.0) as client:
        messages = list(client.stream(generation_body(prompt="x", stream=True)))
    assert [m["message_type"] for m in messages] == ["progress", "progress",
                                                     "generate_sdxl_enhanced_response"]


def test_body_building_sends_images_as_bytes_and_keeps_server_paths(tmp_path):
    local = tmp_path / "in.png"
    local.write_bytes(_png())
    body = generation_body(prompt="p", init_image=local, mask_image=Image.new("L", (8, 8)),
                           controlnet_images=["server/side.png", b"raw"], seed=None)
    assert body["message_type"] == "generate_sdxl_enhanced" and body["request_id"]
    assert body["init_image"] == _png()
    assert body["mask_image"][:4] == b"\x89PNG"
    assert body["controlnet_images"] == ["server/side.png", b"raw"]
    assert "seed" not in body  # None means "not given": the broker's default applies


def test_async_client_runs_requests_concurrently(fake_broker):
    broker = fake_broker()

    async def main():
        async with AsyncBrokerClient(broker.endpoint, timeout_s=2.0) as client:
            seen = []
            results = await asyncio.gather(*[
                client.generate(prompt=f"p{i}", on_progress=seen.append) for i in range(3)])
            return results, seen
    results, seen = asyncio.run(main())
    assert len({r.request_id for r in results}) == 3
    assert len(seen) == 6
    assert all(r.images[0].pil().size == (8, 8) for r in results)


def test_curve_client_is_served_only_with_an_authorised_key(tmp_path):
    """A CURVE ROUTER (zmq.auth ThreadAuthenticator) stands in for a CURVE broker: the client
    built from `sdxl-broker keys` files gets its reply; one with an unknown key gets nothing."""
    from zmq.auth.thread import ThreadAuthenticator

    from runtime.curve import make_keys

    keys = make_keys(str(tmp_path / "keys"), ["server", "client", "stranger"])
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "client.key").write_text(open(keys["client"][0]).read())

    ctx = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(allowed))
    server = ctx.socket(zmq.ROUTER)
    server_public, server_secret = zmq.auth.load_certificate(keys["server"][1])
    server.curve_publickey, server.curve_secretkey, server.curve_server = server_public, server_secret, True
    endpoint = f"ipc://{tmp_path}/curve.sock"
    server.bind(endpoint)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if server.poll(50):
                frames = server.recv_multipart()
                msg, used = codec.decode(frames[-1])
                reply = final_reply("status_response", msg["request_id"], success=True,
                                    data={"broker": {}, "workers": []})
                server.send_multipart(frames[:-1] + [codec.encode(reply, used)])
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with BrokerClient.with_curve(endpoint, keys["server"][0], keys["client"][1], timeout_s=2.0) as ok:
            assert ok.status() == {"broker": {}, "workers": []}
        with BrokerClient.with_curve(endpoint, keys["server"][0], keys["stranger"][1],
                                     timeout_s=0.5, retries=1) as refused:
            with pytest.raises(BrokerUnavailable):
                refused.status()
    finally:
        stop.set()
        thread.join(2)
        server.close(linger=0)
        auth.stop()
        ctx.term()
