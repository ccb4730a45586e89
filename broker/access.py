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
- A job may be cancelled by its owner or an admin peer; only they see its prompt in list_queue
  (`include_prompts`).
- Management that changes workers (cleanup, model loads) needs an admin peer.

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


def owner_or_admin(facts: PeerFacts, requester: str, job_owner: str | None,
                   allow_remote_management: bool = False) -> bool:
    """The job's owner, or an admin peer (also for a job whose owner is not known): who may
    cancel a job, and read its prompt in list_queue."""
    return ((job_owner is not None and requester == job_owner)
            or is_admin(facts, allow_remote_management))


may_cancel = owner_or_admin
may_read_prompt = owner_or_admin


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
