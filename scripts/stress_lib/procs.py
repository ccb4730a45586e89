"""Every process the stress run starts, and the guarantee that none outlives it.

`ProcessSet` starts `sdxl-broker serve|broker|worker` children with their output in log files,
kills exactly the pids it started (and their descendants), and is closed from a `finally`, an
atexit hook and SIGTERM. Nothing is killed by name.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger("stress.procs")


def sdxl_broker_argv() -> list[str]:
    """The console script next to this interpreter (the project's venv), else `python -m`."""
    exe = Path(sys.executable).with_name("sdxl-broker")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("sdxl-broker")
    return [found] if found else [sys.executable, "-m", "broker.cli"]


@functools.lru_cache(maxsize=None)
def _help_text(command: str) -> str:
    proc = subprocess.run(sdxl_broker_argv() + [command, "--help"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return proc.stdout


def has_flag(command: str, flag: str) -> bool:
    """Whether `sdxl-broker <command>` knows `flag` (a setting another change may add)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", _help_text(command)) is not None


def free_tcp_endpoint() -> str:
    """A loopback port free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


class ProcessSet:
    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._children: list[Child] = []
        self._lock = threading.Lock()
        self._closed = False
        self._counter = 0
        atexit.register(self.close)

    def start(self, name: str, argv: list[str], env: dict | None = None) -> Child:
        with self._lock:
            self._counter += 1
            log_path = self.log_dir / f"{self._counter:03d}-{name}.log"
        full_env = dict(os.environ)
        full_env.setdefault("HF_HUB_OFFLINE", "1")
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        with open(log_path, "wb") as out:
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=full_env,
                                     start_new_session=True)  # our Ctrl-C is ours to handle
        child = Child(name, argv, log_path, popen)
        with self._lock:
            self._children.append(child)
        log.info("started %s pid %d: %s (log %s)", name, child.pid, " ".join(argv), log_path)
        return child

    def owns(self, pid: int) -> bool:
        """True when `pid` is one of ours or a descendant of one of ours (serve's workers)."""
        for child in self.children():
            if child.pid == pid:
                return True
            try:
                if any(p.pid == pid for p in psutil.Process(child.pid).children(recursive=True)):
                    return True
            except psutil.Error:
                continue
        return False

    def children(self) -> list[Child]:
        with self._lock:
            return list(self._children)

    def kill(self, child: Child, sig: int = signal.SIGKILL) -> None:
        """Signal one child we started (not its process group: serve's supervisor must see
        its workers live on while we kill only what the fault schedule names)."""
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, child: Child, timeout_s: float = 8.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the child and anything it started that is still left."""
        try:
            descendants = psutil.Process(child.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        if child.alive():
            self.kill(child, signal.SIGTERM)
            try:
                child.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s pid %d ignored SIGTERM for %.0fs: SIGKILL", child.name,
                            child.pid, timeout_s)
        _kill_session(child.pid)
        for proc in descendants:
            try:
                proc.kill()
            except psutil.Error:
                pass
        try:
            return child.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            children = list(reversed(self._children))
        for child in children:
            try:
                # a stopped (SIGSTOP) process cannot act on SIGTERM: continue it first
                os.kill(child.pid, signal.SIGCONT)
            except (ProcessLookupError, PermissionError):
                pass
            self.stop(child, timeout_s=5.0)


def _kill_session(pid: int) -> None:
    """SIGKILL whatever still runs in the session `pid` led (its workers, if it had any)."""
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and os.getsid(proc.pid) == pid:
                proc.kill()
        except (psutil.Error, ProcessLookupError, PermissionError, OSError):
            continue


def rss_mb(pid: int) -> float | None:
    try:
        return round(psutil.Process(pid).memory_info().rss / 1e6, 1)
    except psutil.Error:
        return None


def dir_size_mb(path: Path) -> float:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return round(total / 1e6, 2)


def install_sigterm_as_exit() -> None:
    """SIGTERM and SIGINT unwind as KeyboardInterrupt, so every `finally` (and
    ProcessSet.close) runs."""
    def _handler(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _handler)
    # started in the background by a script, SIGINT may be ignored: Ctrl-C must still stop us
    signal.signal(signal.SIGINT, signal.default_int_handler)


def wait_for_line(path: Path, prefix: str, timeout_s: float, child: Child) -> str | None:
    """The first line of `path` starting with `prefix` (e.g. serve's `ready <endpoint>`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
        except FileNotFoundError:
            pass
        if not child.alive():
            return None
        time.sleep(0.1)
    return None


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def signal_pid(pid: int, sig: int) -> None:
    """Signal a pid the caller checked is ours (ProcessSet.owns)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
