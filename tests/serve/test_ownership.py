"""Who may cancel a job and who may manage the workers, attacked on a real `serve` over real
sockets (SIMULATED workers, named as such: the rules are the broker's, not the executor's).

- Under CURVE a job belongs to its submitter's key: another client key cannot cancel it (the
  job finishes for its owner), the owner can from a new connection, an admin key can; cleanup
  needs an admin key.
- Without CURVE a job belongs to the connection that submitted it: another connection, even on
  the broker's machine over loopback, is refused (`forbidden`, the job finishes for its owner);
  the owner cancels on its own socket (a raw DEALER, the Python client's `generation().cancel()`,
  `sdxl-broker generate`'s Ctrl-C: tests/serve/test_cli_people.py); `sdxl-broker cancel` from
  another process says how to cancel instead; serve --allow-local-cancel lets any local
  connection cancel any job; the local frontend (the operator's) always may.
- Without CURVE, a client on another machine (here: this machine's own non-loopback address,
  which the broker cannot tell from another host's) may not run cleanup, unless serve runs with
  --allow-remote-management; a client on the broker's machine may.
"""

from __future__ import annotations

import json
import socket
import threading

import psutil
import pytest
import zmq

from clients.client import BrokerClient, RequestFailed
from runtime.curve import make_keys
from tests.serve.conftest import cli, wait_for

SIM = ["--sim-workers", "1", "--sim-load-s", "0.01", "--sim-step-s", "0.05"]
LONG_STEPS = 60            # 3 s on the simulated worker: long enough to be cancelled while running


def _long_job(client: BrokerClient, request_id: str):
    """A generation in a thread; (thread, event set once it is denoising, dict of its reply)."""
    running, outcome = threading.Event(), {}

    def run():
        outcome["reply"] = client.generate(
            prompt="mine", model_base="tiny-sdxl", steps=LONG_STEPS, width=256, height=256,
            request_id=request_id, raise_on_error=False,
            on_progress=lambda e: e.get("stage") == "denoising" and running.set()).reply
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, running, outcome


def _refused(call) -> RequestFailed:
    with pytest.raises(RequestFailed) as refused:
        call()
    return refused.value


# --- under CURVE --------------------------------------------------------------------------------
@pytest.fixture
def curve_keys(tmp_path):
    pairs = make_keys(str(tmp_path / "keys"), ["server", "alice", "bob", "admin"])
    clients, admins = tmp_path / "clients", tmp_path / "admins"
    clients.mkdir()
    admins.mkdir()
    for name in ("alice", "bob"):
        (clients / f"{name}.key").write_text(open(pairs[name][0]).read())
    (admins / "admin.key").write_text(open(pairs["admin"][0]).read())
    return pairs, str(clients), str(admins)


@pytest.mark.slow
def test_under_curve_only_the_owners_key_or_an_admin_key_cancels_and_only_an_admin_cleans_up(
        start_serve, tmp_path, curve_keys):
    pairs, clients, admins = curve_keys
    sp = start_serve(["--frontend", f"ipc://{tmp_path}/fe.sock", "--backend", f"ipc://{tmp_path}/be.sock",
                      *SIM, "--curve-secret-key", pairs["server"][1], "--curve-allowed-keys", clients,
                      "--curve-admin-keys", admins])

    def client(name: str) -> BrokerClient:
        return BrokerClient.with_curve(sp.endpoint, pairs["server"][0], pairs[name][1], timeout_s=30.0)

    with client("alice") as alice, client("bob") as bob, client("admin") as admin:
        job, running, outcome = _long_job(alice, "alice-1")
        assert running.wait(30), sp.log()
        refused = _refused(lambda: bob.cancel("alice-1"))
        assert refused.code == "forbidden" and "only its submitter's key or an admin key" in refused.reply["error"]
        job.join(60)
        assert outcome["reply"]["success"] is True, outcome   # bob's cancel changed nothing

        # the owner cancels from another connection (every BrokerClient request is a new
        # socket, so a new routing identity): the key is what owns the job
        job, running, outcome = _long_job(alice, "alice-2")
        assert running.wait(30), sp.log()
        assert alice.cancel("alice-2")["cancelled"] is True
        job.join(30)
        assert outcome["reply"]["error_code"] == "cancelled"

        job, running, outcome = _long_job(alice, "alice-3")
        assert running.wait(30), sp.log()
        assert admin.cancel("alice-3")["cancelled"] is True
        job.join(30)
        assert outcome["reply"]["error_code"] == "cancelled"

        refused = _refused(lambda: bob.cleanup())
        assert refused.code == "forbidden" and "--curve-admin-keys" in refused.reply["error"]
        refused = _refused(lambda: bob.load_model("tiny-sdxl"))
        assert refused.code == "forbidden"
        assert set(admin.cleanup()["workers"]) == {"sim-0"}
        assert bob.status()["workers"][0]["worker_id"] == "sim-0"   # reads stay open
    assert any("refused cancel of job alice-1 from a client with key" in line
               for line in sp.stderr_lines), sp.log()


def test_curve_without_allowed_keys_still_owns_jobs_by_key(tmp_path, curve_keys):
    """--curve-secret-key alone admits any key (encryption only), but the authenticator still
    runs, so each message carries its key: a job belongs to it and another key cannot cancel."""
    from broker.server import Broker, BrokerConfig

    pairs, _, _ = curve_keys
    broker = Broker(BrokerConfig(frontend=f"ipc://{tmp_path}/fe.sock", backend=f"ipc://{tmp_path}/be.sock",
                                 curve_secret_key=pairs["server"][1], no_worker_grace_s=600.0))
    broker.start()
    try:
        def client(name: str) -> BrokerClient:
            return BrokerClient.with_curve(broker.frontend_endpoint, pairs["server"][0],
                                           pairs[name][1], timeout_s=10.0)

        with client("alice") as alice, client("bob") as bob:
            queued = threading.Thread(target=lambda: alice.generate(
                prompt="mine", model_base="tiny-sdxl", steps=2, width=256, height=256,
                request_id="queued-1", raise_on_error=False, timeout_s=30.0), daemon=True)
            queued.start()   # no worker: it stays queued
            assert wait_for(lambda: broker.status()["broker"]["queue_depth"] == 1, 10)
            assert _refused(lambda: bob.cancel("queued-1")).code == "forbidden"
            assert alice.cancel("queued-1")["state"] == "queued"
            queued.join(10)
    finally:
        broker.stop()


# --- without CURVE, from another address -----------------------------------------------------------
def _non_loopback_ipv4() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


@pytest.fixture
def lan_address():
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to bind a frontend on, so a "
                    "client that is not on loopback cannot be made here")
    return address


class RawDealer:
    """One DEALER socket (one routing identity) for the whole test, as a C# NetMQ client keeps."""

    def __init__(self, ctx: zmq.Context, endpoint: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.finals: dict[str, dict] = {}   # final replies read while waiting for another one

    def send(self, body: dict) -> None:
        self.sock.send_multipart([b"", json.dumps(body).encode()])

    def final(self, request_id: str, timeout_s: float = 30.0) -> dict:
        while request_id not in self.finals and self.sock.poll(int(timeout_s * 1000)):
            reply = json.loads(self.sock.recv_multipart()[-1])
            if reply.get("final"):
                self.finals[reply["request_id"]] = reply
        if request_id not in self.finals:
            raise AssertionError(f"no final reply for {request_id} within {timeout_s} s")
        return self.finals.pop(request_id)


def _generate_body(request_id: str) -> dict:
    return {"message_type": "generate_sdxl_enhanced", "request_id": request_id, "prompt": "mine",
            "model_base": "tiny-sdxl", "steps": LONG_STEPS, "width": 256, "height": 256}


def _cancel_body(request_id: str, target: str) -> dict:
    return {"message_type": "cancel_request", "request_id": request_id, "data": {"request_id": target}}


@pytest.mark.slow
def test_without_curve_a_remote_client_cannot_clean_up_or_cancel_another_clients_job(
        start_serve, tmp_path, lan_address):
    sp = start_serve(["--frontend", f"tcp://{lan_address}:*", "--backend", f"ipc://{tmp_path}/be.sock",
                      "--local-frontend", f"ipc://{tmp_path}/local.sock", *SIM])
    assert sp.endpoint.startswith(f"tcp://{lan_address}:")
    ctx = zmq.Context()
    try:
        owner, other = RawDealer(ctx, sp.endpoint), RawDealer(ctx, sp.endpoint)
        other.send({"message_type": "cleanup", "request_id": "cl-remote"})
        refused = other.final("cl-remote")
        assert refused["error_code"] == "forbidden" and "--allow-remote-management" in refused["error"]

        owner.send(_generate_body("owned-1"))
        assert wait_for(lambda: _running(sp.endpoint, "owned-1"), timeout_s=30), sp.log()
        other.send(_cancel_body("c-other", "owned-1"))
        assert other.final("c-other")["error_code"] == "forbidden"
        assert owner.final("owned-1", timeout_s=60)["success"] is True   # finished for its owner

        # its owner (the same socket, so the same routing identity) may cancel it
        owner.send(_generate_body("owned-2"))
        assert wait_for(lambda: _running(sp.endpoint, "owned-2"), timeout_s=30), sp.log()
        owner.send(_cancel_body("c-owner", "owned-2"))
        assert owner.final("c-owner")["data"]["cancelled"] is True
        assert owner.final("owned-2")["error_code"] == "cancelled"
    finally:
        ctx.destroy(linger=0)
    # a client on the broker's machine (the local ipc frontend) may run cleanup
    with BrokerClient(f"ipc://{tmp_path}/local.sock", timeout_s=20.0) as local:
        assert set(local.cleanup()["workers"]) == {"sim-0"}
    assert any("refused cleanup from a client with no key from " + lan_address in line
               for line in sp.stderr_lines), sp.log()


@pytest.mark.slow
def test_allow_remote_management_trusts_remote_clients_without_curve(start_serve, tmp_path, lan_address):
    sp = start_serve(["--frontend", f"tcp://{lan_address}:*", "--backend", f"ipc://{tmp_path}/be.sock",
                      *SIM, "--allow-remote-management"])
    with BrokerClient(sp.endpoint, timeout_s=30.0) as remote:
        assert set(remote.cleanup()["workers"]) == {"sim-0"}
        # managing the workers is not cancelling another connection's job (--allow-local-cancel)
        with remote.generation(prompt="mine", model_base="tiny-sdxl", steps=LONG_STEPS, width=256,
                               height=256, request_id="theirs") as job:
            _until_denoising(job)
            assert _refused(lambda: remote.cancel("theirs")).code == "forbidden"
            assert job.cancel()["data"]["cancelled"] is True     # its own connection may
            assert list(job)[-1]["error_code"] == "cancelled"
    assert any("--allow-remote-management: every client" in line for line in sp.stderr_lines)


# --- without CURVE, on the broker's machine ---------------------------------------------------------
def _until_denoising(job) -> None:
    for message in job:
        if message.get("stage") == "denoising":
            return
    raise AssertionError(f"job {job.request_id} ended before denoising: {job.final}")


@pytest.mark.slow
def test_without_curve_on_loopback_only_the_submitting_connection_cancels(start_serve, tmp_path):
    sp = start_serve(["--frontend", "tcp://127.0.0.1:*", "--backend", f"ipc://{tmp_path}/be.sock", *SIM])
    ctx = zmq.Context()
    try:
        owner, other = RawDealer(ctx, sp.endpoint), RawDealer(ctx, sp.endpoint)
        owner.send(_generate_body("local-1"))
        assert wait_for(lambda: _running(sp.endpoint, "local-1"), timeout_s=30), sp.log()
        other.send(_cancel_body("c-other", "local-1"))
        refused = other.final("c-other")
        assert refused["error_code"] == "forbidden", refused
        assert "Ctrl-C in the `sdxl-broker generate`" in refused["error"]
        # another process's `sdxl-broker cancel` is refused too, and told how to cancel
        terminal = cli("cancel", "local-1", "--endpoint", sp.endpoint)
        assert terminal.returncode == 1 and "error (forbidden)" in terminal.stderr, terminal.stderr
        for how in ("press Ctrl-C in the `sdxl-broker generate` that sent it", "admin key",
                    "--local-frontend", "--allow-local-cancel"):
            assert how in terminal.stderr, terminal.stderr
        # nobody else reads its prompt either
        with BrokerClient(sp.endpoint, timeout_s=10.0) as stranger:
            [row] = stranger.list_queue(include_prompts=True)["jobs"]
            assert row["request_id"] == "local-1" and "prompt" not in row
        assert owner.final("local-1", timeout_s=60)["success"] is True   # finished for its owner

        # its owner cancels it on the socket that sent it
        owner.send(_generate_body("local-2"))
        assert wait_for(lambda: _running(sp.endpoint, "local-2"), timeout_s=30), sp.log()
        owner.send(_cancel_body("c-owner", "local-2"))
        assert owner.final("c-owner")["data"]["cancelled"] is True
        assert owner.final("local-2")["error_code"] == "cancelled"
    finally:
        ctx.destroy(linger=0)

    # the Python client: the exchange that submitted a job cancels it on its own socket, while
    # a cancel from another connection of the same client object is refused
    with BrokerClient(sp.endpoint, timeout_s=30.0) as client:
        with client.generation(prompt="mine", model_base="tiny-sdxl", steps=LONG_STEPS, width=256,
                               height=256, request_id="local-3") as job:
            _until_denoising(job)
            assert _refused(lambda: client.cancel("local-3")).code == "forbidden"
            reply = job.cancel()
            assert reply["success"] is True and reply["data"]["state"] == "running", reply
            assert list(job)[-1]["error_code"] == "cancelled"
        # management from this machine is unchanged: loopback may clean up
        assert set(client.cleanup()["workers"]) == {"sim-0"}


@pytest.mark.slow
def test_allow_local_cancel_lets_any_local_connection_cancel_any_job(start_serve, tmp_path):
    sp = start_serve(["--frontend", "tcp://127.0.0.1:*", "--backend", f"ipc://{tmp_path}/be.sock",
                      *SIM, "--allow-local-cancel"])
    with BrokerClient(sp.endpoint, timeout_s=30.0) as alice, BrokerClient(sp.endpoint, timeout_s=30.0) as bob:
        job, running, outcome = _long_job(alice, "alices")
        assert running.wait(30), sp.log()
        [row] = bob.list_queue(include_prompts=True)["jobs"]
        assert row["prompt"] == "mine"
        assert bob.cancel("alices")["cancelled"] is True
        job.join(30)
        assert outcome["reply"]["error_code"] == "cancelled"
    assert any("--allow-local-cancel: every client on this machine may cancel any job" in line
               for line in sp.stderr_lines), sp.log()


def _running(endpoint: str, request_id: str) -> bool:
    with BrokerClient(endpoint, timeout_s=10.0) as client:
        return any(job["request_id"] == request_id and job.get("worker_id")
                   for job in client.list_queue().get("jobs", []))
