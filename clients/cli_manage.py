"""`sdxl-broker status | load | cleanup | cancel | models | queue | history`: managing and
looking into a running broker from a terminal."""

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
        parser.description = (
            "Cancel a queued or running job from this new connection. The broker allows it for "
            "the job's own CURVE key or an admin key (--curve-admin-keys) under CURVE, and on "
            "its --local-frontend. Without CURVE a job belongs to the connection that sent it, "
            "so another process is refused (forbidden): cancel with Ctrl-C in the `sdxl-broker "
            "generate` that sent it, or run serve with --allow-local-cancel to let any client "
            "on the broker's machine cancel any job.")
        parser.add_argument("request_id", help="request_id of the job")
    elif command_name == "models":
        parser.description = ("Every model the workers can load, by kind (base, refiner, vae, "
                              "lora, controlnet, embedding, upscaler), with size, which workers "
                              "have it and which hold it loaded; then the scheduler names.")
    elif command_name == "queue":
        parser.description = ("Running and queued jobs: request id, priority, position, worker, "
                              "stage and step, age.")
        parser.add_argument("--prompts", action="store_true",
                            help="also show the start of each job's prompt")
    elif command_name == "history":
        parser.description = ("Recent finished jobs, newest first, as long as the broker keeps "
                              "their replies: outcome, times, worker, image paths.")
        parser.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")


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
        shown = f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]"
        if w.get("healthy") is False:   # the stuck-job watchdog fired on it
            shown += " [red]unhealthy[/]"
        device = str(w.get("device"))
        if w.get("device_name"):
            device += f" ({w['device_name']})"
        if w.get("simulated"):
            device += " [sim]"
        table.add_row(
            str(w.get("worker_id")), device, _memory_bar(w.get("memory") or {}),
            ", ".join(w.get("models_loaded") or []) or "-",
            shown,
            str(w.get("jobs_done", 0)), f"{float(w.get('last_heartbeat_s') or 0):.1f}s ago")
    console.print(table)


def render_models(data: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"models on {len(data.get('workers') or [])} worker(s)")
    for column in ("kind", "name", "size", "workers", "loaded on"):
        table.add_column(column)
    for kind, rows in (data.get("models") or {}).items():
        for row in rows:
            table.add_row(kind, str(row.get("name")), f"{float(row.get('size_mb') or 0):.1f} MB",
                          ", ".join(row.get("workers") or []) or "-",
                          ", ".join(row.get("loaded_on") or []) or "-")
    console.print(table)
    console.print("schedulers: " + ", ".join(data.get("schedulers") or []))


def render_queue(data: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"{data.get('running', 0)} running, {data.get('queued', 0)} queued")
    jobs = data.get("jobs") or []
    prompts = any("prompt" in job for job in jobs)
    for column in ("request id", "priority", "state", "position", "worker", "stage", "age",
                   *(("prompt",) if prompts else ())):
        table.add_column(column)
    for job in jobs:
        position = job.get("position")
        stage = str(job.get("stage"))
        if job.get("total_steps"):
            stage += f" {job.get('step')}/{job.get('total_steps')}"
        table.add_row(str(job.get("request_id")), str(job.get("priority")), str(job.get("state")),
                      "-" if position is None else str(position), str(job.get("worker_id") or "-"),
                      stage, f"{float(job.get('age_s') or 0):.1f}s",
                      *((str(job.get("prompt") or ""),) if prompts else ()))
    console.print(table)


def render_history(data: dict, console) -> None:
    import time

    from rich.table import Table

    table = Table(title=f"{len(data.get('jobs') or [])} recent job(s) "
                        f"(replies kept {float(data.get('reply_ttl_s') or 0):.0f}s)")
    for column in ("finished", "request id", "outcome", "worker", "total", "images"):
        table.add_column(column)
    for job in data.get("jobs") or []:
        outcome = str(job.get("outcome"))
        if job.get("error_code"):
            outcome += f" ({job['error_code']})"
        total = job.get("total_time")
        table.add_row(time.strftime("%H:%M:%S", time.localtime(float(job.get("finished_at") or 0))),
                      str(job.get("request_id")), outcome, str(job.get("worker_id") or "-"),
                      "-" if total is None else f"{float(total):.2f}s",
                      "\n".join(job.get("images") or []) or "-")
    console.print(table)


CANCEL_REFUSED_HINT = (
    "  this command is a new connection, not the one that submitted the job. To cancel it:\n"
    "  - press Ctrl-C in the `sdxl-broker generate` that sent it (it cancels on its own connection);\n"
    "  - under CURVE, use an admin key: --curve-client-key with a key listed in the broker's "
    "--curve-admin-keys;\n"
    "  - without CURVE, connect to the broker's --local-frontend (--endpoint), or restart serve "
    "with --allow-local-cancel (any client on its machine may then cancel any job).")


_LISTINGS = {"models": ("list_models", render_models), "queue": ("list_queue", render_queue),
             "history": ("list_history", render_history)}


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
            elif args.command == "history":
                data = client.list_history(args.limit)
            elif args.command == "queue":
                data = client.list_queue(include_prompts=args.prompts)
            elif args.command in _LISTINGS:
                data = getattr(client, _LISTINGS[args.command][0])()
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
            if args.command == "cancel" and exc.code == "forbidden":
                print(CANCEL_REFUSED_HINT, file=sys.stderr)
            return 1
    if args.json or args.command not in ("status", *_LISTINGS):
        print(json.dumps(data, indent=2, default=str))
    elif args.command == "status":
        render_status(data, console)
    else:
        _LISTINGS[args.command][1](data, console)
    return 0
