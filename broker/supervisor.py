"""Keeps the worker processes of `serve` alive.

One watcher thread polls every child; a child that exits with a non-zero code (or by a
signal) while the supervisor is not stopping is a crash; exit code 0 is a deliberate stop. It is restarted after an exponential backoff, and a child that keeps crashing
(more than `max_restarts` crashes within `crash_window_s`) is given up on with one clear log
line, so a broken model dir or driver does not spin forever. Stopping sends SIGTERM to every
child, waits, then SIGKILLs what is left: `serve` leaves no process behind.

The restart decision is a small pure class (`RestartPolicy`) with an injected clock, so its
arithmetic is tested without starting processes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from runtime import parent_watch

log = logging.getLogger(__name__)

_POLL_INTERVAL_S = 0.1


@dataclass(frozen=True)
class ChildSpec:
    name: str                      # stable name, also the worker id ("cpu-0", "cuda:1", "sim-0")
    argv: list[str]
    env: dict[str, str] | None = None
    cpu_affinity: tuple[int, ...] | None = None   # cores the child may run on (None: any)


@dataclass
class RestartPolicy:
    """Exponential backoff; gives up after too many crashes in a window."""

    backoff_initial_s: float = 0.5
    backoff_max_s: float = 15.0
    max_restarts: int = 5          # crashes tolerated within crash_window_s
    crash_window_s: float = 120.0
    stable_after_s: float = 60.0   # a child that ran this long starts its backoff afresh
    _crashes: deque = field(default_factory=deque)
    _consecutive: int = 0

    def on_crash(self, now: float, ran_for_s: float) -> float | None:
        """Record a crash at `now`; return the delay before the restart, or None to give up."""
        if ran_for_s >= self.stable_after_s:
            self._consecutive = 0
        self._consecutive += 1
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > self.crash_window_s:
            self._crashes.popleft()
        if len(self._crashes) > self.max_restarts:
            return None
        return min(self.backoff_initial_s * 2 ** (self._consecutive - 1), self.backoff_max_s)

    @property
    def crashes_in_window(self) -> int:
        return len(self._crashes)


def _linux_child_setup(cpu_affinity: tuple[int, ...] | None) -> Callable[[], None]:
    """Runs in the child between fork and exec: die with the parent, and keep to its cores
    (before exec, so torch and OpenMP see the affinity from their first thread on).
    The parent-death signal (SIGTERM when `serve` dies, even by SIGKILL) follows the *thread*
    that forked, so children are only spawned from threads that live as long as the supervisor
    (the caller's thread and the watcher thread); workers also watch serve's pid themselves
    (runtime.parent_watch, `--supervisor-pid`)."""
    die_with_parent = parent_watch.parent_death_signal_setter()   # looked up before the fork

    def setup() -> None:
        die_with_parent()
        if cpu_affinity:
            try:
                os.sched_setaffinity(0, cpu_affinity)
            except OSError:   # e.g. a core offline since the plan: run unpinned
                pass
    return setup


def _pin_after_start(pid: int, cpu_affinity: tuple[int, ...]) -> None:
    """Not Linux: pin a started child where psutil can (Windows, FreeBSD; macOS cannot)."""
    try:
        import psutil

        psutil.Process(pid).cpu_affinity(list(cpu_affinity))
    except (AttributeError, OSError, ValueError) as exc:
        log.info("cannot pin pid %d to cores %s on this OS (%s)", pid, list(cpu_affinity), exc)


@dataclass
class _Child:
    spec: ChildSpec
    policy: RestartPolicy
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # clock time of a scheduled restart
    restarts: int = 0
    given_up: bool = False         # kept crashing: not restarted any more
    stopped: bool = False          # exited deliberately (code 0) or during shutdown
    last_returncode: int | None = None


class Supervisor:
    """Starts, watches and restarts child processes. Thread-safe public methods."""

    def __init__(self, *, policy_factory: Callable[[], RestartPolicy] = RestartPolicy,
                 clock: Callable[[], float] = time.monotonic, stdout=None,
                 on_give_up: Callable[[str, int | None], None] | None = None):
        self._policy_factory = policy_factory
        self._clock = clock
        # children write to our stderr by default so `serve`'s stdout carries only "ready ..."
        self._stdout = stdout if stdout is not None else 2  # fd 2: works under pytest capture too
        self._on_give_up = on_give_up
        self._children: dict[str, _Child] = {}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._restarting = True
        self._thread: threading.Thread | None = None

    # --- public API ---------------------------------------------------------------------------
    def add(self, spec: ChildSpec) -> int:
        """Start a child now; returns its pid."""
        with self._lock:
            if spec.name in self._children:
                raise ValueError(f"child {spec.name!r} already supervised")
            child = _Child(spec=spec, policy=self._policy_factory())
            self._children[spec.name] = child
            self._spawn(child)
            return child.proc.pid

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
            self._thread.start()

    def stop_restarting(self) -> None:
        """From now on an exiting child stays down (shutdown has begun)."""
        with self._lock:
            self._restarting = False

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every child, wait up to timeout_s, SIGKILL the rest, reap all."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        with self._lock:
            procs = [c.proc for c in self._children.values() if c.proc and c.proc.poll() is None]
        for proc in procs:
            try:
                proc.terminate()
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.05))
            except subprocess.TimeoutExpired:
                log.warning("child pid %d did not stop in %.1fs; killing it", proc.pid, timeout_s)
                proc.kill()
                proc.wait()
        if procs:
            log.info("stopped %d child process(es)", len(procs))

    def pids(self) -> dict[str, int]:
        """name -> pid of every running child."""
        with self._lock:
            return {n: c.proc.pid for n, c in self._children.items()
                    if c.proc is not None and c.proc.poll() is None}

    def restarts(self) -> dict[str, int]:
        with self._lock:
            return {n: c.restarts for n, c in self._children.items()}

    def given_up(self) -> list[str]:
        with self._lock:
            return [n for n, c in self._children.items() if c.given_up]

    def down(self) -> list[str]:
        """Children that will not come back: given up on, or exited deliberately."""
        with self._lock:
            return [n for n, c in self._children.items() if c.given_up or c.stopped]

    # --- internals ------------------------------------------------------------------------
    def _spawn(self, child: _Child) -> None:
        linux = sys.platform.startswith("linux")
        preexec = _linux_child_setup(child.spec.cpu_affinity) if linux else None
        # Own session: a Ctrl-C in the terminal reaches only the parent, which drains first
        # and then stops the children itself (otherwise they would die mid-job).
        child.proc = subprocess.Popen(
            child.spec.argv, env=child.spec.env, stdin=subprocess.DEVNULL,
            stdout=self._stdout, stderr=None, preexec_fn=preexec,
            start_new_session=(os.name == "posix"),
        )
        if child.spec.cpu_affinity and not linux:
            _pin_after_start(child.proc.pid, child.spec.cpu_affinity)
        child.started_at = self._clock()
        child.restart_at = None
        log.info("started %s (pid %d)", child.spec.name, child.proc.pid)

    def _watch(self) -> None:
        while not self._stopping.wait(_POLL_INTERVAL_S):
            with self._lock:
                for child in self._children.values():
                    self._check(child)

    def _check(self, child: _Child) -> None:
        if child.given_up or child.stopped:
            return
        now = self._clock()
        if child.restart_at is not None:
            if now >= child.restart_at and not self._stopping.is_set():
                child.restarts += 1
                self._spawn(child)
            return
        rc = child.proc.poll() if child.proc is not None else None
        if rc is None:
            return
        child.last_returncode = rc
        ran_for_s = now - child.started_at
        if rc == 0 or not self._restarting:
            # exit code 0 is a deliberate stop (e.g. someone sent it SIGTERM), not a crash
            log.info("%s (pid %d) exited with code %s; not restarting it",
                     child.spec.name, child.proc.pid, rc)
            child.stopped = True
            return
        delay_s = child.policy.on_crash(now, ran_for_s)
        if delay_s is None:
            child.given_up = True
            log.error("giving up on %s: it crashed %d times within %.0fs (last exit code %s); "
                      "it will not be restarted", child.spec.name,
                      child.policy.crashes_in_window, child.policy.crash_window_s, rc)
            if self._on_give_up is not None:
                self._on_give_up(child.spec.name, rc)
            return
        log.warning("%s (pid %d) exited with code %s after %.1fs; restarting in %.1fs",
                    child.spec.name, child.proc.pid, rc, ran_for_s, delay_s)
        child.restart_at = now + delay_s

