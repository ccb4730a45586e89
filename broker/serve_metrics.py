"""Prometheus metrics for `--metrics-port` (serve and broker), read from Broker.status() at
scrape time.

A custom collector for state: every scrape shows exactly what `sdxl-broker status` would
(queue depth per priority, per-worker device memory and RSS in bytes from the worker's own
telemetry, last heartbeat time, model load durations, cache hits/misses/evictions). Supervisor facts (worker restarts, workers given up) come from the
Supervisor. Events (replies by outcome and error code, latency histograms, missed heartbeats)
are counted inside the broker by broker.metrics; pass its registry to serve both on one port.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

_WORKER_LABELS = ["worker_id", "device"]
_MIB = float(2**20)   # workers report MB (MiB); Prometheus wants base units
# status-row keys (from worker telemetry; reset when the worker process restarts)
_CACHE_COUNTERS = {
    "cache_hits": "Model loads the worker answered from its cache",
    "cache_misses": "Model loads the worker had to read from disk",
    "cache_evictions": "Models the worker evicted from its cache to stay within budget",
}


class StatusCollector:
    def __init__(self, status: Callable[[], dict], supervisor=None):
        self._status = status
        self._supervisor = supervisor

    def collect(self):
        data = self._status()
        b = data.get("broker") or {}
        yield GaugeMetricFamily("sdxl_broker_uptime_seconds", "Seconds since the broker started",
                                value=float(b.get("uptime_s") or 0.0))
        yield GaugeMetricFamily("sdxl_broker_queue_depth", "Jobs waiting for a worker",
                                value=float(b.get("queue_depth") or 0))
        by_priority = GaugeMetricFamily("sdxl_broker_queue_depth_by_priority",
                                        "Jobs waiting for a worker, per priority",
                                        labels=["priority"])
        for priority, depth in (b.get("queue_depth_by_priority") or {}).items():
            by_priority.add_metric([str(priority)], float(depth))
        yield by_priority
        yield GaugeMetricFamily("sdxl_broker_jobs_inflight", "Jobs running on workers",
                                value=float(b.get("inflight") or 0))
        yield GaugeMetricFamily("sdxl_broker_queue_bytes", "Request bytes (images included) the "
                                "waiting jobs hold; --max-queue-mb bounds it",
                                value=float(b.get("queue_bytes") or 0))
        yield GaugeMetricFamily("sdxl_broker_unstored_replies", "Final replies the journal could "
                                "not store yet (a full disk), kept in memory and retried",
                                value=float(b.get("unstored_replies") or 0))
        # inflow only; outcomes are sdxl_broker_jobs_finished_total (broker.metrics), so a
        # sum() over either never counts a job twice
        yield CounterMetricFamily("sdxl_broker_jobs_accepted", "Generation jobs accepted into "
                                  "the queue (resends of a known request_id excluded)",
                                  value=float(b.get("accepted") or 0))

        workers = data.get("workers") or []
        now = time.time()
        gauges = {
            "memory_used": GaugeMetricFamily("sdxl_worker_memory_used_bytes",
                                             "Device memory in use, as the worker reports it",
                                             labels=_WORKER_LABELS),
            "memory_total": GaugeMetricFamily("sdxl_worker_memory_total_bytes",
                                              "Device memory in total, as the worker reports it",
                                              labels=_WORKER_LABELS),
            "rss": GaugeMetricFamily("sdxl_worker_resident_memory_bytes",
                                     "Worker process resident memory (RSS)", labels=_WORKER_LABELS),
            "last_heartbeat": GaugeMetricFamily("sdxl_worker_last_heartbeat_timestamp_seconds",
                                                "Unix time the worker was last heard from",
                                                labels=_WORKER_LABELS),
            "models_loaded": GaugeMetricFamily("sdxl_worker_models_loaded",
                                               "Models held warm", labels=_WORKER_LABELS),
            "healthy": GaugeMetricFamily("sdxl_worker_healthy",
                                         "0 after the stuck-job watchdog fired on the worker, "
                                         "until it finishes a job; else 1", labels=_WORKER_LABELS),
        }
        load_seconds = GaugeMetricFamily("sdxl_worker_model_load_duration_seconds",
                                         "How long the worker's last load of this model took",
                                         labels=_WORKER_LABELS + ["model"])
        done = CounterMetricFamily("sdxl_worker_jobs", "Jobs finished per worker",
                                   labels=_WORKER_LABELS + ["outcome"])
        state = GaugeMetricFamily("sdxl_worker_state", "1 for the worker's current state",
                                  labels=_WORKER_LABELS + ["state"])
        cache = {key: CounterMetricFamily(f"sdxl_worker_{key}", help_text, labels=_WORKER_LABELS)
                 for key, help_text in _CACHE_COUNTERS.items()}
        for w in workers:
            labels = [str(w.get("worker_id")), str(w.get("device"))]
            memory = w.get("memory") or {}
            gauges["memory_used"].add_metric(labels, _MIB * float(memory.get("used_mb") or 0.0))
            gauges["memory_total"].add_metric(labels, _MIB * float(memory.get("total_mb") or 0.0))
            if w.get("rss_mb") is not None:
                gauges["rss"].add_metric(labels, _MIB * float(w["rss_mb"]))
            gauges["last_heartbeat"].add_metric(
                labels, round(now - float(w.get("last_heartbeat_s") or 0.0), 3))
            gauges["models_loaded"].add_metric(labels, float(len(w.get("models_loaded") or [])))
            gauges["healthy"].add_metric(labels, 0.0 if w.get("healthy") is False else 1.0)
            for model, seconds in sorted((w.get("load_time_s") or {}).items()):
                load_seconds.add_metric(labels + [str(model)], float(seconds))
            done.add_metric(labels + ["done"], float(w.get("jobs_done") or 0))
            done.add_metric(labels + ["failed"], float(w.get("jobs_failed") or 0))
            for name in ("idle", "busy", "loading", "lost"):
                state.add_metric(labels + [name], 1.0 if w.get("state") == name else 0.0)
            for key, family in cache.items():
                family.add_metric(labels, float(w.get(key) or 0))
        yield from gauges.values()
        yield load_seconds
        yield from cache.values()
        yield done
        yield state

        if self._supervisor is not None:
            restarts = CounterMetricFamily("sdxl_worker_restarts",
                                           "Worker processes restarted after a crash",
                                           labels=["worker_id"])
            for name, count in self._supervisor.restarts().items():
                restarts.add_metric([name], float(count))
            yield restarts
            yield GaugeMetricFamily("sdxl_broker_workers_given_up",
                                    "Workers that kept crashing and are not restarted",
                                    value=float(len(self._supervisor.given_up())))


def start_metrics_server(port: int, status: Callable[[], dict], supervisor=None,
                         addr: str = "127.0.0.1", registry: CollectorRegistry | None = None):
    """Serve /metrics on addr:port in a daemon thread. Returns (server, thread).
    `registry`: the broker's own (Broker.metrics.registry), to which the status collector is
    added so one scrape returns both; a fresh one when None."""
    registry = registry if registry is not None else CollectorRegistry()
    registry.register(StatusCollector(status, supervisor))
    server, thread = start_http_server(port, addr=addr, registry=registry)
    log.info("Prometheus metrics on http://%s:%d/metrics", addr, server.server_port)
    return server, thread
