"""Dynamic batching end to end: a real `serve` with one real cpu worker (diffusers, tiny kit).

Compatible jobs queued together run as one pipeline call (the replies say so: each carries
`processing_metrics.batch` naming the jobs of its call and `dynamic_batch` in features_used),
each keeps its own seed, files and reply, and each image equals the lone job's image with the
same seed within float noise (at most 2 levels of 255 in any pixel, mean under 0.05 levels; the
batched maths differs from the lone maths by float rounding only). Cancelling one job of a
batch leaves the others completing; incompatible jobs are not batched.

To have jobs queued together deterministically, two long incompatible "blocker" jobs first
fill the worker's two slots (one running, one prefetched); the jobs under test then wait in the
broker's queue until the first blocker finishes, and go to the worker in one dispatch."""

from __future__ import annotations

import io
import time
import uuid

import msgpack
import numpy as np
import pytest
import zmq
from PIL import Image

from clients.client import cancel_body, generation_body
from tests.serve.conftest import one_cpu_worker_argv

pytestmark = pytest.mark.slow

MAX_LEVELS, MEAN_LEVELS = 2, 0.05
TIMEOUT_S = 240


class Client:
    """A DEALER that sends many bodies at once and collects the replies by request id."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.finals: dict[str, dict] = {}
        self.progress: dict[str, list] = {}

    def send(self, body: dict) -> str:
        self.sock.send_multipart([b"", msgpack.packb(body)])
        return body["request_id"]

    def pump(self, timeout_ms: int = 200) -> None:
        if self.sock.poll(timeout_ms):
            while self.sock.poll(0):
                message = msgpack.unpackb(self.sock.recv_multipart()[-1])
                if message.get("final"):
                    self.finals[message["request_id"]] = message
                else:
                    self.progress.setdefault(message["request_id"], []).append(message)

    def wait(self, request_ids, timeout_s: float = TIMEOUT_S) -> dict[str, dict]:
        deadline = time.monotonic() + timeout_s
        while not all(rid in self.finals for rid in request_ids):
            assert time.monotonic() < deadline, f"no reply for {set(request_ids) - set(self.finals)}"
            self.pump()
        return {rid: self.finals[rid] for rid in request_ids}

    def close(self) -> None:
        self.sock.close(0)


def body(prompt: str, seed: int, steps: int = 3, size: int = 256, **extra) -> dict:
    return generation_body(request_id=f"{prompt.split()[-1]}-{uuid.uuid4().hex[:6]}", prompt=prompt,
                           model_base="tiny-sdxl", width=size, height=size, steps=steps, seed=seed,
                           scheduler="EulerDiscreteScheduler", return_images=True, **extra)


def pixels(reply: dict) -> np.ndarray:
    data = reply["data"]["generated_images"][0]["image"]
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def fill_worker(client: Client) -> list[str]:
    """Two long jobs, compatible with nothing (each its own step count), that hold the worker's
    running slot and its prefetch slot; returns once the first one is denoising."""
    blockers = [client.send(body(f"a slow blocker {i}", 100 + i, steps=25 + i, stream=True)) for i in range(2)]
    deadline = time.monotonic() + TIMEOUT_S
    while not any(p.get("stage") == "denoising" for p in client.progress.get(blockers[0], [])):
        assert time.monotonic() < deadline, "the blocker never started denoising"
        client.pump()
    return blockers


@pytest.fixture
def serve_one_worker(start_serve, demo_models_dir, tmp_path):
    sp = start_serve(one_cpu_worker_argv(demo_models_dir, tmp_path / "images", tmp_path,
                                         "--max-batch", "8"), ready_timeout_s=180)
    client = Client(sp.endpoint)
    yield sp, client
    client.close()


def test_compatible_jobs_run_as_one_call_each_with_its_own_seed_and_lone_equal_image(serve_one_worker):
    sp, client = serve_one_worker
    blockers = fill_worker(client)
    compatible = [body(f"a photo of animal {i}", 10 + i) for i in range(4)]
    incompatible = [body("a bigger picture", 50, size=320), body("more steps here", 60, steps=4)]
    order = [compatible[0], incompatible[0], compatible[1], compatible[2], incompatible[1], compatible[3]]
    for b in order:
        client.send(b)
    replies = client.wait([b["request_id"] for b in order] + blockers)
    log = sp.log()
    batch_ids = sorted(b["request_id"] for b in compatible)
    for b in compatible:
        reply = replies[b["request_id"]]
        assert reply["success"], reply
        assert reply["data"]["generated_images"][0]["seed"] == b["seed"]
        assert b["request_id"] in reply["data"]["generated_images"][0]["path"]
        assert "dynamic_batch" in reply["data"]["features_used"]
        batch = reply["data"]["processing_metrics"]["batch"]
        assert (batch["jobs"], batch["images"], sorted(batch["request_ids"])) == (4, 4, batch_ids)
    for b in incompatible + [{"request_id": rid} for rid in blockers]:
        reply = replies[b["request_id"]]
        assert reply["success"], reply
        assert "batch" not in reply["data"]["processing_metrics"]
        assert "dynamic_batch" not in reply["data"]["features_used"]
    assert "batched call of 4 jobs" in log, log
    # the same jobs alone (one at a time: nothing to batch with) give the same images
    for b in compatible:
        alone = dict(b, request_id=b["request_id"] + "-alone")
        lone = client.wait([client.send(alone)])[alone["request_id"]]
        assert "batch" not in lone["data"]["processing_metrics"]
        diff = np.abs(pixels(replies[b["request_id"]]) - pixels(lone))
        assert diff.max() <= MAX_LEVELS and diff.mean() < MEAN_LEVELS, (diff.max(), diff.mean())
    assert sp.stop() == 0


def test_cancelling_one_job_of_a_batch_leaves_the_others_completing(serve_one_worker):
    sp, client = serve_one_worker
    blockers = fill_worker(client)
    jobs = [body(f"a long batch {i}", 20 + i, steps=30, stream=True) for i in range(3)]
    for b in jobs:
        client.send(b)
    victim = jobs[1]["request_id"]
    deadline = time.monotonic() + TIMEOUT_S
    while not any(p.get("stage") == "denoising" for p in client.progress.get(victim, [])):
        assert time.monotonic() < deadline, "the batch never started denoising"
        client.pump()
    cancel = cancel_body(victim)
    client.send(cancel)
    replies = client.wait([b["request_id"] for b in jobs] + blockers + [cancel["request_id"]])
    assert replies[cancel["request_id"]]["success"], replies[cancel["request_id"]]
    assert replies[victim]["error_code"] == "cancelled", replies[victim]
    for b in (jobs[0], jobs[2]):
        reply = replies[b["request_id"]]
        assert reply["success"], reply
        assert reply["data"]["processing_metrics"]["batch"]["jobs"] == 3   # it ran in the batch
        assert reply["data"]["generated_images"][0]["seed"] == b["seed"]
    # the two survivors went through every step after the cancel
    for b in (jobs[0], jobs[2]):
        steps = [p["step"] for p in client.progress[b["request_id"]] if p.get("stage") == "denoising"]
        assert max(steps) == 30
    assert sp.stop() == 0
