"""Helpers for running `sdxl-broker serve` as a real process in tests (always cleaned up)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*argv: str, timeout_s: float = 60.0, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "broker.cli", *argv], capture_output=True,
                          text=True, timeout=timeout_s, cwd=ROOT, env=env, **kwargs)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stop_processes(procs: list[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """SIGTERM every still-running process, then SIGKILL whatever ignores it: no orphans."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def start_long_job(frontend: str, client_timeout_s: float, request_id: str = "to-cancel"):
    """A 150-step generation in a thread; returns (thread, event set once it is denoising,
    dict that gets its final reply under "reply"), so a test can cancel it while it runs."""
    from clients.client import BrokerClient

    running, outcome = threading.Event(), {}

    def long_job():
        with BrokerClient(frontend, timeout_s=client_timeout_s) as client:
            outcome["reply"] = client.generate(
                prompt="slow", model_base="tiny-sdxl", steps=150, width=256, height=256,
                request_id=request_id, raise_on_error=False,
                on_progress=lambda e: e.get("stage") == "denoising" and running.set()).reply
    job = threading.Thread(target=long_job, daemon=True)
    job.start()
    return job, running, outcome


def wait_for(predicate, timeout_s: float = 20.0, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def one_cpu_worker_argv(models_dir, output_dir, input_dir, *extra: str) -> list[str]:
    """`serve` flags for one real cpu worker on the tiny kit, on free loopback ports."""
    return ["--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
            "--cpu-workers", "1", "--models-dir", str(models_dir),
            "--output-dir", str(output_dir), "--input-dir", str(input_dir), *extra]


class ServeProcess:
    """`sdxl-broker serve ...` in its own session; `ready` line parsed; killed on teardown."""

    def __init__(self, argv: list[str], ready_timeout_s: float = 60.0):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "serve", *argv], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._ready = threading.Event()
        self.endpoint: str | None = None
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.children_seen: set[int] = set()
        if not self._ready.wait(ready_timeout_s):
            self.kill()
            raise AssertionError("serve did not print ready:\n" + self.log())

    def _read_stdout(self):
        for line in self.proc.stdout:
            self.stdout_lines.append(line)
            if line.startswith("ready "):
                self.endpoint = line.split()[1]
                self._ready.set()

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def log(self) -> str:
        return "".join(self.stderr_lines[-80:])

    def children(self) -> list[int]:
        try:
            pids = [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pids = []
        self.children_seen.update(pids)
        return pids

    def stop(self, sig=signal.SIGTERM, timeout_s: float = 30.0) -> int:
        self.children()
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self.kill()

    def kill(self) -> None:
        """Last resort: the whole session (serve and every worker)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in list(self.children_seen):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def start_serve():
    started: list[ServeProcess] = []

    def _start(argv: list[str], ready_timeout_s: float = 60.0) -> ServeProcess:
        sp = ServeProcess(argv, ready_timeout_s)
        started.append(sp)
        return sp

    yield _start
    for sp in started:
        sp.kill()
