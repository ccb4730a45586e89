"""Who may do what: the facts the loop reads off a client's message, and the rules on them.

The loop (broker/server.py) knows two things about the peer behind a frontend message and
hands them to the core with it (`PeerFacts`): its CURVE public key (the ZAP User-Id; present
exactly when the message came through a CURVE socket) and the IP address it connected from
(tcp only; ipc:// and inproc:// peers are on this machine by nature). The rules (docs/curve.md,
"Who may do what"; docs/protocol.md, "Ownership"):

- A job belongs to the peer that submitted it: its CURVE key when it has one (any connection
  using that key), else its routing identity on that socket.
- An *admin* peer: under CURVE a key in --curve-admin-keys (nothing else); on a NULL-security
  socket (no CURVE, or the local frontend) a peer on this machine (loopback address, ipc://,
  inproc://), or any peer when the operator says the network is trusted
  (--allow-remote-management).
- Management that changes workers (cleanup, model loads) needs an admin peer.
- A job may be cancelled by its owner, an admin key (CURVE), or a client of the local frontend
  (the operator's own endpoint: `serve --http`'s gateway, local tools); only they see its prompt
  in list_queue (`include_prompts`). Being on this machine is not enough without CURVE: every
  local process reaches the main frontend, and the contract lets only the submitter cancel.
  The operator may restore "any admin peer cancels any job" without CURVE (--allow-local-cancel).

Pure functions of the facts: no sockets, no clock.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from protocol import constants as C

# client messages that change what the workers hold (every user of the pool feels them)
MANAGEMENT_TYPES = frozenset({C.CLEANUP, C.MODEL_LOAD, C.MODEL_LOAD_LEGACY})


class PeerFacts(NamedTuple):
    """What the loop knows of the peer behind one client message (a NamedTuple: made for every
    tcp or CURVE message, it costs a fifth of a frozen dataclass)."""
    curve_key: str | None = None   # z85 public key (ZAP User-Id); None on a NULL-security socket
    admin_key: bool = False        # curve_key is listed in --curve-admin-keys
    address: str | None = None     # IP the peer connected from (tcp); None: ipc/inproc, this machine

    @property
    def on_this_machine(self) -> bool:
        return self.address is None or is_loopback_address(self.address)

    def describe(self) -> str:
        """For log lines: the key's first characters and the address, never a whole key."""
        who = f"key {self.curve_key[:8]}..." if self.curve_key else "no key"
        return f"{who} from {self.address or 'this machine (ipc/inproc)'}"


LOCAL_PEER = PeerFacts()   # an ipc/inproc peer without CURVE: what tests and tools on one host are


def owner_of(facts: PeerFacts, envelope: tuple[bytes, ...], local: bool) -> str:
    """The owner token of a job this peer submits: its CURVE key, else its routing identity on
    the socket it used (the main or the local frontend)."""
    if facts.curve_key:
        return "key:" + facts.curve_key
    return ("local-id:" if local else "id:") + envelope[0].hex()


def is_admin(facts: PeerFacts, allow_remote_management: bool = False) -> bool:
    """Under CURVE an admin key; without CURVE a peer on this machine, or any peer when the
    operator allows remote management."""
    if facts.curve_key is not None:
        return facts.admin_key
    return allow_remote_management or facts.on_this_machine


def may_cancel(facts: PeerFacts, requester: str, job_owner: str | None, *, local: bool = False,
               allow_local_cancel: bool = False, allow_remote_management: bool = False) -> bool:
    """Who may cancel a job (and read its prompt in list_queue): its owner; under CURVE an
    admin key; a client of the local frontend (`local`); without CURVE, with
    --allow-local-cancel, an admin peer (on this machine, or any under
    --allow-remote-management). A job whose owner is not known (restored from the journal, not
    resent yet) is no one's own."""
    if job_owner is not None and requester == job_owner:
        return True
    if facts.curve_key is not None:
        return facts.admin_key
    return local or (allow_local_cancel and is_admin(facts, allow_remote_management))


may_read_prompt = may_cancel


def cancel_refusal(facts: PeerFacts, request_id: str) -> str:
    """The `forbidden` message of a refused cancel: whose job it is, and how it can be cancelled."""
    if facts.curve_key is not None:
        return (f"job {request_id!r} was submitted by another CURVE key: only its submitter's "
                f"key or an admin key (--curve-admin-keys) may cancel it")
    return (f"job {request_id!r} was submitted by another connection (without CURVE a job "
            f"belongs to the connection that sent it): only its submitter may cancel it, on the "
            f"connection that sent it (Ctrl-C in the `sdxl-broker generate` that sent it), or a "
            f"client of the broker's --local-frontend; a broker started with --allow-local-cancel "
            f"lets any client on its machine cancel any job; under CURVE, an admin key may")


def may_manage(facts: PeerFacts, allow_remote_management: bool = False) -> bool:
    return is_admin(facts, allow_remote_management)


def is_loopback_address(address: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback; an unparsable address is not loopback."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)
