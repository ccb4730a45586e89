"""One accepted generation job inside the broker: who waits for it, where it runs, when it expires.

A job has one or more peers (a resend of the same request_id attaches another peer); each gets
the final reply exactly once, in the codec it used. `attempt` counts dispatches; each dispatch
has a unique `dispatch_id` and a RESULT is accepted only from the worker holding the current
one, so a late result from a worker already declared lost (or from before a broker restart) is
discarded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.job import Job

from broker.access import LOCAL_PEER, PeerFacts, owner_of

QUEUED = "queued"
RUNNING = "running"


@dataclass
class Peer:
    """A client waiting for a reply: the ROUTER envelope to answer with, in its codec."""
    envelope: tuple[bytes, ...]   # (identity,) or (identity, b"") as the request came
    codec: str
    # asked for progress (`stream`) and is not a REQ socket (a REQ takes exactly one reply,
    # the final one); only such peers get progress messages, also on a job others stream
    streams: bool = False
    local: bool = False           # came in on the NULL-security local frontend
    facts: PeerFacts = LOCAL_PEER  # its CURVE key and address (broker.access)

    @property
    def owner(self) -> str:
        """Who owns a job this peer submits (broker.access.owner_of)."""
        return owner_of(self.facts, self.envelope, self.local)


@dataclass
class JobState:
    request_id: str
    job: Job
    reply_type: str
    fingerprint: str
    accepted_at: float            # broker clock
    deadline: float               # broker clock; accepted_at + job.timeout_s
    body_bytes: int = 0           # size of the request body: what it counts for --max-queue-mb
    peers: list[Peer] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    state: str = QUEUED
    attempt: int = 0              # dispatches so far; the current one when RUNNING
    dispatch_id: int | None = None  # unique id of the current dispatch (echoed by the worker)
    worker_id: str | None = None
    dispatched_at: float = 0.0
    lost_workers: list[str] = field(default_factory=list)
    # who may cancel it besides an admin (broker.access.owner_of of the submitter); None for a
    # job restored from the journal until a peer resends it
    owner: str | None = None
    last_progress: dict | None = None   # the last progress event sent, repeated to a resend
    stage: str | None = None            # the worker's last reported stage (list_queue)
    step: int = 0                       # ... and its step of total_steps in that stage
    total_steps: int = 0
    # computed once, reused on every dispatch pass and attempt (the job never changes):
    wire: dict | None = None          # job.to_wire()
    needs: object = None              # routing.JobNeeds, valid for needs_sizes_version
    needs_sizes_version: int = -1     # registry.model_sizes_version it was computed with
    _batch_key: object = field(default=False, repr=False)   # False: not computed yet

    def batch_key(self):
        """protocol.batching.batch_key of the job (None: it runs alone), computed once."""
        if self._batch_key is False:
            from protocol.batching import batch_key
            self._batch_key = batch_key(self.job)
        return self._batch_key

    @property
    def wants_progress(self) -> bool:
        return self.job.stream and any(p.streams for p in self.peers)

    def attach(self, peer: Peer) -> None:
        if peer.envelope not in [p.envelope for p in self.peers]:
            self.peers.append(peer)
