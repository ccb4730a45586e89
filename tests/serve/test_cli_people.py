"""The people's CLI against a real `serve` (or against nothing at all): what a person sees when
nothing listens, when the job waits in a queue with no worker, and when they press Ctrl-C
(a real SIGINT to the real `sdxl-broker generate` process)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.serve.conftest import ROOT, cli, free_port, one_cpu_worker_argv, wait_for


def _default_sigint() -> None:
    """A person's terminal delivers Ctrl-C; pytest started in the background of a
    non-interactive shell ignores SIGINT, and a child would inherit that and never see it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _generate(endpoint: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "generate", "a fox", "--model", "tiny-sdxl",
         "--size", "256x256", "--endpoint", endpoint, *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_sigint)


def _request_id(proc: subprocess.Popen, lines: list[str]) -> str:
    """The first stderr line names the request as soon as it is sent."""
    line = proc.stderr.readline()
    lines.append(line)
    match = re.match(r"request (\S+) -> (\S+)", line)
    assert match, line
    return match.group(1)


def _status(endpoint: str) -> dict:
    from clients.client import BrokerClient

    with BrokerClient(endpoint, timeout_s=5.0) as client:
        return client.status()


def test_nothing_listening_fails_in_seconds_naming_the_endpoint():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = cli("generate", "a fox", "--endpoint", endpoint, "--connect-timeout-s", "2",
               timeout_s=60)
    took_s = time.monotonic() - started
    assert done.returncode == 3, done.stderr
    assert f"nothing is listening at {endpoint}" in done.stderr
    assert "sdxl-broker serve" in done.stderr          # says what to start
    assert "resending" not in done.stderr              # no pointless resends
    assert took_s < 30, took_s                         # was 2 minutes; generous bound
    print(f"nothing listening: failed after {took_s:.1f}s")

    done = cli("status", "--endpoint", endpoint, "--connect-timeout-s", "2", timeout_s=60)
    assert done.returncode == 3 and f"nothing is listening at {endpoint}" in done.stderr


def test_queued_without_worker_stays_quiet_then_ctrl_c_cancels_it(start_serve):
    sp = start_serve(["--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
                      "--devices", "none"])
    # --timeout-s 1: the client checks on the quiet job every second; the broker answers each
    # check at once, so there is nothing to warn about
    proc = _generate(sp.endpoint, "--timeout-s", "1", "--no-progress")
    lines: list[str] = []
    try:
        request_id = _request_id(proc, lines)
        assert wait_for(lambda: _status(sp.endpoint)["broker"]["queue_depth"] == 1, 20)
        time.sleep(4)   # several silent spells of --timeout-s
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    err = "".join(lines) + err
    assert proc.returncode == 130, err
    assert "no message from" not in err and "resending" not in err, err
    assert f"cancelling request {request_id}" in err
    assert f"cancelled request {request_id} (it was queued)" in err
    assert _status(sp.endpoint)["broker"]["queue_depth"] == 0
    assert any(f"job {request_id} cancelled while queued" in line for line in sp.stderr_lines)


def test_ctrl_c_while_running_cancels_the_job_on_the_worker(start_serve):
    sp = start_serve(["--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
                      "--sim-workers", "1", "--sim-step-s", "0.2"])
    proc = _generate(sp.endpoint, "--steps", "150", "--no-progress")
    lines: list[str] = []
    try:
        request_id = _request_id(proc, lines)
        assert wait_for(lambda: _status(sp.endpoint)["broker"]["inflight"] == 1, 20), sp.log()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    err = "".join(lines) + err
    assert proc.returncode == 130, err
    assert f"cancelled request {request_id} (it was running)" in err, err
    assert out == ""                                     # no image paths: nothing was made
    # the worker stops: the broker has nothing in flight and the worker goes idle
    assert wait_for(lambda: _status(sp.endpoint)["broker"]["inflight"] == 0, 10)
    assert wait_for(lambda: _status(sp.endpoint)["workers"][0]["state"] == "idle", 20)


def test_second_ctrl_c_quits_at_once_when_the_broker_does_not_answer(start_serve):
    sp = start_serve(["--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
                      "--devices", "none"])
    proc = _generate(sp.endpoint, "--no-progress", "--connect-timeout-s", "20")
    lines: list[str] = []
    try:
        request_id = _request_id(proc, lines)
        assert wait_for(lambda: _status(sp.endpoint)["broker"]["queue_depth"] == 1, 20)
        os.kill(sp.proc.pid, signal.SIGSTOP)       # the broker freezes: the cancel hangs
        try:
            proc.send_signal(signal.SIGINT)
            assert wait_for(lambda: any("cancelling request" in line for line in lines)
                            or bool(lines.append(proc.stderr.readline())), 20)
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=15)
            quit_s = time.monotonic() - started
        finally:
            os.kill(sp.proc.pid, signal.SIGCONT)
    finally:
        proc.kill()
    err = "".join(lines) + proc.stderr.read()
    assert proc.returncode == 130, err
    assert f"cancelling request {request_id}" in err
    # it did not wait for the cancel's 20 s first-contact limit to run out
    assert "could not cancel" not in err and "cancelled request" not in err, err
    print(f"second Ctrl-C: exited {quit_s:.2f}s after it")


def test_curve_mistakes_are_named_not_timed_out(start_serve, tmp_path):
    keys = tmp_path / "keys"
    assert cli("keys", str(keys), "--names", "server", "client", "stranger").returncode == 0
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "client.key").write_bytes((keys / "client.key").read_bytes())
    sp = start_serve(["--frontend", "tcp://127.0.0.1:*", "--backend", f"ipc://{tmp_path}/be.sock",
                      "--devices", "none", "--curve-secret-key", str(keys / "server.key_secret"),
                      "--curve-allowed-keys", str(allowed)])
    plain = cli("status", "--endpoint", sp.endpoint, timeout_s=60)
    assert plain.returncode == 3
    assert "probably uses CURVE" in plain.stderr and "--curve-server-key" in plain.stderr, plain.stderr
    stranger = cli("status", "--endpoint", sp.endpoint, "--curve-server-key", str(keys / "server.key"),
                   "--curve-client-key", str(keys / "stranger.key_secret"), timeout_s=60)
    assert stranger.returncode == 3
    assert "refused this client's CURVE key" in stranger.stderr, stranger.stderr
    wrong_server = cli("status", "--endpoint", sp.endpoint, "--curve-server-key", str(keys / "client.key"),
                       "--curve-client-key", str(keys / "client.key_secret"), timeout_s=60)
    assert wrong_server.returncode == 3 and "CURVE handshake" in wrong_server.stderr, wrong_server.stderr
    good = cli("status", "--endpoint", sp.endpoint, "--curve-server-key", str(keys / "server.key"),
               "--curve-client-key", str(keys / "client.key_secret"), "--json", timeout_s=60)
    assert good.returncode == 0, good.stderr


@pytest.mark.slow
def test_images_land_in_the_output_root_and_precision_is_auto(start_serve, demo_models_dir, tmp_path):
    root = tmp_path / "outputs"
    sp = start_serve(one_cpu_worker_argv(demo_models_dir, root, tmp_path), ready_timeout_s=180)
    common = ["--model", "tiny-sdxl", "--steps", "1", "--size", "256x256", "--endpoint", sp.endpoint]
    default = cli("generate", "a fox", *common, timeout_s=180)
    assert default.returncode == 0, default.stderr + sp.log()
    printed = Path(default.stdout.split()[0])
    assert printed.parent == root and printed.is_file(), default.stdout   # the seed default outputs/
    assert not (root / "outputs").exists()
    assert "float16" not in default.stderr      # precision auto: nothing asked, nothing to warn
    asked = cli("generate", "a fox", *common, "--dtype", "float16", timeout_s=180)
    assert asked.returncode == 0, asked.stderr
    assert "warning: dtype float16 is slow on CPU: running float32 instead" in asked.stderr
    for save_path, folder in (("outputs/portraits", root / "portraits"), ("night/owls", root / "night" / "owls")):
        done = cli("generate", "an owl", *common, "--save-path", save_path, timeout_s=180)
        assert done.returncode == 0, done.stderr
        printed = Path(done.stdout.split()[0])
        assert printed.parent == folder and printed.is_file(), (save_path, done.stdout)
    refused = cli("generate", "an owl", *common, "--save-path", "../elsewhere", timeout_s=60)
    assert refused.returncode == 1 and "save_path" in refused.stderr


def test_a_retry_from_a_fresh_socket_with_the_same_identity_gets_the_reply(start_serve):
    """What the C# client does (clients/csharp): a DEALER with Options.Identity = request id
    sends, goes silent, and a fresh DEALER with the same identity resends. The frontend
    ROUTER hands the identity over (ROUTER_HANDOVER), so the new socket gets the reply."""
    import zmq

    from protocol import codec

    sp = start_serve(["--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
                      "--sim-workers", "1", "--sim-step-s", "0.1"])
    body = codec.encode({"message_type": "generate_sdxl_enhanced", "request_id": "handover-1",
                         "prompt": "a fox", "model_base": "tiny-sdxl", "steps": 10,
                         "width": 256, "height": 256}, "json")
    ctx = zmq.Context()
    try:
        first = ctx.socket(zmq.DEALER)
        first.setsockopt(zmq.IDENTITY, b"handover-1")
        first.setsockopt(zmq.LINGER, 0)
        first.connect(sp.endpoint)
        first.send_multipart([b"", body])
        time.sleep(0.3)   # accepted; the first socket now "hangs" (never read, never closed)
        second = ctx.socket(zmq.DEALER)
        second.setsockopt(zmq.IDENTITY, b"handover-1")
        second.setsockopt(zmq.LINGER, 0)
        second.connect(sp.endpoint)
        second.send_multipart([b"", body])
        assert second.poll(30_000), "the retry from a fresh socket with the same identity got nothing"
        reply, _ = codec.decode(second.recv_multipart()[-1])
        assert reply["request_id"] == "handover-1" and reply["success"] is True, reply
    finally:
        ctx.destroy(linger=0)
