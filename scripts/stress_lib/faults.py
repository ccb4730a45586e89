"""What the stress run serves against, and the faults it injects on a schedule.

Two topologies:
- `ServeTopology`: one `sdxl-broker serve --sim-workers N` (its supervisor restarts workers we
  kill; the broker lives in the serve process, so its pid is the broker's pid);
- `SplitTopology`: `sdxl-broker broker --state-dir D` plus N `sdxl-broker worker --sim`
  processes started here, so the broker alone can be killed -9 and restarted on the same
  endpoints and journal (workers reconnect by themselves; a worker we kill is restarted here).
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from . import hostile_faults
from . import procs as P
from .attacks import TmpfsStateDir
from .clients import LoadConfig, burst
from .ledger import Ledger
from .probes import StatusMonitor, send_oversized, status_once
from .worker_health import STRESS_PREFIX, FaultLog

log = logging.getLogger("stress.faults")


class SetupError(RuntimeError):
    """The system under test did not come up; the message says which log to read."""


@dataclass
class ServeOptions:
    workers: int = 3
    real: bool = False
    models_dir: str | None = None
    sim_step_s: float = 0.02
    sim_load_s: float = 0.2
    max_queue: int = 100
    max_message_mb: int = 64
    heartbeat_interval_s: float = 0.5
    reply_ttl_s: float | None = None  # split topology only (serve has no such flag)
    ready_timeout_s: float = 90.0
    extra_args: list[str] = field(default_factory=list)
    # issue-16 faults (hostile_faults.py)
    big_body_mb: float = 60.0
    big_bodies_per_fault: int = 4
    poison_s: float = 8.0
    rogue_s: float = 8.0
    stuck_s: float = 20.0
    stuck_job_s: float | None = 5.0    # passed as --stuck-job-s where the product has it
    full_disk_mb: int | None = 512     # split state dir on a tmpfs of this size (root only)
    full_disk_s: float = 10.0


class _Topology:
    kind = "?"

    def __init__(self, procs: P.ProcessSet, run_dir: Path, opts: ServeOptions):
        self.procs, self.run_dir, self.opts = procs, run_dir, opts
        self.frontend = P.free_tcp_endpoint()
        self.backend = P.free_tcp_endpoint()
        self.planned_broker_restarts = 0
        self.unplanned_broker_deaths = 0
        self.worker_kills = 0
        self.worker_stops = 0
        self.rss_start_mb: float | None = None
        self.rss_first_start_mb: float | None = None
        self._planned_down = threading.Event()
        self.fault_log = FaultLog()   # which workers were faulted when (healthy-lost counting)

    # --- the broker process ---------------------------------------------------------------
    def broker_pid(self) -> int:
        raise NotImplementedError

    def broker_alive(self) -> bool:
        raise NotImplementedError

    def note_broker_ready(self) -> None:
        self.rss_start_mb = P.rss_mb(self.broker_pid())
        if self.rss_first_start_mb is None:
            self.rss_first_start_mb = self.rss_start_mb

    def check_broker(self) -> bool:
        """False (and one unplanned death counted) when the broker died outside a planned
        restart. Called by the phase loop; a dead broker ends the phase."""
        if self._planned_down.is_set() or self.broker_alive():
            return True
        self.unplanned_broker_deaths += 1
        log.error("broker died outside the planned restart; log: %s", self.broker_log())
        return False

    def broker_log(self) -> Path:
        raise NotImplementedError

    def broker_logs(self) -> list[Path]:
        """Every log the broker of this phase wrote (one per broker process)."""
        try:
            return [self.broker_log()]
        except AttributeError:   # it never started
            return []

    def product_args(self, command: str) -> list[str]:
        """Flags for settings the product may or may not have yet (read from --help)."""
        o = self.opts
        if o.stuck_job_s is not None and P.has_flag(command, "--stuck-job-s"):
            return ["--stuck-job-s", str(o.stuck_job_s)]
        return []

    def restart_broker(self, ctx: zmq.Context) -> None:
        raise SetupError(f"{self.kind}: the broker cannot be restarted alone here")

    def wait_ready(self, ctx: zmq.Context, workers: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.broker_alive():
                raise SetupError(f"broker exited during start-up:\n{P.tail(self.broker_log())}")
            data = status_once(ctx, self.frontend, timeout_s=1.0)
            live = [w for w in (data or {}).get("workers") or [] if w.get("state") != "lost"
                    and not str(w.get("worker_id", "")).startswith(STRESS_PREFIX)]
            if data is not None and len(live) >= workers:
                return
            time.sleep(0.2)
        raise SetupError(f"{workers} workers not registered within {timeout_s:.0f}s; "
                         f"broker log {self.broker_log()}:\n{P.tail(self.broker_log())}")

    def start(self, ctx: zmq.Context) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class ServeTopology(_Topology):
    kind = "serve"

    def start(self, ctx: zmq.Context) -> None:
        o = self.opts
        argv = P.sdxl_broker_argv() + [
            "serve", "--frontend", self.frontend, "--backend", self.backend,
            "--max-queue", str(o.max_queue), "--max-message-mb", str(o.max_message_mb),
            "--heartbeat-interval-s", str(o.heartbeat_interval_s),
            "--ready-timeout-s", str(o.ready_timeout_s), "--drain-timeout-s", "5"]
        if o.real:
            argv += ["--devices", "cpu", "--cpu-workers", str(o.workers),
                     "--models-dir", str(o.models_dir), "--output-dir", str(self.run_dir / "out"),
                     "--input-dir", str(self.run_dir / "in")]
        else:
            argv += ["--sim-workers", str(o.workers), "--sim-step-s", str(o.sim_step_s),
                     "--sim-load-s", str(o.sim_load_s)]
        argv += self.product_args("serve") + o.extra_args
        self.child = self.procs.start("serve", argv)
        line = P.wait_for_line(self.child.log_path, "ready ", o.ready_timeout_s, self.child)
        if line is None:
            raise SetupError(f"serve never printed 'ready'; log {self.child.log_path}:\n"
                             f"{P.tail(self.child.log_path)}")
        self.wait_ready(ctx, o.workers, o.ready_timeout_s)
        self.note_broker_ready()

    def broker_pid(self) -> int:
        return self.child.pid

    def broker_alive(self) -> bool:
        return self.child.alive()

    def broker_log(self) -> Path:
        return self.child.log_path

    def stop(self) -> None:
        if getattr(self, "child", None) is not None:
            self.procs.stop(self.child, timeout_s=15.0)


class SplitTopology(_Topology):
    kind = "split"

    def __init__(self, procs: P.ProcessSet, run_dir: Path, opts: ServeOptions):
        super().__init__(procs, run_dir, opts)
        self.state_dir = run_dir / "state-split"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.tmpfs = TmpfsStateDir(self.state_dir, opts.full_disk_mb) if opts.full_disk_mb else None
        self.broker_children: list[P.Child] = []
        self.workers: dict[str, P.Child] = {}
        self.worker_restarts = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def _broker_argv(self) -> list[str]:
        o = self.opts
        return P.sdxl_broker_argv() + [
            "broker", "--frontend", self.frontend, "--backend", self.backend,
            "--state-dir", str(self.state_dir), "--max-queue", str(o.max_queue),
            "--max-message-mb", str(o.max_message_mb),
            "--heartbeat-interval-s", str(o.heartbeat_interval_s)] + (
            ["--reply-ttl-s", str(o.reply_ttl_s)] if o.reply_ttl_s is not None else []) + (
            self.product_args("broker") + o.extra_args)

    def _worker_argv(self, worker_id: str) -> list[str]:
        o = self.opts
        argv = P.sdxl_broker_argv() + [
            "worker", "--connect", self.backend, "--device", "cpu", "--worker-id", worker_id,
            "--heartbeat-interval-s", str(o.heartbeat_interval_s)]
        if o.real:
            return argv + ["--models-dir", str(o.models_dir), "--output-dir",
                           str(self.run_dir / "out"), "--input-dir", str(self.run_dir / "in")]
        return argv + ["--sim", "--sim-step-s", str(o.sim_step_s), "--sim-load-s", str(o.sim_load_s)]

    def start(self, ctx: zmq.Context) -> None:
        if self.tmpfs is not None:
            self.tmpfs.mount()
        self.broker = self._start_broker()
        for i in range(self.opts.workers):
            wid = f"{'cpu' if self.opts.real else 'sim'}-{i}"
            self.workers[wid] = self.procs.start(f"worker-{wid}", self._worker_argv(wid))
        self.wait_ready(ctx, self.opts.workers, self.opts.ready_timeout_s)
        self.note_broker_ready()
        self._supervisor = threading.Thread(target=self._supervise, name="split-supervisor",
                                            daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        """Our stand-in for serve's supervisor: a worker that died is started again."""
        while not self._stop.wait(0.2):
            with self._lock:
                for wid, child in list(self.workers.items()):
                    if child.alive() or self._stop.is_set():
                        continue
                    log.info("worker %s (pid %d) exited %s: restarting", wid, child.pid,
                             child.popen.returncode)
                    self.workers[wid] = self.procs.start(f"worker-{wid}", self._worker_argv(wid))
                    self.worker_restarts += 1

    def _start_broker(self) -> P.Child:
        child = self.procs.start("broker", self._broker_argv())
        self.broker_children.append(child)
        return child

    def broker_pid(self) -> int:
        return self.broker.pid

    def broker_alive(self) -> bool:
        return self.broker.alive()

    def broker_log(self) -> Path:
        return self.broker.log_path

    def broker_logs(self) -> list[Path]:
        return [c.log_path for c in self.broker_children]

    def restart_broker(self, ctx: zmq.Context) -> None:
        """kill -9 the broker, start it again on the same endpoints and journal."""
        self._planned_down.set()
        try:
            log.info("fault: kill -9 broker pid %d", self.broker.pid)
            self.procs.kill(self.broker, signal.SIGKILL)
            self.broker.popen.wait(timeout=10)
            time.sleep(0.5)
            self.broker = self._start_broker()
            self.wait_ready(ctx, self.opts.workers, self.opts.ready_timeout_s)
            self.planned_broker_restarts += 1
            self.note_broker_ready()
            log.info("broker restarted as pid %d", self.broker.pid)
        finally:
            self._planned_down.clear()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for child in self.workers.values():
                self.procs.stop(child, timeout_s=5.0)
        if getattr(self, "broker", None) is not None:
            self.procs.stop(self.broker, timeout_s=10.0)
        if self.tmpfs is not None:
            self.tmpfs.unmount()


# --- the fault schedule ----------------------------------------------------------------------

BASIC_KINDS = ("kill_worker", "stop_worker", "burst", "oversize", "restart_broker")
FAULT_KINDS = BASIC_KINDS + hostile_faults.KINDS


def build_schedule(kind: str, duration_s: float, rng: random.Random,
                   kinds: tuple[str, ...] = FAULT_KINDS) -> list[tuple[float, str]]:
    """(seconds from the phase start, fault). Spaced so serve's supervisor (5 restarts per
    worker in 2 minutes) never gives up on a worker. Only `kinds` are scheduled; full_disk
    and restart_broker only in the split phase (serve has no state dir and one process)."""
    faults: list[tuple[float, str]] = []

    def every(name: str, first_frac: float, period_s: float) -> None:
        if name not in kinds:
            return
        t = duration_s * first_frac
        while t < duration_s * 0.9:
            faults.append((round(t + rng.uniform(-1, 1), 2), name))
            t += period_s

    def clamp(value: float, low: float, high: float) -> float:
        return max(low, min(high, value))

    every("kill_worker", 0.15, clamp(duration_s / 3, 20.0, 60.0))
    every("stop_worker", 0.3, clamp(duration_s / 2, 30.0, 90.0))
    every("burst", 0.55, clamp(duration_s, 60.0, 150.0))
    every("oversize", 0.4, clamp(duration_s, 60.0, 150.0))
    every("stuck_worker", 0.1, clamp(duration_s / 2, 30.0, 100.0))
    every("poison_telemetry", 0.15, clamp(duration_s / 2, 30.0, 100.0))
    every("rogue_worker", 0.25, clamp(duration_s / 2, 30.0, 100.0))
    every("big_bodies", 0.45, clamp(duration_s / 2, 30.0, 100.0))
    if kind == "split":
        every("full_disk", 0.3, clamp(duration_s, 60.0, 150.0))
        if "restart_broker" in kinds:
            faults.append((round(duration_s * 0.5, 2), "restart_broker"))
    return sorted(faults)


class FaultScheduler(threading.Thread):
    def __init__(self, topo: _Topology, monitor: StatusMonitor, ledger: Ledger, ctx: zmq.Context,
                 cfg: LoadConfig, schedule: list[tuple[float, str]], stop: threading.Event,
                 seed: int, bad_input_client=None, burst_size: int = 150):
        super().__init__(name=f"faults-{topo.kind}", daemon=True)
        self.topo, self.monitor, self.ledger, self.ctx, self.cfg = topo, monitor, ledger, ctx, cfg
        self.schedule, self.stop = schedule, stop
        self.rng = random.Random(seed)
        self.bad_input_client = bad_input_client  # paused while the broker is down
        self.burst_size = burst_size
        self.done: list[tuple[float, str, str]] = []
        self.attacks: dict[str, list[dict]] = {}   # what each issue-16 fault measured
        self.error: BaseException | None = None
        self._side_threads: list[threading.Thread] = []
        self.load_over = threading.Event()   # set by the phase: start no new fault
        self._handlers = {
            "kill_worker": self._kill_worker, "stop_worker": self._stop_worker,
            "burst": self._burst, "oversize": self._oversize,
            "restart_broker": self._restart_broker,
            **{name: (lambda fn=getattr(hostile_faults, name): fn(self))
               for name in hostile_faults.KINDS}}

    def run(self) -> None:
        started = time.monotonic()
        try:
            for at_s, fault in self.schedule:
                if self.stop.wait(max(0.0, started + at_s - time.monotonic())):
                    break
                if self.load_over.is_set():
                    log.info("fault %s not started: the load is over", fault)
                    break
                outcome = self._handlers[fault]()
                self.done.append((round(time.monotonic() - started, 1), fault, outcome))
                self.ledger.event(f"fault_{fault}")
                log.info("fault %s at %.1fs: %s", fault, time.monotonic() - started, outcome)
        except BaseException as exc:
            self.error = exc
            log.exception("fault scheduler crashed")
        finally:
            for t in self._side_threads:
                t.join(timeout=60)

    def busy(self) -> bool:
        """A fault is still running (a side thread waits for its replies, a peer lives)."""
        return self.is_alive() and (any(t.is_alive() for t in self._side_threads)
                                    or not self.load_over.is_set())

    def _pick_worker(self) -> int | None:
        pids = [p for p in self.monitor.live_worker_pids() if self.topo.procs.owns(p)]
        return self.rng.choice(pids) if pids else None

    def _faulted(self, pid: int, for_s: float) -> None:
        """Note the worker with `pid` as faulted from now for `for_s` plus the time the broker
        takes to give up on it and its restart to register: its loss is no healthy loss."""
        worker_id = self.monitor.worker_id_of(pid)
        if worker_id is None:
            return
        expiry_s = self.topo.opts.heartbeat_interval_s * 3
        now = time.time()
        self.topo.fault_log.faulted(worker_id, now, now + for_s + 3 * expiry_s + 10.0)

    def _kill_worker(self) -> str:
        pid = self._pick_worker()
        if pid is None:
            return "skipped: no live worker we own"
        self._faulted(pid, 0.0)
        P.signal_pid(pid, signal.SIGKILL)
        self.topo.worker_kills += 1
        return f"kill -9 worker pid {pid}"

    def _stop_worker(self) -> str:
        pid = self._pick_worker()
        if pid is None:
            return "skipped: no live worker we own"
        # long enough for the broker to declare it lost (interval x liveness) and re-run its job
        hold_s = self.topo.opts.heartbeat_interval_s * 3 * 2 + 1.0
        self._faulted(pid, hold_s)
        P.signal_pid(pid, signal.SIGSTOP)
        try:
            self.stop.wait(hold_s)
        finally:
            P.signal_pid(pid, signal.SIGCONT)
        self.topo.worker_stops += 1
        return f"SIGSTOP worker pid {pid} for {hold_s:.1f}s, then SIGCONT"

    def _burst(self) -> str:
        count = self.burst_size

        def go():
            result = burst(self.ctx, self.topo.frontend, self.ledger, self.cfg, count,
                           self.rng.randrange(2**31), wait_s=60.0, stop_now=self.stop)
            log.info("burst of %d done: %s", count, result)

        t = threading.Thread(target=go, name="burst", daemon=True)
        t.start()
        self._side_threads.append(t)
        return f"burst of {count} requests past --max-queue {self.topo.opts.max_queue}"

    def _oversize(self) -> str:
        size_mb = self.topo.opts.max_message_mb
        send_oversized(self.ctx, self.topo.frontend, size_mb)
        alive = self.topo.broker_alive()
        answered = status_once(self.ctx, self.topo.frontend, timeout_s=10.0) is not None
        if not (alive and answered):
            self.ledger.violation("broker_unresponsive_after_oversize",
                                  f"alive={alive} answered={answered}")
        return f"{size_mb} MB + 2 B frame sent; broker alive={alive}, answers status={answered}"

    def _restart_broker(self) -> str:
        bad = self.bad_input_client
        if bad is not None:
            bad.paused.set()
            bad.disruptions += 1
        try:
            old = self.topo.broker_pid()
            self.topo.restart_broker(self.ctx)
            return f"kill -9 broker pid {old}; restarted as pid {self.topo.broker_pid()}"
        finally:
            if bad is not None:
                bad.paused.clear()
