"""Who may cancel a job and who may manage the workers (broker/access.py), through BrokerCore
without sockets: the peer facts are what the loop reads off a message (CURVE key, address),
`local` says it came in on the --local-frontend.
The same rules against a real `serve` over real sockets: tests/serve/test_ownership.py."""

from __future__ import annotations

import json

from broker.access import LOCAL_PEER, PeerFacts, is_admin, is_loopback_address
from broker.core import BrokerConfig, BrokerCore, ClientRequest, ToClient
from broker.journal import MemoryJournal, open_journal

from broker_harness import flat_request

REMOTE_A = PeerFacts(address="192.0.2.10")      # no CURVE, another machine
REMOTE_B = PeerFacts(address="192.0.2.11")
KEY_A = PeerFacts(curve_key="A" * 40, address="127.0.0.1")
KEY_B = PeerFacts(curve_key="B" * 40, address="127.0.0.1")
ADMIN = PeerFacts(curve_key="C" * 40, admin_key=True, address="192.0.2.12")


def _core(**config) -> BrokerCore:
    core = BrokerCore(BrokerConfig(**config), now=0.0, first_dispatch_id=100)
    core.open(MemoryJournal(), 0.0, wall_now=0.0)
    return core


def _send(core, identity: bytes, facts: PeerFacts, body: dict, now: float = 1.0,
          local: bool = False) -> list[dict]:
    out = core.on_client(ClientRequest((identity, b""), json.dumps(body).encode(),
                                       peer_facts=facts, local=local), now)
    return [o.message for o in out if isinstance(o, ToClient) and o.message.get("final")]


def _cancel(core, identity: bytes, facts: PeerFacts, rid: str, local: bool = False) -> dict:
    """The cancel_response (a successful cancel also sends the job's own `cancelled` reply)."""
    cancel_id = f"c-{identity.decode()}"
    [reply] = [r for r in _send(core, identity, facts, {"message_type": "cancel_request",
                                                        "request_id": cancel_id,
                                                        "data": {"request_id": rid}}, local=local)
               if r["request_id"] == cancel_id]
    return reply


def _queued(core) -> list[str]:
    return [rid for rid, _ in core.queue]


def test_without_curve_only_the_submitting_identity_cancels_a_remote_clients_job():
    core = _core()
    assert _send(core, b"alice", REMOTE_A, flat_request("job-a")) == []
    refused = _cancel(core, b"mallory", REMOTE_B, "job-a")
    assert refused["success"] is False and refused["error_code"] == "forbidden"
    assert "only its submitter may cancel it" in refused["error"]
    assert "without CURVE a job belongs to the connection that sent it" in refused["error"]
    # the refusal says how it can be cancelled
    assert "Ctrl-C in the `sdxl-broker generate`" in refused["error"]
    assert "--allow-local-cancel" in refused["error"] and "--local-frontend" in refused["error"]
    assert refused["message_type"] == "cancel_response" and refused["request_id"] == "c-mallory"
    assert _queued(core) == ["job-a"]                      # the job is untouched
    # the same address with another identity is another client too
    assert _cancel(core, b"alice-2", REMOTE_A, "job-a")["error_code"] == "forbidden"
    done = _cancel(core, b"alice", REMOTE_A, "job-a")
    assert done["success"] is True and done["data"]["state"] == "queued"


LOOPBACK = PeerFacts(address="127.0.0.1")      # no CURVE, tcp from this machine


def test_without_curve_being_on_the_brokers_machine_is_not_enough_to_cancel_another_job():
    """The contract: only the submitter (or an admin key under CURVE). Every local process
    reaches the main frontend, over loopback tcp or ipc: neither makes it the owner."""
    core = _core()
    _send(core, b"alice", LOOPBACK, flat_request("job-a"))
    _send(core, b"bob", LOCAL_PEER, flat_request("job-b"))
    for facts in (LOOPBACK, LOCAL_PEER):
        for rid in ("job-a", "job-b"):
            refused = _cancel(core, b"mallory", facts, rid)
            assert refused["error_code"] == "forbidden", (facts, rid, refused)
    assert _queued(core) == ["job-a", "job-b"]
    assert _cancel(core, b"alice", LOOPBACK, "job-a")["success"] is True     # its own connection
    assert _cancel(core, b"bob", LOCAL_PEER, "job-b")["success"] is True


def test_a_client_of_the_local_frontend_may_cancel_any_job():
    """The operator's own endpoint (serve --http's gateway, local tools) stays trusted."""
    core = _core()
    _send(core, b"alice", REMOTE_A, flat_request("job-a"))
    _send(core, b"carol", KEY_A, flat_request("job-c"))
    assert _cancel(core, b"tool", LOCAL_PEER, "job-a", local=True)["success"] is True
    assert _cancel(core, b"tool", LOCAL_PEER, "job-c", local=True)["success"] is True


def test_allow_local_cancel_lets_a_client_on_the_brokers_machine_cancel_any_job():
    core = _core(allow_local_cancel=True)
    for rid, facts in (("job-a", REMOTE_A), ("job-b", REMOTE_B), ("job-c", KEY_A)):
        _send(core, rid.encode(), facts, flat_request(rid))
    assert _cancel(core, b"tool", LOCAL_PEER, "job-a")["success"] is True            # ipc
    assert _cancel(core, b"tool", LOOPBACK, "job-b")["success"] is True              # loopback tcp
    # not a client on another machine, and under CURVE still only the key or an admin key
    _send(core, b"alice", REMOTE_A, flat_request("job-a2"))
    assert _cancel(core, b"bob", REMOTE_B, "job-a2")["error_code"] == "forbidden"
    assert _cancel(core, b"dave", KEY_B, "job-c")["error_code"] == "forbidden"


def test_under_curve_the_key_owns_the_job_on_any_connection_and_an_admin_may_cancel():
    core = _core()
    _send(core, b"conn-1", KEY_A, flat_request("job-a"))
    _send(core, b"conn-2", KEY_A, flat_request("job-a2"))
    # another key on this very machine is not the owner: CURVE decides, not the address
    refused = _cancel(core, b"conn-3", KEY_B, "job-a")
    assert refused["error_code"] == "forbidden" and "another CURVE key" in refused["error"]
    assert "only its submitter's key or an admin key (--curve-admin-keys)" in refused["error"]
    # the owner's key from a new connection (a REQ client that reconnected) may
    assert _cancel(core, b"conn-9", KEY_A, "job-a")["success"] is True
    assert _cancel(core, b"admin", ADMIN, "job-a2")["success"] is True


def test_an_unknown_id_is_still_a_validation_error_for_everyone():
    core = _core()
    reply = _cancel(core, b"mallory", REMOTE_B, "no-such-job")
    assert reply["error_code"] == "validation_error" and "no queued or running job" in reply["error"]


def test_a_resend_from_another_peer_attaches_but_does_not_make_it_an_owner():
    core = _core()
    _send(core, b"alice", REMOTE_A, flat_request("job-a"))
    assert _send(core, b"alice-reconnected", REMOTE_B, flat_request("job-a")) == []   # attached
    assert len(core.jobs["job-a"].peers) == 2
    assert _cancel(core, b"alice-reconnected", REMOTE_B, "job-a")["error_code"] == "forbidden"


def test_a_job_restored_from_the_journal_is_owned_by_its_first_resender(tmp_path):
    first = BrokerCore(BrokerConfig(), now=0.0)
    first.open(open_journal(str(tmp_path), 3600.0), 0.0, wall_now=0.0)
    body = json.dumps(flat_request("job-r")).encode()
    first.on_client(ClientRequest((b"alice", b""), body, peer_facts=KEY_A), 1.0)
    first.journal.close()
    restarted = BrokerCore(BrokerConfig(), now=0.0)
    restarted.open(open_journal(str(tmp_path), 3600.0), 0.0, wall_now=2.0)
    assert restarted.jobs["job-r"].owner is None
    assert _cancel(restarted, b"x", KEY_B, "job-r")["error_code"] == "forbidden"
    assert _send(restarted, b"alice-again", KEY_A, flat_request("job-r")) == []      # resend
    assert _cancel(restarted, b"x", KEY_B, "job-r")["error_code"] == "forbidden"
    assert _cancel(restarted, b"alice-3", KEY_B, "job-r")["error_code"] == "forbidden"
    assert _cancel(restarted, b"alice-3", KEY_A, "job-r")["success"] is True
    restarted.journal.close()


def test_management_needs_an_admin_peer_unless_the_operator_allows_it():
    cleanup = {"message_type": "cleanup", "request_id": "cl"}
    load = {"message_type": "model_load_request", "request_id": "ld", "data": {"model_name": "tiny-sdxl"}}
    legacy_load = {"action": "load_model", "request_id": "ld2", "model_name": "tiny-sdxl"}
    core = _core()
    for facts in (REMOTE_A, KEY_A):    # another machine without CURVE; a non-admin key anywhere
        for body in (cleanup, load, legacy_load):
            [reply] = _send(core, b"peer", facts, body)
            assert reply["error_code"] == "forbidden", (facts, body, reply)
            assert reply["success"] is False and reply["request_id"] == body["request_id"]
    [hint] = _send(core, b"peer", KEY_A, cleanup)
    assert "--curve-admin-keys" in hint["error"]
    [hint] = _send(core, b"peer", REMOTE_A, cleanup)
    assert "--allow-remote-management" in hint["error"]
    # reads stay open to every client
    [status] = _send(core, b"peer", REMOTE_A, {"message_type": "status_request", "request_id": "s"})
    assert status["success"] is True
    # an admin peer (a loopback client without CURVE, an admin key) gets through to the workers
    # (none registered here: cleanup says so, a load has nowhere to go)
    for facts in (LOCAL_PEER, ADMIN):
        [reply] = _send(core, b"admin", facts, cleanup)
        assert reply["success"] is True and reply["warnings"] == ["no worker is registered"]
        [reply] = _send(core, b"admin", facts, load)
        assert reply["error_code"] == "unsupported_feature"
    # --allow-remote-management: without CURVE every peer is trusted; a CURVE key still is not
    allowing = _core(allow_remote_management=True)
    [reply] = _send(allowing, b"peer", REMOTE_A, cleanup)
    assert reply["success"] is True
    [reply] = _send(allowing, b"peer", KEY_A, cleanup)
    assert reply["error_code"] == "forbidden"


def test_remote_management_alone_does_not_cancel_others_jobs_with_local_cancel_it_does():
    core = _core(allow_remote_management=True)
    _send(core, b"alice", REMOTE_A, flat_request("job-a"))
    assert _cancel(core, b"bob", REMOTE_B, "job-a")["error_code"] == "forbidden"
    both = _core(allow_remote_management=True, allow_local_cancel=True)
    _send(both, b"alice", REMOTE_A, flat_request("job-a"))
    _send(both, b"carol", KEY_A, flat_request("job-c"))
    assert _cancel(both, b"bob", REMOTE_B, "job-a")["success"] is True
    assert _cancel(both, b"dave", KEY_B, "job-c")["error_code"] == "forbidden"


def test_refusals_are_counted_and_logged_once_per_interval(caplog):
    core = _core()
    _send(core, b"alice", REMOTE_A, flat_request("job-a"))
    with caplog.at_level("WARNING", logger="broker.server"):
        for _ in range(5):
            _cancel(core, b"mallory", REMOTE_B, "job-a")
    lines = [r.getMessage() for r in caplog.records if "refused cancel" in r.getMessage()]
    assert len(lines) == 1 and "from 192.0.2.11" in lines[0]
    assert core.metrics.replies.labels("rejected", "forbidden")._value.get() == 5


def test_loopback_addresses():
    assert is_loopback_address("127.0.0.1") and is_loopback_address("127.8.9.1")
    assert is_loopback_address("::1") and is_loopback_address("::ffff:127.0.0.1")
    assert not is_loopback_address("192.0.2.2") and not is_loopback_address("fd00::2")
    assert not is_loopback_address("localhost:0:0:123") and not is_loopback_address("unknown")
    assert is_admin(LOCAL_PEER) and is_admin(PeerFacts(address="127.0.0.1"))
    assert not is_admin(PeerFacts(address="192.0.2.2"))
    assert is_admin(PeerFacts(address="192.0.2.2"), allow_remote_management=True)
    # CURVE: only an admin key, wherever it connects from, whatever the flag says
    assert not is_admin(PeerFacts(curve_key="k", address="127.0.0.1"), allow_remote_management=True)
    assert is_admin(PeerFacts(curve_key="k", admin_key=True, address="192.0.2.2"))


def test_list_queue_shows_a_prompt_only_to_its_owner_and_admins():
    core = _core()
    _send(core, b"alice", REMOTE_A, flat_request("job-a", prompt="alice's secret"))
    _send(core, b"carol", KEY_A, flat_request("job-c", prompt="carol's secret"))
    listing = {"message_type": "list_queue", "request_id": "lq", "data": {"include_prompts": True}}

    def prompts(identity: bytes, facts: PeerFacts, local: bool = False) -> dict:
        [reply] = _send(core, identity, facts, listing, local=local)
        return {row["request_id"]: row.get("prompt") for row in reply["data"]["jobs"]}

    assert prompts(b"mallory", REMOTE_B) == {"job-a": None, "job-c": None}
    assert prompts(b"mallory", LOOPBACK) == {"job-a": None, "job-c": None}
    assert prompts(b"alice", REMOTE_A) == {"job-a": "alice's secret", "job-c": None}
    assert prompts(b"carol-2", KEY_A) == {"job-a": None, "job-c": "carol's secret"}
    both = {"job-a": "alice's secret", "job-c": "carol's secret"}
    assert prompts(b"admin", ADMIN) == both
    assert prompts(b"gateway", LOCAL_PEER, local=True) == both    # the local frontend
