"""One phase of a stress run: bring a topology up, load it, inject faults, drain, resend what
is unanswered, measure, tear down. Also the soak (many cheap requests, memory and journal size
printed as it goes)."""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from . import bodies, hostile_faults
from . import procs as P
from .clients import Conn, DealerClient, LoadConfig, ReqClient, VanishingClient, resend_unanswered
from .faults import (FAULT_KINDS, FaultScheduler, ServeOptions, ServeTopology, SplitTopology,
                     build_schedule)
from .ledger import Entry, Ledger
from .probes import BadInputClient, StatusMonitor
from .worker_health import healthy_workers_lost

log = logging.getLogger("stress.runner")


@dataclass
class PhasePlan:
    kind: str                 # serve | split
    duration_s: float
    dealer_clients: int = 10
    req_clients: int = 4
    vanishing_clients: int = 1
    drain_s: float = 30.0
    resend_wait_s: float = 30.0
    burst_size: int = 150
    bad_input: bool = True
    faults: bool = True
    fault_kinds: tuple[str, ...] = FAULT_KINDS


def run_phase(plan: PhasePlan, opts: ServeOptions, ledger: Ledger, procs: P.ProcessSet,
              ctx: zmq.Context, run_dir: Path, seed: int,
              interrupted: threading.Event) -> dict:
    rng = random.Random(seed)
    topo = (ServeTopology if plan.kind == "serve" else SplitTopology)(procs, run_dir, opts)
    log.info("phase %s: starting (%.0fs of load)", plan.kind, plan.duration_s)
    t0 = time.monotonic()
    try:
        topo.start(ctx)
    except BaseException:
        topo.stop()   # what did start (and the tmpfs, if mounted)
        raise
    startup_s = time.monotonic() - t0
    cfg = LoadConfig(phase=plan.kind, resend_after_s=max(8.0, opts.heartbeat_interval_s * 20))
    stop_sending, stop_now, stop_side = threading.Event(), threading.Event(), threading.Event()
    monitor = StatusMonitor(ctx, topo.frontend, stop_side, interval_s=1.0)
    monitor.poll_once()
    monitor.start()
    drivers: list[threading.Thread] = []
    for i in range(plan.dealer_clients):
        drivers.append(DealerClient(f"d{i}", ctx, topo.frontend, ledger, cfg, rng.randrange(2**31),
                                    stop_sending, stop_now))
    for i in range(plan.req_clients):
        drivers.append(ReqClient(f"r{i}", ctx, topo.frontend, ledger, cfg, rng.randrange(2**31),
                                 stop_sending, stop_now))
    for i in range(plan.vanishing_clients):
        drivers.append(VanishingClient(f"v{i}", ctx, topo.frontend, ledger, cfg,
                                       rng.randrange(2**31), stop_sending, stop_now))
    bad = None
    if plan.bad_input:
        bad = BadInputClient(ctx, topo.frontend, ledger, plan.kind, rng.randrange(2**31),
                             stop_side, simulated_workers=not opts.real,
                             worker_reply_wait_s=180.0 if opts.real else 20.0)
    schedule = (build_schedule(plan.kind, plan.duration_s, rng, plan.fault_kinds)
                if plan.faults else [])
    scheduler = FaultScheduler(topo, monitor, ledger, ctx, cfg, schedule, stop_side,
                               rng.randrange(2**31), bad, plan.burst_size)
    for d in drivers:
        d.start()
    if bad:
        bad.start()
    scheduler.start()
    broker_ok = True
    measured_until = None
    try:
        deadline = time.monotonic() + plan.duration_s
        while time.monotonic() < deadline and not interrupted.is_set():
            if not topo.check_broker():
                broker_ok = False
                break
            time.sleep(0.25)
        # drain: no new requests and no new fault, wait for the outstanding ones (also those
        # of a fault still running: a big body's reply can take many seconds to come)
        stop_sending.set()
        scheduler.load_over.set()
        scheduler_stop_at = time.monotonic()
        # drain while finals keep arriving: drain_s without any, 10 x drain_s in all
        hard_deadline = time.monotonic() + 10 * plan.drain_s
        drain_deadline = time.monotonic() + plan.drain_s
        finals_seen = ledger.finals_count()
        while ((any(d.is_alive() for d in drivers) or scheduler.busy())
               and time.monotonic() < min(drain_deadline, hard_deadline)
               and not interrupted.is_set()):
            if broker_ok and not topo.check_broker():
                broker_ok = False
            time.sleep(0.2)
            if ledger.finals_count() != finals_seen:
                finals_seen = ledger.finals_count()
                drain_deadline = time.monotonic() + plan.drain_s
        stop_now.set()
        stop_side.set()
        for d in drivers:
            d.join(timeout=10)
        if bad:
            bad.join(timeout=bad.worker_reply_wait_s + 10)
        scheduler.join(timeout=90)
        log.info("phase %s: load done; drained in %.1fs", plan.kind,
                 time.monotonic() - scheduler_stop_at)
        if broker_ok and not topo.check_broker():
            broker_ok = False
        resend = {"resent": 0, "answered": 0}
        if broker_ok and not interrupted.is_set():
            resend = resend_unanswered(ctx, topo.frontend, ledger, plan.kind, plan.resend_wait_s)
            log.info("phase %s: end-of-run resend %s", plan.kind, resend)
        final_status = monitor.poll_once() if broker_ok else None
        rss_end = P.rss_mb(topo.broker_pid()) if topo.broker_alive() else None
        if broker_ok and not topo.check_broker():
            broker_ok = False
        measured_until = time.time()   # give-ups after this are the shutdown's
    finally:
        stop_sending.set()
        stop_now.set()
        stop_side.set()
        topo.stop()
    health = healthy_workers_lost(topo.broker_logs(), topo.fault_log, measured_until)
    hostile_faults.settle_stuck_workers(scheduler.attacks, ledger)
    client_errors = [f"{d.name}: {d.error!r}" for d in drivers if getattr(d, "error", None)]
    for thing in (bad, scheduler):
        if thing is not None and thing.error is not None:
            client_errors.append(f"{thing.name}: {thing.error!r}")
    worker_restarts = (topo.worker_restarts if isinstance(topo, SplitTopology)
                       else monitor.new_worker_pids())
    growth = (round(rss_end - topo.rss_start_mb, 1)
              if rss_end is not None and topo.rss_start_mb is not None else None)
    return {
        "phase": plan.kind,
        "load_s": plan.duration_s,
        "startup_s": round(startup_s, 1),
        "frontend": topo.frontend,
        "broker_ok": broker_ok,
        "unplanned_broker_deaths": topo.unplanned_broker_deaths,
        "planned_broker_restarts": topo.planned_broker_restarts,
        "worker_kills": topo.worker_kills,
        "worker_stops": topo.worker_stops,
        "worker_restarts": worker_restarts,
        "broker_rss_first_start_mb": topo.rss_first_start_mb,
        "broker_rss_start_mb": topo.rss_start_mb,
        "broker_rss_end_mb": rss_end,
        "broker_rss_growth_mb": growth,
        "max_queue_depth_seen": monitor.max_queue_depth,
        "status_polls": monitor.polls,
        "status_polls_unanswered": monitor.unanswered,
        "final_broker_status": (final_status or {}).get("broker"),
        "faults": scheduler.done,
        "attacks": scheduler.attacks,
        **health,
        "end_resend": resend,
        "bad_input": bad.summary() if bad else None,
        "tool_errors": client_errors,
        "logs": str(run_dir),
    }


# --- soak -------------------------------------------------------------------------------------

def run_soak(total: int, opts: ServeOptions, ledger: Ledger, procs: P.ProcessSet,
             ctx: zmq.Context, run_dir: Path, interrupted: threading.Event,
             report_every: int = 10_000, clients: int = 4, window: int = 32,
             print_fn=print) -> dict:
    """`total` cheap requests (1 step, zero simulated step time) through a split topology with
    a journal; every `report_every` finals print broker RSS and the journal's size on disk."""
    topo = SplitTopology(procs, run_dir, opts)
    topo.start(ctx)
    rss_samples: list[dict] = []
    done = threading.Semaphore(0)
    counts = {"sent": 0, "final": 0}
    lock = threading.Lock()

    def client(index: int) -> None:
        rng = random.Random(index)
        conn = Conn(ctx, topo.frontend, ledger, rng)
        n = 0
        try:
            while not interrupted.is_set():
                while len(conn.pending) < window:
                    with lock:
                        if counts["sent"] >= total:
                            break
                        counts["sent"] += 1
                    n += 1
                    rid = f"soak-{index}-{n}"
                    form = bodies.FORMS[n % 3]
                    codec = bodies.CODECS[n % 2]
                    spec = bodies.GenerationSpec(request_id=rid, form=form, steps=1)
                    conn.send(ledger.add(Entry(
                        key=rid, request_id=rid, kind="dealer", phase="soak",
                        frame=bodies.encode(bodies.generation_body(spec), codec), codec=codec,
                        expected_reply_type=bodies.REPLY_TYPE[form])))
                if not conn.pending:
                    return
                if conn.poll(200):
                    while conn.poll(0):
                        key, reply = conn.receive()
                        if key and reply.get("final") is not False:
                            done.release()
                elif conn.overdue(30.0):
                    log.warning("soak client %d: %d requests overdue", index, len(conn.pending))
                    return
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    started = time.monotonic()
    rss_start = topo.rss_start_mb
    print_fn(f"soak: {total} requests, {clients} clients x {window} in flight, "
             f"{opts.workers} simulated workers (step 0 s); broker RSS at start {rss_start} MB")
    for t in threads:
        t.start()
    finals = 0
    try:
        while finals < total and not interrupted.is_set():
            if not done.acquire(timeout=60):
                log.error("soak: no final reply for 60 s; stopping")
                break
            finals += 1
            if finals % report_every == 0 or finals == total:
                sample = {"finals": finals, "elapsed_s": round(time.monotonic() - started, 1),
                          "broker_rss_mb": P.rss_mb(topo.broker_pid()),
                          "journal_mb": P.dir_size_mb(topo.state_dir)}
                sample["rate_per_s"] = round(finals / max(sample["elapsed_s"], 1e-9), 1)
                rss_samples.append(sample)
                print_fn(f"soak: {finals:>7} finals  {sample['elapsed_s']:>7.1f}s  "
                         f"{sample['rate_per_s']:>7.1f}/s  broker RSS {sample['broker_rss_mb']} MB"
                         f"  journal {sample['journal_mb']} MB")
        for t in threads:
            t.join(timeout=30)
        broker_ok = topo.check_broker()
        rss_end = P.rss_mb(topo.broker_pid()) if broker_ok else None
    finally:
        topo.stop()
    return {
        "phase": "soak", "requests": total, "finals": finals, "broker_ok": broker_ok,
        "unplanned_broker_deaths": topo.unplanned_broker_deaths,
        "broker_rss_start_mb": rss_start, "broker_rss_end_mb": rss_end,
        "broker_rss_growth_mb": (round(rss_end - rss_start, 1)
                                 if rss_end is not None and rss_start is not None else None),
        "samples": rss_samples, "elapsed_s": round(time.monotonic() - started, 1),
        "journal_mb_end": P.dir_size_mb(topo.state_dir), "logs": str(run_dir),
    }
