"""The broker's own Prometheus metrics: what happens at one moment and is gone from status().

Final replies by outcome and error code, latency histograms (queue, inference, total) and
workers lost to missed heartbeats are events: they are counted where they happen (the loop
thread) into a CollectorRegistry owned by one Broker, never the global default registry, so
several brokers in one process (tests) never clash. State that status() already shows (queue
depth per priority, worker memory, cache counters) is read at scrape time by
broker.serve_metrics.StatusCollector, registered into the same registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from protocol import constants as C

# from a simulated job (10 ms) to a big SDXL batch on a slow device (10 min)
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                     60.0, 120.0, 300.0, 600.0)

COMPLETED, FAILED, CANCELLED, REJECTED = "completed", "failed", "cancelled", "rejected"


def outcome_of(reply: dict) -> str:
    if reply.get("success"):
        return COMPLETED
    return CANCELLED if reply.get("error_code") == C.CANCELLED else FAILED


class BrokerMetrics:
    """Counters and histograms one Broker updates; `registry` is what /metrics serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.replies = Counter(
            "sdxl_broker_replies", "Final replies by outcome (completed, failed, cancelled; "
            "rejected: refused before it was queued) and error code (empty on success)",
            ["outcome", "error_code"], registry=self.registry)
        self.queue_seconds = Histogram(
            "sdxl_broker_job_queue_seconds", "Seconds a job waited from acceptance to its "
            "(last) dispatch to a worker", buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.inference_seconds = Histogram(
            "sdxl_broker_job_inference_seconds", "Seconds of inference the worker reported "
            "(processing_metrics.inference_time) for completed jobs",
            buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.total_seconds = Histogram(
            "sdxl_broker_job_total_seconds", "Seconds from acceptance to the final reply, any "
            "outcome", ["outcome"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.missed_heartbeats = Counter(
            "sdxl_broker_missed_heartbeats", "Workers declared lost because no heartbeat came "
            "within heartbeat_interval_s * heartbeat_liveness", ["worker_id"],
            registry=self.registry)
        # labelled children, looked up once: .labels() takes a lock and validates every call
        self._children: dict[tuple, object] = {}

    def _child(self, metric, *labels: str):
        key = (id(metric), *labels)   # error codes are a closed set: this stays small
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def job_finished(self, reply: dict, *, total_s: float, queue_s: float | None) -> None:
        """The final reply of an accepted job (called once per job, from Broker._finish)."""
        outcome = outcome_of(reply)
        self._child(self.replies, outcome, str(reply.get("error_code") or "")).inc()
        self._child(self.total_seconds, outcome).observe(max(total_s, 0.0))
        if queue_s is not None:
            self.queue_seconds.observe(max(queue_s, 0.0))
        data = reply.get("data")
        processing = data.get("processing_metrics") if isinstance(data, dict) else None
        if isinstance(processing, dict):
            inference_s = processing.get("inference_time")
            if isinstance(inference_s, (int, float)) and inference_s >= 0:
                self.inference_seconds.observe(float(inference_s))

    def request_rejected(self, error_code: str) -> None:
        """A request answered with an error before it became a job (validation, queue full...)."""
        self._child(self.replies, REJECTED, str(error_code or "")).inc()

    def heartbeat_missed(self, worker_id: str) -> None:
        self.missed_heartbeats.labels(str(worker_id)).inc()
