"""`sdxl-broker status | load | cleanup | cancel`: managing a running broker from a terminal."""

from __future__ import annotations

import argparse
import json
import sys

from clients.client import add_connection_arguments


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "status") -> None:
    add_connection_arguments(parser)
    # a load or cleanup is answered when the workers are done (a real SDXL load can take
    # minutes); a resend before that would start a second one
    timeout_s = {"load": 600.0, "cleanup": 60.0}.get(command_name, 5.0)
    parser.add_argument("--timeout-s", type=float, default=timeout_s,
                        help=f"once the broker has answered: silence after which the request is "
                             f"resent (default {timeout_s:g})")
    parser.add_argument("--retries", type=int, default=1, help="resends before giving up (default 1)")
    parser.add_argument("--json", action="store_true", help="print the reply data as JSON")
    if command_name == "status":
        parser.description = ("Broker counters and one row per worker: device, memory, models "
                              "loaded, state, jobs done, seconds since its last heartbeat.")
    elif command_name == "load":
        parser.description = "Load a model onto a worker ahead of use (the broker picks one)."
        parser.add_argument("model", help="model name under the models dir, e.g. tiny-sdxl")
        parser.add_argument("--device", default=None, help="load it on the worker of this device")
    elif command_name == "cleanup":
        parser.description = "Unload models and free device memory on all or named workers."
        parser.add_argument("--worker", action="append", default=[], metavar="ID",
                            help="only this worker (repeatable; default all)")
        parser.add_argument("--model", action="append", default=[], metavar="NAME",
                            help="only this model (repeatable; default all)")
    elif command_name == "cancel":
        parser.description = "Cancel a queued or running job."
        parser.add_argument("request_id", help="request_id of the job")


def _memory_bar(memory: dict, width: int = 12) -> str:
    total = float(memory.get("total_mb") or 0.0)
    used = float(memory.get("used_mb") or 0.0)
    if total <= 0:
        return "?"
    filled = min(int(round(width * used / total)), width)
    return f"{'█' * filled}{'░' * (width - filled)} {used / 1024:.1f}/{total / 1024:.1f} GiB"


_STATE_STYLE = {"idle": "green", "busy": "yellow", "loading": "cyan", "lost": "red"}


def render_status(data: dict, console) -> None:
    from rich.table import Table

    b = data.get("broker") or {}
    console.print(f"[bold]broker[/bold] up {b.get('uptime_s', 0):.0f}s  queue {b.get('queue_depth', 0)}  "
                  f"in flight {b.get('inflight', 0)}  completed {b.get('completed', 0)}  "
                  f"failed {b.get('failed', 0)}")
    table = Table(title=f"{len(data.get('workers') or [])} worker(s)")
    for column in ("worker", "device", "memory", "models loaded", "state", "jobs done", "heartbeat"):
        table.add_column(column)
    for w in data.get("workers") or []:
        state = str(w.get("state"))
        device = str(w.get("device"))
        if w.get("device_name"):
            device += f" ({w['device_name']})"
        if w.get("simulated"):
            device += " [sim]"
        table.add_row(
            str(w.get("worker_id")), device, _memory_bar(w.get("memory") or {}),
            ", ".join(w.get("models_loaded") or []) or "-",
            f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]",
            str(w.get("jobs_done", 0)), f"{float(w.get('last_heartbeat_s') or 0):.1f}s ago")
    console.print(table)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from clients.client import BrokerUnavailable, RequestFailed, client_from_args

    console = Console()
    try:
        client = client_from_args(args, timeout_s=args.timeout_s, retries=args.retries)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            if args.command == "status":
                data = client.status()
            elif args.command == "load":
                data = client.load_model(args.model, args.device)
            elif args.command == "cleanup":
                data = client.cleanup(workers=args.worker or None, models=args.model or None)
            elif args.command == "cancel":
                data = client.cancel(args.request_id)
            else:
                print(f"unknown command {args.command}", file=sys.stderr)
                return 2
        except BrokerUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
        except RequestFailed as exc:
            print(f"error ({exc.code}): {exc.reply.get('error')}", file=sys.stderr)
            for problem in exc.errors:
                print(f"  {problem.get('field')}: {problem.get('message')}", file=sys.stderr)
            return 1
    if args.json or args.command != "status":
        print(json.dumps(data, indent=2, default=str))
    else:
        render_status(data, console)
    return 0
