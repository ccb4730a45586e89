"""The broker loop counts every heartbeat that has arrived before it judges a worker lost
(issue 16 item 1): a real Broker on ipc:// with an injected clock, a SIMULATED worker peer (a raw
DEALER speaking the worker protocol). The loop is held (its lock) while the worker's heartbeat
arrives and the broker's clock jumps past the worker's expiry; when the loop goes on, the
heartbeat queued meanwhile is read before the liveness pass, so the worker is not lost."""

from __future__ import annotations

import threading
import time

import zmq

from broker.server import Broker, BrokerConfig
from protocol import worker_protocol as W


class _Clock:
    def __init__(self):
        self.offset_s = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return time.monotonic() + self.offset_s

    def jump(self, seconds: float) -> None:
        with self._lock:
            self.offset_s += seconds


def _worker_state(broker: Broker, worker_id: str) -> str | None:
    for row in broker.status()["workers"]:
        if row["worker_id"] == worker_id:
            return row["state"]
    return None


def test_a_heartbeat_queued_while_the_loop_was_busy_counts_before_liveness(tmp_path):
    clock = _Clock()
    broker = Broker(BrokerConfig(frontend=f"ipc://{tmp_path}/fe", backend=f"ipc://{tmp_path}/be",
                                 heartbeat_interval_s=1.0, heartbeat_liveness=3), clock=clock)
    broker.start()
    ctx = zmq.Context()
    worker = ctx.socket(zmq.DEALER)
    worker.setsockopt(zmq.LINGER, 0)
    try:
        worker.connect(broker.backend_endpoint)
        worker.send(W.encode(W.Ready(worker_id="sim-w", memory_total_mb=8000.0, simulated=True)))
        deadline = time.monotonic() + 10
        while _worker_state(broker, "sim-w") in (None, "lost") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _worker_state(broker, "sim-w") not in (None, "lost")

        with broker._lock:   # the loop is busy (as with one client's huge body)...
            time.sleep(0.3)   # ...its poll has returned without this heartbeat
            worker.send(W.encode(W.WorkerHeartbeat()))
            time.sleep(0.3)   # queued on the backend socket
            clock.jump(10.0)  # past the worker's expiry (3 x 1 s) since its READY
        # the loop's next turn judges liveness: the queued heartbeat must count first
        time.sleep(0.5)
        assert _worker_state(broker, "sim-w") not in (None, "lost"), broker.status()["workers"]
    finally:
        worker.close(linger=0)
        ctx.term()
        broker.stop()
