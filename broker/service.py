"""`sdxl-broker broker` and `sdxl-broker serve`: one run path for both.

`broker` runs the Broker alone; `serve` runs the same Broker plus its local worker pool
(broker.serve.LocalWorkers). Both take their settings from runtime.settings (flags > env >
TOML > defaults), log the same way, bind, serve metrics when asked, print exactly one line
`ready <frontend endpoint>` on stdout once accepting (serve: once every worker registered),
and on SIGINT/SIGTERM drain (no new jobs; running ones finish or hit --drain-timeout-s), stop
the workers, and exit. A second signal cuts a drain that has not begun yet. Workers run in
their own sessions, so a terminal's Ctrl-C reaches only this process, which stops them after
the drain; on Linux they also get SIGTERM if it dies (PR_SET_PDEATHSIG).

This process never imports torch, diffusers or gpu_worker (tests/serve/test_settings_table.py
checks a real `serve`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading

from runtime import settings as settings_table
from runtime.logs import configure_logging
from runtime.settings import ConfigError

log = logging.getLogger("sdxl_broker.service")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    settings_table.add_arguments(parser, command)


def broker_config(settings: dict):
    """The BrokerConfig of these settings (every field the table has; the rest default)."""
    from broker.server import BrokerConfig

    names = {f.name for f in dataclasses.fields(BrokerConfig)}
    return BrokerConfig(**{name: settings[name] for name in names if name in settings})


class _Signals:
    """SIGINT/SIGTERM -> `stop`; a second one -> `hurry` (skip a drain not yet begun)."""

    def __init__(self):
        self.stop = threading.Event()
        self.hurry = threading.Event()
        self._previous = {sig: signal.signal(sig, self._on_signal)
                          for sig in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.stop.is_set():
            log.warning("%s again: already stopping (the drain lasts at most --drain-timeout-s)", name)
            self.hurry.set()
        else:
            log.info("%s received: draining and stopping", name)
        self.stop.set()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _remove_stale_ipc(endpoints: list[str]) -> None:
    """Unlink the ipc:// socket files this process bound (never another process's)."""
    for endpoint in endpoints:
        if not endpoint.startswith("ipc://"):
            continue
        path = endpoint[len("ipc://"):]
        if os.path.exists(path):
            try:
                os.unlink(path)
                log.info("removed ipc socket file %s", path)
            except OSError as exc:
                log.warning("cannot remove ipc socket file %s: %s", path, exc)


def _registered_ids(broker) -> set[str]:
    return {w["worker_id"] for w in broker.status().get("workers", []) if w.get("state") != "lost"}


def run(args: argparse.Namespace) -> int:
    command = args.command
    try:
        settings = settings_table.resolve(args, command)
    except ConfigError as exc:
        print(f"sdxl-broker {command}: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings["log_level"], settings["log_format"])

    workers = None
    if command == "serve":
        from broker.serve import LocalWorkers, check_gateway, gateway_local_frontend, plan_workers

        try:
            check_gateway(settings)
            settings["local_frontend"] = gateway_local_frontend(settings) or settings.get("local_frontend")
            plans = plan_workers(settings)
        except ConfigError as exc:
            log.error("%s", exc)
            return 2
        if not plans:
            log.warning("no workers planned: jobs will queue until a worker connects to the backend")
        workers = LocalWorkers(plans, settings)

    from broker.server import Broker

    signals = _Signals()
    try:
        config = broker_config(settings)
        if workers is not None:
            workers.prepare_curve(config)
        broker = Broker(config)
    except (TypeError, ValueError, OSError) as exc:
        log.error("bad broker settings: %s", exc)
        signals.restore()
        return 2

    try:
        broker.start()
    except Exception as exc:  # e.g. zmq.ZMQError: Address already in use
        log.error("cannot start the broker on %s / %s: %s", settings["frontend"],
                  settings["backend"], exc)
        signals.restore()
        return 1
    endpoints = [broker.frontend_endpoint, broker.backend_endpoint]
    if broker.local_frontend_endpoint:
        endpoints.append(broker.local_frontend_endpoint)
    exit_code = 0
    metrics_server = None
    try:
        if settings["metrics_port"] is not None:
            from broker.serve_metrics import start_metrics_server

            try:
                metrics_server, _ = start_metrics_server(
                    settings["metrics_port"], broker.status,
                    workers.supervisor if workers is not None else None,
                    addr=settings["metrics_addr"], registry=broker.metrics.registry)
            except OSError as exc:
                log.error("cannot serve metrics on %s:%s: %s", settings["metrics_addr"],
                          settings["metrics_port"], exc)
                exit_code = 1
                return exit_code
        if workers is not None:
            workers.start(broker.backend_endpoint,
                          gateway_endpoint=broker.local_frontend_endpoint or broker.frontend_endpoint)
            if not workers.wait_registered(lambda: _registered_ids(broker), signals.stop,
                                           settings["ready_timeout_s"]):
                if not signals.stop.is_set():
                    exit_code = 1
                return exit_code
        sys.stdout.write(f"ready {broker.frontend_endpoint}\n")
        sys.stdout.flush()
        while not signals.stop.wait(0.5):
            if not broker.is_running():
                log.error("the broker loop ended unexpectedly; stopping")
                exit_code = 1
                break
    finally:
        if workers is not None:
            workers.stop_restarting()
        drain_s = 0.0 if signals.hurry.is_set() or exit_code else settings["drain_timeout_s"]
        if drain_s:
            log.info("draining: no new jobs; running ones get up to %.0fs", drain_s)
        try:
            broker.stop(drain_timeout_s=drain_s)
        except Exception:
            log.exception("broker did not stop cleanly")
        if workers is not None:
            workers.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
        _remove_stale_ipc(endpoints)
        signals.restore()
        log.info("%s stopped", command)
    return exit_code
