"""Bounded resources of a real `serve` (issue 16 item 8), attacked as a client would: big
queued bodies past --max-queue-mb, a day-long timeout against --max-timeout-s, and the RAM a
queued image costs (held once, not once in the journal and once in the job). No worker runs
(`--devices none`), so every accepted job stays queued; both journals (memory, --state-dir)."""

from __future__ import annotations

import os
import urllib.request

import msgpack
import psutil
import pytest
import zmq

from tests.serve.conftest import free_port

pytestmark = pytest.mark.slow

JOURNALS = ["memory", "sqlite"]


def serve_argv(tmp_path, journal: str, *extra: str) -> list[str]:
    argv = ["--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
            "--devices", "none", "--no-worker-grace-s", "600", *extra]
    if journal == "sqlite":
        argv += ["--state-dir", str(tmp_path / "state")]
    return argv


def body(request_id: str, image: bytes | None = None, **fields) -> bytes:
    request = {"message_type": "generate_sdxl_enhanced", "request_id": request_id,
               "prompt": "bounds", "model_base": "tiny-sdxl", "width": 256, "height": 256,
               "steps": 2, "stream": True, **fields}
    if image is not None:
        request["init_image"] = image
    return msgpack.packb(request, use_bin_type=True)


class Peer:
    """One client DEALER speaking msgpack."""

    def __init__(self, ctx: zmq.Context, endpoint: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def recv(self, timeout_s: float = 60.0) -> dict:
        assert self.sock.poll(int(timeout_s * 1000)), "no answer from the broker"
        return msgpack.unpackb(self.sock.recv(), raw=False)

    def final(self, timeout_s: float = 60.0) -> dict:
        while True:
            message = self.recv(timeout_s)
            if message.get("final", True) is not False:
                return message


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.mark.parametrize("journal", JOURNALS)
def test_queued_bytes_are_capped_and_long_timeouts_are_bounded(start_serve, tmp_path, ctx, journal):
    """--max-queue-mb 5: a second 3 MB job is queue_full naming the limit, a 6 MB one can never
    fit; --max-timeout-s 3 turns a day-long timeout into 3 s (warned), after which the queue has
    room for the refused job again."""
    port = free_port()
    sp = start_serve(serve_argv(tmp_path, journal, "--max-queue-mb", "5", "--max-timeout-s", "3",
                                "--metrics-port", str(port)))
    image = os.urandom(3 * 2**20)
    first, second, huge = (Peer(ctx, sp.endpoint) for _ in range(3))

    first.send(body("big-1", image, timeout=86400))
    assert first.recv()["stage"] == "queued"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as scrape:
        queue_bytes = [line for line in scrape.read().decode().splitlines()
                       if line.startswith("sdxl_broker_queue_bytes ")]
    assert len(queue_bytes) == 1 and 3 * 2**20 < float(queue_bytes[0].split()[1]) < 4 * 2**20

    second.send(body("big-2", image))
    refused = second.final()
    assert refused["error_code"] == "queue_full" and refused["success"] is False
    assert "--max-queue-mb 5" in refused["error"] and "retry later" in refused["error"]

    huge.send(body("huge", os.urandom(6 * 2**20)))
    never = huge.final()
    assert never["error_code"] == "queue_full" and "can never be queued" in never["error"]

    # the day-long timeout was lowered to --max-timeout-s: the job ends, warned why
    timed_out = first.final()
    assert timed_out["error_code"] == "timeout" and "after 3 s" in timed_out["error"]
    assert any("--max-timeout-s 3" in w for w in timed_out["warnings"]), timed_out["warnings"]

    # its bytes left the queue with it: the refused request, sent again, is accepted now
    second.send(body("big-2", image))
    assert second.recv()["stage"] == "queued"
    assert sp.stop() == 0


@pytest.mark.parametrize("journal", JOURNALS)
def test_a_queued_image_is_held_once_in_memory(start_serve, tmp_path, ctx, journal):
    """Four queued jobs of one 40 MB image each grow the broker's RSS by about 160 MB, not
    twice that (before: the in-memory journal kept each body beside the decoded job)."""
    sp = start_serve(serve_argv(tmp_path, journal))
    broker = psutil.Process(sp.proc.pid)
    image_mb, jobs = 40, 4
    image = os.urandom(image_mb * 2**20)
    peer = Peer(ctx, sp.endpoint)
    peer.send(body("warm-up", b"x"))          # the first request imports and builds what it needs
    assert peer.recv()["stage"] == "queued"
    before_mb = broker.memory_info().rss / 2**20
    for index in range(jobs):
        peer.send(body(f"mem-{index}", image))
        assert peer.recv()["stage"] == "queued"
    # a status round trip: the loop has moved on from the last big message, so its frame and
    # body (transient, about to be freed when it was acknowledged) are gone before RSS is read
    peer.send(msgpack.packb({"message_type": "status_request", "request_id": "s"}))
    assert peer.final()["success"] is True
    grown_mb = broker.memory_info().rss / 2**20 - before_mb
    print(f"RSS grew {grown_mb:.0f} MB for {jobs} x {image_mb} MB ({journal} journal)")
    assert grown_mb < 1.2 * image_mb * jobs, f"RSS grew {grown_mb:.0f} MB for {jobs} x {image_mb} MB"
    assert grown_mb > 0.8 * image_mb * jobs   # the measurement sees the one copy it must hold
    assert sp.stop() == 0
