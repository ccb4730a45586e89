"""Harness for broker integration tests: a real Broker on ipc:// endpoints in a temp dir, real
`sdxl-broker worker --sim` subprocesses (SIMULATED executors), real DEALER/REQ clients.
Used through the `cluster` fixture (conftest.py), which kills every process it started.
Imported as `broker_harness` (pytest puts this rootless test dir on sys.path)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import zmq

SDXL_BROKER = str(Path(sys.executable).with_name("sdxl-broker"))
HEARTBEAT_S = 0.2


def flat_request(rid: str, **fields) -> dict:
    body = {"message_type": "generate_sdxl_enhanced", "request_id": rid, "prompt": "a red cube",
            "model_base": "tiny-sdxl", "width": 256, "height": 256, "steps": 4}
    body.update(fields)
    return body


def encode(body: dict, codec: str = "json") -> bytes:
    return msgpack.packb(body, use_bin_type=True) if codec == "msgpack" else json.dumps(body).encode()


def decode(frame: bytes) -> dict:
    if frame[:1] == b"{":
        return json.loads(frame)
    return msgpack.unpackb(frame, raw=False)


class Client:
    """A DEALER (or REQ) client; collects everything the broker sends it."""

    def __init__(self, ctx: zmq.Context, endpoint: str, kind: int = zmq.DEALER, delimiter: bool = True):
        self.sock = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.kind, self.delimiter = kind, delimiter

    def send(self, body: dict, codec: str = "json") -> None:
        frame = encode(body, codec)
        if self.kind == zmq.DEALER and self.delimiter:
            self.sock.send_multipart([b"", frame])
        else:
            self.sock.send(frame)

    def recv(self, timeout_s: float = 10.0) -> dict | None:
        if not self.sock.poll(timeout_s * 1000):
            return None
        frames = self.sock.recv_multipart()
        if self.kind == zmq.DEALER and self.delimiter:
            assert frames[0] == b"", f"expected the empty delimiter back, got {frames!r}"
        return decode(frames[-1])

    def recv_final(self, timeout_s: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self.recv(max(deadline - time.monotonic(), 0.0))
            assert msg is not None, "no final reply in time"
            if msg.get("final"):
                return msg

    def drain(self, window_s: float) -> list[dict]:
        out = []
        while (msg := self.recv(window_s)) is not None:
            out.append(msg)
        return out

    def close(self) -> None:
        self.sock.close(linger=0)


class Cluster:
    def __init__(self, tmp: str):
        self.tmp = tmp
        self.ctx = zmq.Context()
        self.broker = None
        self.procs: list[subprocess.Popen] = []
        self.clients: list[Client] = []

    def start_broker(self, **config) -> "Cluster":
        from broker.server import Broker, BrokerConfig
        config.setdefault("frontend", f"ipc://{self.tmp}/fe")
        config.setdefault("backend", f"ipc://{self.tmp}/be")
        config.setdefault("heartbeat_interval_s", HEARTBEAT_S)
        self.broker = Broker(BrokerConfig(**config))
        self.broker.start()
        return self

    @property
    def backend(self) -> str:
        return self.broker.backend_endpoint if self.broker else f"ipc://{self.tmp}/be"

    @property
    def frontend(self) -> str:
        return self.broker.frontend_endpoint if self.broker else f"ipc://{self.tmp}/fe"

    def start_worker(self, worker_id: str, *extra: str, step_s: float = 0.02, load_s: float = 0.05,
                     backend: str | None = None) -> subprocess.Popen:
        log = open(os.path.join(self.tmp, f"{worker_id}.log"), "wb")
        # one job per call unless a test asks for dynamic batching: these tests fill a worker's
        # two slots with two jobs (tests/serve/test_batching_e2e.py tests batching)
        batching = [] if any(arg.startswith("--max-batch") for arg in extra) else ["--max-batch", "1"]
        proc = subprocess.Popen(
            [SDXL_BROKER, "worker", "--connect", backend or self.backend, "--sim",
             "--worker-id", worker_id, "--sim-step-s", str(step_s), "--sim-load-s", str(load_s),
             "--heartbeat-interval-s", str(HEARTBEAT_S),
             # a pytest killed by a timeout leaves no worker heart-beating into nothing
             "--supervisor-pid", str(os.getpid()), *batching, *extra],
            stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def wait_workers(self, *worker_ids: str, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            live = {w["worker_id"] for w in self.broker.status()["workers"] if w["state"] != "lost"}
            if set(worker_ids) <= live:
                return
            time.sleep(0.05)
        raise AssertionError(f"workers {worker_ids} did not register; status {self.broker.status()}")

    def worker_state(self, worker_id: str) -> str | None:
        for w in self.broker.status()["workers"]:
            if w["worker_id"] == worker_id:
                return w["state"]
        return None

    def running_on(self, request_id: str, timeout_s: float = 10.0) -> str:
        """The worker the broker dispatched request_id to (waits until it is running)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for w in self.broker.status()["workers"]:
                if request_id in w["current_jobs"]:
                    return w["worker_id"]
            time.sleep(0.02)
        raise AssertionError(f"{request_id} never ran")

    def client(self, kind: int = zmq.DEALER, delimiter: bool = True) -> Client:
        c = Client(self.ctx, self.frontend, kind, delimiter)
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
                except ProcessLookupError:
                    pass
            proc.wait(timeout=10)
        if self.broker is not None:
            self.broker.stop()
        self.ctx.destroy(linger=0)
