"""A supervised process exits when its supervisor dies: no orphan heart-beating into nothing.

Two mechanisms, because either alone has a gap:
- Linux PR_SET_PDEATHSIG (via ctypes prctl): the kernel sends the child SIGTERM when its parent
  dies, even by SIGKILL. It follows the parent *thread* that forked the child, and it is not
  available outside Linux.
- A parent-pid watch: a daemon thread checks once a second that os.getppid() is still the
  supervisor's pid (a dead parent's children are re-parented, so the pid changes), and stops
  the process when it is not. Portable, and it also covers a parent that died before prctl ran.

Only a process told its supervisor's pid (`sdxl-broker worker --supervisor-pid PID`, which
`serve` passes) watches: a worker a user started alone (from a shell, under nohup, ...) keeps
running when that parent goes.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Callable

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1          # <linux/prctl.h>
WATCH_INTERVAL_S = 1.0        # how often the watch looks at the parent pid
EXIT_GRACE_S = 10.0           # after asking the process to stop, exit hard if it has not


_prctl = None


def _libc_prctl():
    """libc's prctl, looked up once: callers between fork and exec must look it up before
    the fork (dlopen after a fork of a threaded process can deadlock). None where absent."""
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        try:
            import ctypes

            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):   # no libc prctl (an unusual libc)
            _prctl = False
    return _prctl or None


def parent_death_signal_setter(signum: int = signal.SIGTERM) -> Callable[[], bool]:
    """A function that asks the kernel to send `signum` to the calling process when its parent
    (thread) dies, safe to call between fork and exec (everything is looked up here, before).
    It returns whether the signal was set (False outside Linux)."""
    prctl = _libc_prctl()
    if prctl is None:
        return lambda: False
    return lambda: prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Linux: this process gets `signum` when its parent (thread) dies. Returns whether set."""
    return parent_death_signal_setter(signum)()


def _exit_now() -> None:
    os._exit(1)


class SupervisorWatch:
    """Stops this process when `supervisor_pid` is no longer its parent.

    start() sets the parent-death signal (Linux) and starts the parent-pid watch (a daemon
    thread). When the parent has changed it logs it, calls the stop function (a graceful stop,
    e.g. the worker transport's; until stop_with() names one, an immediate exit), and if the
    process is still alive `grace_s` later, exits with code 1."""

    def __init__(self, supervisor_pid: int, *, name: str = "process",
                 interval_s: float = WATCH_INTERVAL_S, grace_s: float = EXIT_GRACE_S):
        self.supervisor_pid = supervisor_pid
        self.name = name
        self.interval_s = interval_s
        self.grace_s = grace_s
        self._stop: Callable[[], None] = _exit_now
        self._thread = threading.Thread(target=self._watch, name="supervisor-watch", daemon=True)

    def start(self, death_signal: bool = True) -> "SupervisorWatch":
        """`death_signal=False`: the pid watch alone (tests show it works by itself)."""
        if death_signal:
            set_parent_death_signal()
        self._thread.start()
        return self

    def stop_with(self, stop: Callable[[], None]) -> None:
        """What to call once the supervisor is gone (set when the process has built it)."""
        self._stop = stop

    def _watch(self) -> None:
        pause = threading.Event()
        while os.getppid() == self.supervisor_pid:
            pause.wait(self.interval_s)
        log.warning("%s: its supervisor (pid %d) is gone (parent is now pid %d); stopping",
                    self.name, self.supervisor_pid, os.getppid())
        try:
            self._stop()
        except Exception:   # whatever happens, the process must not outlive its supervisor
            log.exception("%s: graceful stop failed", self.name)
        pause.wait(self.grace_s)
        log.error("%s: still running %.0f s after its supervisor died; exiting", self.name,
                  self.grace_s)
        os._exit(1)
