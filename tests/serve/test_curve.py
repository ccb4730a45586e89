"""CURVE on the broker's frontend and backend: real sockets, real worker processes (SIMULATED
executors, named as such). Authorised keys are served; unknown keys get nothing and are logged."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from runtime.curve import make_keys
from broker.server import Broker, BrokerConfig
from clients.client import BrokerClient, BrokerUnavailable, RequestFailed
from tests.serve.conftest import ROOT, stop_processes, wait_for


def _allow(directory, pairs, *names) -> str:
    """A directory holding the public .key files of `names` (an allowed-keys folder)."""
    directory.mkdir()
    for name in names:
        (directory / f"{name}.key").write_text(open(pairs[name][0]).read())
    return str(directory)


@pytest.fixture
def keys(tmp_path):
    """server/client/worker/stranger pairs; client is an allowed client, stranger is nothing."""
    pairs = make_keys(str(tmp_path / "keys"), ["server", "client", "worker", "stranger"])
    return pairs, _allow(tmp_path / "allowed", pairs, "client")


@pytest.fixture
def worker_keys(tmp_path, keys):
    """The --curve-worker-keys folder: the worker pair only."""
    return _allow(tmp_path / "workers", keys[0], "worker")


@pytest.fixture
def curve_broker(tmp_path, keys, worker_keys):
    pairs, allowed = keys
    broker = Broker(BrokerConfig(frontend=f"ipc://{tmp_path}/fe.sock", backend=f"ipc://{tmp_path}/be.sock",
                                 heartbeat_interval_s=0.2, curve_secret_key=pairs["server"][1],
                                 curve_allowed_keys=allowed, curve_worker_keys=worker_keys))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def spawn_worker():
    procs: list[subprocess.Popen] = []

    def spawn(backend: str, worker_id: str, *curve_args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "worker", "--connect", backend, "--sim",
             "--worker-id", worker_id, "--sim-load-s", "0.01", "--sim-step-s", "0.01",
             "--heartbeat-interval-s", "0.2", *curve_args],
            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield spawn
    stop_processes(procs)


def _worker_ids(broker: Broker) -> set[str]:
    return {w["worker_id"] for w in broker.status()["workers"]}


def test_authorised_client_is_served_and_a_stranger_is_refused_and_logged(curve_broker, keys, caplog):
    pairs, _ = keys
    with BrokerClient.with_curve(curve_broker.frontend_endpoint, pairs["server"][0], pairs["client"][1],
                                 timeout_s=5.0) as client:
        assert client.status()["workers"] == []
    caplog.set_level(logging.WARNING, logger="runtime.curve")
    stranger_public = open(pairs["stranger"][0]).read().split('"')[1]
    with BrokerClient.with_curve(curve_broker.frontend_endpoint, pairs["server"][0],
                                 pairs["stranger"][1], timeout_s=0.5, retries=1) as stranger:
        with pytest.raises(BrokerUnavailable):
            stranger.status()
    refusals = [r.getMessage() for r in caplog.records if "CURVE: refused client key" in r.getMessage()]
    assert refusals and stranger_public[:8] in refusals[0]
    # a plain (NULL security) client cannot talk to a CURVE broker either
    with BrokerClient(curve_broker.frontend_endpoint, timeout_s=0.5, retries=1) as plain:
        with pytest.raises(BrokerUnavailable):
            plain.status()
    assert curve_broker.status()["broker"]["accepted"] == 0


@pytest.mark.slow
def test_only_an_authorised_worker_registers_and_runs_jobs(curve_broker, keys, spawn_worker):
    pairs, _ = keys
    server_public = pairs["server"][0]
    stranger = spawn_worker(curve_broker.backend_endpoint, "w-stranger",
                            "--curve-server-key", server_public, "--curve-client-key", pairs["stranger"][1])
    plain = spawn_worker(curve_broker.backend_endpoint, "w-plain")
    # an allowed CLIENT key is not a worker key: it must not register (it would get prompts)
    as_client = spawn_worker(curve_broker.backend_endpoint, "w-client-key",
                             "--curve-server-key", server_public, "--curve-client-key", pairs["client"][1])
    good = spawn_worker(curve_broker.backend_endpoint, "w-good",
                        "--curve-server-key", server_public, "--curve-client-key", pairs["worker"][1])
    assert wait_for(lambda: "w-good" in _worker_ids(curve_broker), timeout_s=30), good.stderr
    with BrokerClient.with_curve(curve_broker.frontend_endpoint, server_public, pairs["client"][1],
                                 timeout_s=20.0) as client:
        result = client.generate(prompt="a fox", model_base="tiny-sdxl", steps=2, width=256, height=256)
    assert result.images
    # the refused workers had the same seconds to register (and keep retrying): none did
    assert _worker_ids(curve_broker) == {"w-good"}
    assert stranger.poll() is None and plain.poll() is None and as_client.poll() is None


def test_a_worker_key_is_not_a_client_key(curve_broker, keys):
    pairs, _ = keys
    with BrokerClient.with_curve(curve_broker.frontend_endpoint, pairs["server"][0], pairs["worker"][1],
                                 timeout_s=0.5, retries=1) as worker_as_client:
        with pytest.raises(BrokerUnavailable):
            worker_as_client.status()


def test_broker_refuses_client_keys_without_worker_keys(tmp_path, keys):
    """One folder for both sockets let any client key register as a worker: a broker with
    allowed client keys and no worker keys (and no workers of its own) stops at start."""
    pairs, allowed = keys
    broker = Broker(BrokerConfig(frontend=f"ipc://{tmp_path}/fe.sock", backend=f"ipc://{tmp_path}/be.sock",
                                 curve_secret_key=pairs["server"][1], curve_allowed_keys=allowed))
    with pytest.raises(ValueError, match="--curve-worker-keys"):
        broker.start()


def test_worker_refuses_half_a_curve_configuration(tmp_path, keys):
    pairs, _ = keys
    out = subprocess.run([sys.executable, "-m", "broker.cli", "worker", "--connect",
                          f"ipc://{tmp_path}/none.sock", "--sim", "--curve-server-key", pairs["server"][0]],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "needs both" in out.stderr


@pytest.mark.parametrize("folder", ["curve_allowed_keys", "curve_worker_keys", "curve_admin_keys"])
def test_broker_rejects_a_keys_folder_without_its_own_secret(tmp_path, keys, folder):
    _, allowed = keys
    broker = Broker(BrokerConfig(frontend=f"ipc://{tmp_path}/fe.sock", backend=f"ipc://{tmp_path}/be.sock",
                                 **{folder: allowed}))
    with pytest.raises(ValueError, match=f"{folder} needs curve_secret_key"):
        broker.start()


@pytest.mark.slow
def test_serve_with_curve_authorises_its_own_workers(start_serve, tmp_path, keys):
    pairs, allowed = keys
    sp = start_serve(["--frontend", f"ipc://{tmp_path}/sfe.sock", "--backend", f"ipc://{tmp_path}/sbe.sock",
                      "--sim-workers", "1", "--sim-step-s", "0.01", "--state-dir", str(tmp_path / "state"),
                      "--curve-secret-key", pairs["server"][1], "--curve-allowed-keys", allowed])
    # (no --curve-worker-keys: the backend admits serve's own workers only)
    # `ready` is printed only once every worker registered, so the generated worker key worked
    with BrokerClient.with_curve(sp.endpoint, pairs["server"][0], pairs["client"][1], timeout_s=10.0) as client:
        assert [w["worker_id"] for w in client.status()["workers"]] == ["sim-0"]
    worker_dir = tmp_path / "state" / "curve"
    assert (worker_dir / "broker.key").exists() and (worker_dir / "serve-worker.key_secret").exists()
    assert "secret" not in (worker_dir / "broker.key").read_text()   # workers get the public half only
    assert not (tmp_path / "allowed" / "serve-worker.key").exists()  # the user's dir is untouched


@pytest.mark.slow
def test_serve_admits_worker_keys_on_the_backend_and_refuses_a_client_key(start_serve, tmp_path, keys,
                                                                         worker_keys, spawn_worker):
    """A real `serve` with separate client and worker folders: a process holding an allowed
    CLIENT key tries to register as a worker and never does (the refusal is logged); a remote
    worker with a key from --curve-worker-keys registers beside serve's own worker."""
    pairs, allowed = keys
    backend = f"ipc://{tmp_path}/sbe.sock"
    sp = start_serve(["--frontend", f"ipc://{tmp_path}/sfe.sock", "--backend", backend,
                      "--sim-workers", "1", "--sim-step-s", "0.01",
                      "--curve-secret-key", pairs["server"][1], "--curve-allowed-keys", allowed,
                      "--curve-worker-keys", worker_keys])
    rogue = spawn_worker(backend, "rogue-with-client-key",
                         "--curve-server-key", pairs["server"][0], "--curve-client-key", pairs["client"][1])
    remote = spawn_worker(backend, "remote-worker",
                          "--curve-server-key", pairs["server"][0], "--curve-client-key", pairs["worker"][1])

    def registered() -> set[str]:
        with BrokerClient.with_curve(sp.endpoint, pairs["server"][0], pairs["client"][1],
                                     timeout_s=10.0) as client:
            return {w["worker_id"] for w in client.status()["workers"]}

    assert wait_for(lambda: "remote-worker" in registered(), timeout_s=30), remote.stderr
    client_public = open(pairs["client"][0]).read().split('"')[1]
    assert wait_for(lambda: any("refused worker key " + client_public[:8] in line
                                for line in sp.stderr_lines), timeout_s=20), sp.log()
    # the rogue kept retrying the whole time (it is still running) and never got in
    assert registered() == {"sim-0", "remote-worker"}
    assert rogue.poll() is None


def test_a_plain_local_frontend_beside_curve_serves_local_tools(tmp_path, keys, worker_keys):
    pairs, allowed = keys
    broker = Broker(BrokerConfig(frontend=f"ipc://{tmp_path}/fe.sock", backend=f"ipc://{tmp_path}/be.sock",
                                 curve_secret_key=pairs["server"][1], curve_allowed_keys=allowed,
                                 curve_worker_keys=worker_keys,
                                 local_frontend=f"ipc://{tmp_path}/local.sock"))
    broker.start()
    try:
        with BrokerClient(broker.local_frontend_endpoint, timeout_s=5.0) as local:
            assert local.status()["workers"] == []
            # a generation is accepted there and its final reply comes back on the same socket
            # (no worker is registered, so that reply is the timeout saying why)
            with pytest.raises(RequestFailed) as failed:
                local.generate(prompt="a fox", model_base="tiny-sdxl", steps=2, width=256,
                               height=256, timeout=1)
            assert failed.value.reply["error_code"] == "timeout"
            assert "no worker is registered" in failed.value.reply["error"]
        with BrokerClient(broker.frontend_endpoint, timeout_s=0.5, retries=1) as plain:
            with pytest.raises(BrokerUnavailable):   # the main frontend still needs CURVE
                plain.status()
    finally:
        broker.stop()


def test_a_local_frontend_must_be_loopback(tmp_path, keys):
    from broker.server import is_loopback_endpoint

    assert is_loopback_endpoint("ipc:///tmp/x.sock") and is_loopback_endpoint("tcp://127.0.0.1:5557")
    assert is_loopback_endpoint("tcp://[::1]:5557") and is_loopback_endpoint("tcp://localhost:5557")
    assert not is_loopback_endpoint("tcp://0.0.0.0:5557") and not is_loopback_endpoint("tcp://*:5557")
    assert not is_loopback_endpoint("tcp://10.0.0.5:5557")
    broker = Broker(BrokerConfig(frontend=f"ipc://{tmp_path}/fe.sock", backend=f"ipc://{tmp_path}/be.sock",
                                 local_frontend="tcp://0.0.0.0:0"))
    with pytest.raises(ValueError, match="not a loopback endpoint"):
        broker.start()
