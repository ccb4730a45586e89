"""Supervisor: restart arithmetic without processes, then real child processes."""

import os
import sys
import time

import psutil
import pytest

from broker.supervisor import ChildSpec, RestartPolicy, Supervisor


def test_backoff_doubles_and_caps():
    policy = RestartPolicy(backoff_initial_s=0.5, backoff_max_s=3.0, max_restarts=10)
    delays = [policy.on_crash(now=float(i), ran_for_s=0.1) for i in range(5)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_gives_up_after_too_many_crashes_in_the_window():
    policy = RestartPolicy(max_restarts=2, crash_window_s=10.0)
    assert policy.on_crash(0.0, 0.1) is not None
    assert policy.on_crash(1.0, 0.1) is not None
    assert policy.on_crash(2.0, 0.1) is None


def test_crashes_outside_the_window_and_stable_runs_are_forgiven():
    policy = RestartPolicy(backoff_initial_s=1.0, max_restarts=2, crash_window_s=10.0, stable_after_s=5.0)
    policy.on_crash(0.0, 0.1)
    policy.on_crash(1.0, 0.1)
    # 100 s later after a long healthy run: the window forgot the old crashes, backoff restarts
    assert policy.on_crash(100.0, ran_for_s=60.0) == 1.0


def _wait(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def supervisor():
    sup = Supervisor(policy_factory=lambda: RestartPolicy(backoff_initial_s=0.1, max_restarts=2,
                                                          crash_window_s=30.0))
    yield sup
    sup.stop(timeout_s=2.0)


def test_killed_child_is_restarted_and_stop_leaves_nothing(supervisor):
    pid = supervisor.add(ChildSpec("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"]))
    supervisor.start()
    os.kill(pid, 9)
    assert _wait(lambda: supervisor.pids().get("sleeper") not in (None, pid))
    new_pid = supervisor.pids()["sleeper"]
    assert supervisor.restarts() == {"sleeper": 1}
    supervisor.stop(timeout_s=2.0)
    assert not psutil.pid_exists(new_pid) or psutil.Process(new_pid).status() == psutil.STATUS_ZOMBIE


def test_child_that_keeps_crashing_is_given_up_with_a_log_line(supervisor, caplog):
    caplog.set_level("ERROR", logger="broker.supervisor")
    supervisor.add(ChildSpec("crasher", [sys.executable, "-c", "raise SystemExit(3)"]))
    supervisor.start()
    assert _wait(lambda: supervisor.given_up() == ["crasher"], timeout_s=20.0)
    assert supervisor.restarts() == {"crasher": 2}
    assert any("giving up on crasher" in r.getMessage() and "exit code 3" in r.getMessage()
               for r in caplog.records)


def test_child_that_exits_cleanly_is_not_restarted(supervisor, caplog):
    caplog.set_level("INFO", logger="broker.supervisor")
    supervisor.add(ChildSpec("quitter", [sys.executable, "-c", "pass"]))
    supervisor.start()
    assert _wait(lambda: supervisor.down() == ["quitter"])
    assert supervisor.restarts() == {"quitter": 0} and supervisor.given_up() == []
    assert any("quitter" in r.getMessage() and "not restarting" in r.getMessage() for r in caplog.records)
