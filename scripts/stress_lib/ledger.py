"""The accounting: every request the stress run sends -> the final replies it got.

One `Entry` per logical request (a generation, a duplicate-id probe, a cancel). An entry may be
sent several times (a client resending after a timeout or a broker restart, always from a fresh
socket so replies to the old socket can never be counted twice). At the end:

- lost:       an entry with no final reply, even after the end-of-run resend;
- duplicated: an entry with more than one final reply, or a duplicate-id probe whose successful
              result differs from the original's (the job ran twice: another seed/image).

Thread-safe: client threads, the fault scheduler and the reconciler all write here.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

# answers that say the broker did not take the request (nothing queued, nothing stored): a
# resend of the id afterwards is a new request, not a duplicate
NOT_TAKEN = frozenset({"queue_full", "unavailable", "validation_error", "malformed_message",
                       "unknown_message_type", "duplicate_request_id", "forbidden"})
# error codes that prove the broker accepted the job before it failed
_ACCEPTED_FAILURES = frozenset({"timeout", "cancelled", "worker_lost", "out_of_memory",
                                "internal_error", "unsupported_feature", "model_not_found"})
# big: a hostile client's 60 MB bodies; disk_probe / disk_retry: sent while the journal's
# disk is full, and again after it is freed (hostile_faults.py)
GENERATION_KINDS = frozenset({"dealer", "req", "vanish", "burst", "big", "disk_probe",
                              "disk_retry"})


@dataclass
class Final:
    success: bool
    error_code: str | None
    message_type: str | None
    at: float
    seeds: tuple = ()
    sha256: tuple = ()
    worker_id: str | None = None


@dataclass
class Entry:
    key: str                 # unique: the request id, or "<id>#probe<n>" / "<id>#cancel"
    request_id: str
    kind: str                # dealer | req | vanish | burst | probe_same | probe_diff | cancel
    phase: str
    frame: bytes             # the encoded body, resent unchanged
    codec: str
    expected_reply_type: str
    stream: bool = False
    parent: str | None = None    # for probes and cancels: the original entry's key
    sends: int = 0
    first_sent_at: float = 0.0
    progress: int = 0
    accepted_seen: bool = False  # a progress message proved the broker queued it
    vanished: bool = False
    resent_at_end: bool = False
    finals: list[Final] = field(default_factory=list)


def summarise_final(reply: dict, now: float) -> Final:
    data = reply.get("data") if isinstance(reply.get("data"), dict) else {}
    images = data.get("generated_images") or []
    seeds = tuple(img.get("seed") for img in images if isinstance(img, dict))
    shas = tuple(img.get("sha256") for img in images if isinstance(img, dict))
    metrics = data.get("processing_metrics") if isinstance(data.get("processing_metrics"), dict) else {}
    return Final(success=bool(reply.get("success")), error_code=reply.get("error_code"),
                 message_type=reply.get("message_type"), at=now, seeds=seeds, sha256=shas,
                 worker_id=metrics.get("worker_id"))


class Ledger:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self.entries: dict[str, Entry] = {}
        self.violations: Counter = Counter()
        self.violation_examples: dict[str, str] = {}
        self.events: Counter = Counter()  # faults injected, restarts seen, resends...
        self._finals = 0

    # --- writers -------------------------------------------------------------------------
    def add(self, entry: Entry) -> Entry:
        with self._lock:
            if entry.key in self.entries:
                raise ValueError(f"ledger key {entry.key} used twice")
            self.entries[entry.key] = entry
        return entry

    def sent(self, key: str) -> None:
        now = self._clock()
        with self._lock:
            e = self.entries[key]
            e.sends += 1
            if e.sends == 1:
                e.first_sent_at = now

    def final(self, key: str, reply: dict) -> Final:
        f = summarise_final(reply, self._clock())
        with self._lock:
            e = self.entries[key]
            e.finals.append(f)
            self._finals += 1
            if f.message_type != e.expected_reply_type:
                self._violation("wrong_reply_type",
                                f"{e.key}: expected {e.expected_reply_type}, got {f.message_type}")
            if not f.success and f.error_code is None:
                self._violation("error_without_code", f"{e.key}: {reply.get('error')!r}")
        return f

    def progress(self, key: str) -> None:
        with self._lock:
            e = self.entries[key]
            e.progress += 1
            e.accepted_seen = True

    def violation(self, name: str, example: str = "") -> None:
        with self._lock:
            self._violation(name, example)

    def _violation(self, name: str, example: str) -> None:
        self.violations[name] += 1
        self.violation_examples.setdefault(name, example[:300])

    def event(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.events[name] += n

    # --- readers -------------------------------------------------------------------------
    def get(self, key: str) -> Entry:
        with self._lock:
            return self.entries[key]

    def entries_for(self, request_id: str) -> list[Entry]:
        """Every entry sent with this request id (the request, its probes, a cancel)."""
        with self._lock:
            return [e for e in self.entries.values() if e.request_id == request_id]

    def finals_count(self) -> int:
        with self._lock:
            return self._finals

    def unanswered(self, phase: str | None = None) -> list[Entry]:
        with self._lock:
            return [e for e in self.entries.values()
                    if not e.finals and e.sends > 0 and (phase is None or e.phase == phase)]

    def summary(self, phase: str | None = None) -> dict:
        """Counts for the final table and the JSON summary."""
        with self._lock:
            entries = [e for e in self.entries.values() if phase is None or e.phase == phase]
            gens = [e for e in entries if e.kind in GENERATION_KINDS]
            by_code: Counter = Counter()
            latencies: list[float] = []
            accepted = completed = 0
            for e in gens:
                if not e.finals:
                    continue
                f = e.finals[0]
                if f.success:
                    completed += 1
                    if not (e.vanished or e.resent_at_end):  # nobody was waiting for those
                        latencies.append(f.at - e.first_sent_at)
                else:
                    by_code[f.error_code or "no_code"] += 1
                if f.success or e.accepted_seen or f.error_code in _ACCEPTED_FAILURES:
                    accepted += 1
            lost = [e.key for e in entries if e.sends > 0 and not e.finals]
            duplicated = [e.key for e in entries if len(e.finals) > 1]
            reruns = self._reruns(entries)
            probes = [e for e in entries if e.kind.startswith("probe")]
            latencies.sort()
            return {
                "sent": len(gens),
                "frames_sent": sum(e.sends for e in entries),
                "accepted": accepted,
                "completed": completed,
                "failed": sum(by_code.values()),
                "failed_by_code": dict(sorted(by_code.items())),
                "lost": len(lost),
                "lost_examples": lost[:10],
                "duplicated": len(duplicated) + len(reruns),
                "duplicated_examples": (duplicated + reruns)[:10],
                "resent_in_run": sum(max(0, e.sends - 1) for e in entries if not e.resent_at_end),
                "resent_at_end": sum(1 for e in entries if e.resent_at_end),
                "recovered_at_end": sum(1 for e in entries if e.resent_at_end and e.finals),
                "vanished_clients_requests": sum(1 for e in entries if e.vanished),
                "duplicate_id_probes": len(probes),
                "cancels_sent": sum(1 for e in entries if e.kind == "cancel"),
                "progress_messages": sum(e.progress for e in entries),
                "latency_p50_s": _percentile(latencies, 50),
                "latency_p99_s": _percentile(latencies, 99),
                "dedupe_mismatches": self._dedupe_mismatches(entries),
            }

    def _dedupe_mismatches(self, entries: list[Entry]) -> list[str]:
        """Duplicate-id probes that did not get what the contract promises: the same body gets
        the original job's outcome; a different body gets duplicate_request_id."""
        out = []
        for e in entries:
            if not e.kind.startswith("probe") or not e.finals or not e.parent:
                continue
            parent = self.entries.get(e.parent)
            if parent is None or not parent.finals:
                continue
            a, b = parent.finals[0], e.finals[0]
            if a.error_code in NOT_TAKEN or b.error_code == "unavailable":
                continue   # the original was never taken, or the resend was told to come back
            if e.kind == "probe_diff" and b.error_code != "duplicate_request_id":
                out.append(f"{e.key}: different body got {b.error_code or 'success'}")
            elif e.kind == "probe_same" and (a.success, a.error_code) != (b.success, b.error_code):
                out.append(f"{e.key}: original {a.error_code or 'success'}, "
                           f"resend {b.error_code or 'success'}")
        return out

    def _reruns(self, entries: list[Entry]) -> list[str]:
        """Probes with the same body whose successful result differs from the original's:
        the broker ran the job a second time instead of attaching or replaying."""
        out = []
        for e in entries:
            if e.kind != "probe_same" or not e.finals or not e.parent:
                continue
            parent = self.entries.get(e.parent)
            if parent is None or not parent.finals:
                continue
            a, b = parent.finals[0], e.finals[0]
            if a.success and b.success and (a.seeds, a.sha256) != (b.seeds, b.sha256):
                out.append(f"{e.key} (job ran twice: seeds {a.seeds} vs {b.seeds})")
        return out


def _percentile(sorted_values: list[float], pct: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * (len(sorted_values) - 1))))
    return round(sorted_values[index], 4)
