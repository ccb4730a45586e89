"""Workers exit when their supervisor dies (runtime.parent_watch), and only then.

A worker whose `serve` was killed with SIGKILL once stayed alive for an hour heart-beating
into nothing. serve's workers now have two ways out: the Linux parent-death signal and a
parent-pid watch (`--supervisor-pid`, which serve passes). A worker a user started alone has
neither and outlives its parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import psutil

from runtime.parent_watch import SupervisorWatch
from tests.serve.conftest import ROOT, free_port, gone, wait_for


def test_worker_exits_when_serve_is_killed(start_serve):
    serve = start_serve(["--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
                         "--sim-workers", "2"])
    workers = serve.children()
    assert len(workers) == 2, serve.log()
    serve.proc.send_signal(signal.SIGKILL)   # no goodbye: nothing of serve's own code runs
    serve.proc.wait(10)
    # a generous deadline: this checks that they go, not how fast
    assert wait_for(lambda: all(gone(pid) for pid in workers), 60), \
        f"worker(s) outlived serve: {[p for p in workers if not gone(p)]}\n{serve.log()}"


def test_the_pid_watch_alone_notices_a_dead_supervisor():
    """Without the parent-death signal (not Linux; or a parent gone before prctl ran)."""
    not_my_parent = os.getppid() + 1_000_000   # no such pid: the parent "changed" already
    stopped = threading.Event()
    watch = SupervisorWatch(not_my_parent, name="test", interval_s=0.05, grace_s=3600)
    watch.stop_with(stopped.set)
    watch.start(death_signal=False)
    assert stopped.wait(30)


def test_the_pid_watch_keeps_quiet_while_the_supervisor_lives():
    stopped = threading.Event()
    watch = SupervisorWatch(os.getppid(), name="test", interval_s=0.05, grace_s=3600)
    watch.stop_with(stopped.set)
    watch.start(death_signal=False)
    assert not stopped.wait(1.0)   # 20 looks at the parent pid


def test_a_process_that_ignores_the_stop_exits_anyway():
    script = textwrap.dedent("""
        import time
        from runtime.parent_watch import SupervisorWatch
        watch = SupervisorWatch(2**22 + 12345, interval_s=0.05, grace_s=0.5)
        watch.stop_with(lambda: None)        # a graceful stop that does not stop anything
        watch.start(death_signal=False)
        time.sleep(120)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "is gone" in done.stderr and "still running" in done.stderr


def _worker_under_a_parent(tmp_path, *worker_flags: str) -> tuple[subprocess.Popen, int, str]:
    """A stand-in parent process (its own session) that starts a --sim worker and sleeps;
    returns (the parent, the worker's pid, the worker's log file). The worker connects to a
    port nobody listens on: it heart-beats into nothing, as an orphan would."""
    log_path = str(tmp_path / "worker.log")
    argv = [sys.executable, "-m", "broker.cli", "worker", "--sim", "--worker-id", "orphan-test",
            "--connect", f"tcp://127.0.0.1:{free_port()}", *worker_flags]
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        argv = {argv!r}
        argv = [a.replace("PARENT_PID", str(os.getpid())) for a in argv]
        with open({log_path!r}, "w") as log:
            worker = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        print(worker.pid, flush=True)
        time.sleep(600)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, start_new_session=True)
    worker_pid = int(parent.stdout.readline())
    # wait until the worker is past its start-up (it logs once it tries the broker)
    assert wait_for(lambda: "connecting to" in open(log_path).read(), 60), open(log_path).read()
    return parent, worker_pid, log_path


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_worker_told_its_supervisor_exits_when_that_dies(tmp_path):
    parent, worker_pid, log_path = _worker_under_a_parent(tmp_path, "--supervisor-pid", "PARENT_PID")
    try:
        assert psutil.Process(worker_pid).ppid() == parent.pid
        parent.kill()
        parent.wait(10)
        assert wait_for(lambda: gone(worker_pid), 60), open(log_path).read()
    finally:
        _kill(parent.pid)
        _kill(worker_pid)


def test_worker_started_alone_outlives_its_parent(tmp_path):
    parent, worker_pid, log_path = _worker_under_a_parent(tmp_path)
    try:
        parent.kill()
        parent.wait(10)
        assert wait_for(lambda: psutil.Process(worker_pid).ppid() != parent.pid, 10)
        # several watch intervals later it still runs (and still tries to reach its broker)
        assert not wait_for(lambda: gone(worker_pid), 3.0), open(log_path).read()
        assert "is gone" not in open(log_path).read()
    finally:
        _kill(parent.pid)
        _kill(worker_pid)
