#!/usr/bin/env python3
"""Scripted stress and fault run for sdxl-broker: load held, faults survived, bad input refused,
nothing lost.

Loopback only, bounded in time, stops by itself, and stops every process it started (also on
Ctrl-C, SIGTERM or an exception). Two phases by default:

  serve   `sdxl-broker serve --sim-workers N`: many DEALER/REQ clients (JSON and msgpack, the
          three generation forms, progress on and off, mixed priorities, duplicate request
          ids, cancels, short timeouts), vanishing clients, a stream of bad input, and faults:
          kill -9 of a worker (serve's supervisor restarts it), SIGSTOP/SIGCONT of a worker, a
          burst past --max-queue, a frame over --max-message-mb, and the hostile ones:
          big_bodies (legal ~60 MB JSON and msgpack requests), poison_telemetry (a worker peer
          sending telemetry "x", free_mb "abc" and other garbage), rogue_worker (READY with a
          real worker's id, then forged results for jobs it never got), stuck_worker (heart-
          beats, takes jobs, never finishes one);
  split   `sdxl-broker broker --state-dir D` + N `sdxl-broker worker --sim` started here, the
          same load and faults plus one kill -9 and restart of the broker and full_disk (the
          state dir is a tmpfs this script mounts when run as root, filled and freed; skipped
          with the reason otherwise); clients resend their unfinished request ids and must
          get exactly one final reply each.

At the end every request still without a final reply is resent (same body) from a fresh socket;
`lost` counts those that still get none, `duplicated` those with more than one final reply;
`healthy workers lost` counts workers the run did not fault that the broker declared lost,
disconnected or let another connection take over (read from the broker's log).
Exit status: 0 all guarantees held; 1 something was lost or duplicated, a healthy worker was
lost, the broker died outside the planned restart, its RSS grew past --max-rss-growth-mb, or a contract violation was seen;
2 the system did not come up or the tool broke; 130 interrupted.

Examples:
  python scripts/stress.py --seconds 45 --json-out /tmp/stress.json
  python scripts/stress.py --minutes 10
  python scripts/stress.py --soak 100000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zmq  # noqa: E402

from stress_lib import procs as P  # noqa: E402
from stress_lib import report  # noqa: E402
from stress_lib.faults import FAULT_KINDS, ServeOptions, SetupError  # noqa: E402
from stress_lib.ledger import Ledger  # noqa: E402
from stress_lib.runner import PhasePlan, run_phase, run_soak  # noqa: E402

log = logging.getLogger("stress")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stress.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, help="seconds of load (default 60)")
    length.add_argument("--minutes", type=float, help="minutes of load")
    length.add_argument("--soak", type=int, metavar="N",
                        help="soak mode: N cheap requests through simulated workers with zero "
                             "step time, printing broker RSS and journal size every 10,000")
    p.add_argument("--soak-report-every", type=int, default=10_000, metavar="N",
                   help="soak mode: print broker RSS and journal size every N finals")
    p.add_argument("--topology", choices=("both", "serve", "split"), default="both",
                   help="serve phase, split phase (broker restart), or both (default; the load "
                        "time is split 55/45)")
    p.add_argument("--workers", type=int, default=3, help="workers per phase (default 3)")
    p.add_argument("--real", action="store_true",
                   help="real tiny-model workers instead of simulated ones (builds the demo "
                        "models unless --models-dir is given; slow: use few clients)")
    p.add_argument("--models-dir", default=None, help="demo models for --real")
    p.add_argument("--dealer-clients", type=int, default=None,
                   help="concurrent DEALER clients (default 10; 3 with --real)")
    p.add_argument("--req-clients", type=int, default=None,
                   help="concurrent REQ clients (default 4; 1 with --real)")
    p.add_argument("--vanishing-clients", type=int, default=1,
                   help="clients that send and disappear mid-job")
    p.add_argument("--max-queue", type=int, default=None,
                   help="the broker's --max-queue; the burst fault sends 1.5x this at once "
                        "(default 100; 20 with --real)")
    p.add_argument("--max-message-mb", type=int, default=64,
                   help="the broker's --max-message-mb (default 64, the product's); the "
                        "oversized frame is 2 bytes over, big bodies 1 MB under at most")
    p.add_argument("--fault-kinds", default=",".join(FAULT_KINDS), metavar="K1,K2",
                   help="faults to inject (default all): " + ", ".join(FAULT_KINDS))
    p.add_argument("--big-body-mb", type=float, default=60.0,
                   help="size of each big_bodies request (default 60)")
    p.add_argument("--big-bodies-per-fault", type=int, default=4,
                   help="big bodies per big_bodies fault, JSON and msgpack alternately")
    p.add_argument("--stuck-job-s", type=float, default=5.0,
                   help="the broker's --stuck-job-s, passed where the product has the flag "
                        "(a stuck_worker's jobs are then re-run elsewhere); default 5")
    p.add_argument("--full-disk-mb", type=int, default=512,
                   help="size of the tmpfs mounted as the split phase's state dir for the "
                        "full_disk fault (root only; 0: keep the state dir on the real disk)")
    p.add_argument("--sim-step-s", type=float, default=0.02, help="simulated time per step")
    p.add_argument("--sim-load-s", type=float, default=0.2, help="simulated model load time")
    p.add_argument("--heartbeat-interval-s", type=float, default=0.5,
                   help="broker/worker heartbeat (a stopped worker is lost after 3 of them)")
    p.add_argument("--reply-ttl-s", type=float, default=None,
                   help="the broker's --reply-ttl-s in the split phase and the soak (default: "
                        "the broker's own); a short one shows the journal staying bounded")
    p.add_argument("--drain-s", type=float, default=30.0,
                   help="after the load, wait this long for outstanding replies")
    p.add_argument("--resend-wait-s", type=float, default=30.0,
                   help="wait this long for replies to the end-of-run resend")
    p.add_argument("--max-rss-growth-mb", type=float, default=200.0,
                   help="fail when the broker's RSS grows more than this (default 200)")
    p.add_argument("--no-faults", action="store_true", help="load only, no fault injection")
    p.add_argument("--no-bad-input", action="store_true", help="no bad-input stream")
    p.add_argument("--seed", type=int, default=None, help="RNG seed (default: random, printed)")
    p.add_argument("--run-dir", default=None,
                   help="where process logs and the journal go (default: a new temp dir, kept)")
    p.add_argument("--json-out", default=None, metavar="FILE", help="write the summary as JSON")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p


def _serve_options(args, models_dir: str | None) -> ServeOptions:
    return ServeOptions(
        workers=args.workers, real=args.real, models_dir=models_dir,
        sim_step_s=args.sim_step_s, sim_load_s=args.sim_load_s, max_queue=args.max_queue,
        max_message_mb=args.max_message_mb, heartbeat_interval_s=args.heartbeat_interval_s,
        ready_timeout_s=300.0 if args.real else 90.0, reply_ttl_s=args.reply_ttl_s,
        big_body_mb=args.big_body_mb, big_bodies_per_fault=args.big_bodies_per_fault,
        stuck_job_s=args.stuck_job_s, full_disk_mb=args.full_disk_mb or None)


def _demo_models(procs: P.ProcessSet, run_dir: Path) -> str:
    out = run_dir / "models"
    child = procs.start("demo-models", P.sdxl_broker_argv() + ["demo-models", "--out", str(out)])
    code = child.popen.wait(timeout=600)
    if code != 0:
        raise SetupError(f"demo-models failed ({code}):\n{P.tail(child.log_path)}")
    return str(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.dealer_clients is None:
        args.dealer_clients = 3 if args.real else 10
    if args.max_queue is None:
        args.max_queue = 20 if args.real else 100
    if args.req_clients is None:
        args.req_clients = 1 if args.real else 4
    fault_kinds = tuple(k.strip() for k in args.fault_kinds.split(",") if k.strip())
    unknown = sorted(set(fault_kinds) - set(FAULT_KINDS))
    if unknown:
        build_parser().error(f"unknown fault kinds {', '.join(unknown)}; known: "
                             f"{', '.join(FAULT_KINDS)}")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="sdxl-stress-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("stress run: seed %d, logs and journal in %s", seed, run_dir)
    P.install_sigterm_as_exit()
    procs = P.ProcessSet(run_dir / "logs")
    ctx = zmq.Context()
    ledger = Ledger()
    interrupted = threading.Event()
    phases: list[dict] = []
    try:
        models_dir = args.models_dir
        if args.real and not models_dir:
            models_dir = _demo_models(procs, run_dir)
        opts = _serve_options(args, models_dir)
        if args.soak:
            return _soak(args, opts, ledger, procs, ctx, run_dir, interrupted)
        load_s = args.minutes * 60 if args.minutes else (args.seconds or 60.0)
        kinds = ["serve", "split"] if args.topology == "both" else [args.topology]
        shares = {"serve": 0.55, "split": 0.45} if len(kinds) == 2 else {kinds[0]: 1.0}
        for i, kind in enumerate(kinds):
            plan = PhasePlan(kind=kind, duration_s=load_s * shares[kind],
                             dealer_clients=args.dealer_clients, req_clients=args.req_clients,
                             vanishing_clients=args.vanishing_clients, drain_s=args.drain_s,
                             resend_wait_s=args.resend_wait_s,
                             burst_size=int(args.max_queue * 1.5),
                             bad_input=not args.no_bad_input, faults=not args.no_faults,
                             fault_kinds=fault_kinds)
            phases.append(run_phase(plan, opts, ledger, procs, ctx, run_dir, seed + i,
                                    interrupted))
    except SetupError as exc:
        log.error("setup failed: %s", exc)
        return report.EXIT_SETUP
    except KeyboardInterrupt:
        interrupted.set()
        log.warning("interrupted: stopping every process started")
        return report.EXIT_INTERRUPTED
    finally:
        procs.close()
        ctx.destroy(linger=0)
    args_out = {k: v for k, v in vars(args).items()}
    args_out["seed"] = seed
    summary = report.build_summary(ledger, phases, args.max_rss_growth_mb, args_out)
    report.print_table(summary)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2, default=str))
        log.info("summary written to %s", args.json_out)
    return report.exit_code(summary)


def _soak(args, opts, ledger, procs, ctx, run_dir, interrupted) -> int:
    opts.sim_step_s = 0.0
    opts.sim_load_s = 0.0
    opts.full_disk_mb = None   # the soak measures the journal's growth, on the real disk
    opts.max_queue = max(opts.max_queue, 1000)
    result = run_soak(args.soak, opts, ledger, procs, ctx, run_dir, interrupted,
                      report_every=args.soak_report_every)
    totals = ledger.summary("soak")
    totals.pop("dedupe_mismatches", None)
    failures = report.evaluate(totals, [result], dict(ledger.violations), args.max_rss_growth_mb)
    summary = {"ok": not failures, "failures": failures, "totals": totals, "soak": result,
               "violations": dict(ledger.violations),
               "violation_examples": dict(ledger.violation_examples)}
    print(json.dumps({k: summary[k] for k in ("ok", "failures")}
                     | {"lost": totals["lost"], "duplicated": totals["duplicated"],
                        "completed": totals["completed"], "failed_by_code": totals["failed_by_code"],
                        "rss_start_mb": result["broker_rss_start_mb"],
                        "rss_end_mb": result["broker_rss_end_mb"],
                        "journal_mb_end": result["journal_mb_end"]}, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2, default=str))
    return report.EXIT_FAILED if failures else report.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
