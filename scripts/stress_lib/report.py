"""The end of a stress run: one summary dict (also written as JSON), one rich table, and the
exit-code rules."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .ledger import Ledger

EXIT_OK = 0
EXIT_FAILED = 1        # a guarantee broke: lost, duplicated, broker death, memory, violations
EXIT_SETUP = 2         # the system under test never came up, or the tool itself broke
EXIT_INTERRUPTED = 130


def build_summary(ledger: Ledger, phases: list[dict], max_rss_growth_mb: float,
                  args: dict) -> dict:
    per_phase = {p["phase"]: {**ledger.summary(p["phase"]), **p} for p in phases}
    total = ledger.summary()
    total["healthy_workers_lost"] = sum(p.get("healthy_workers_lost") or 0 for p in phases)
    violations = dict(ledger.violations)
    for p in phases:
        for name, n in ((p.get("bad_input") or {}).get("violations") or {}).items():
            violations[name] = violations.get(name, 0) + n
    dedupe = total.pop("dedupe_mismatches")
    if dedupe:
        violations["dedupe_mismatch"] = len(dedupe)
    failures = evaluate(total, phases, violations, max_rss_growth_mb)
    tool_errors = [e for p in phases for e in p.get("tool_errors") or []]
    return {
        "ok": not failures and not tool_errors,
        "failures": failures,
        "tool_errors": tool_errors,
        "totals": total,
        "violations": violations,
        "violation_examples": dict(ledger.violation_examples),
        "dedupe_mismatch_examples": dedupe[:10],
        "events": dict(ledger.events),
        "phases": per_phase,
        "max_rss_growth_mb": max_rss_growth_mb,
        "args": args,
    }


def evaluate(total: dict, phases: list[dict], violations: dict,
             max_rss_growth_mb: float) -> list[str]:
    """Why this run must exit non-zero; empty when every guarantee held."""
    failures = []
    if total["lost"]:
        failures.append(f"{total['lost']} requests lost (no final reply), e.g. "
                        f"{', '.join(total['lost_examples'][:3])}")
    if total["duplicated"]:
        failures.append(f"{total['duplicated']} requests duplicated, e.g. "
                        f"{', '.join(total['duplicated_examples'][:3])}")
    for p in phases:
        if p.get("healthy_workers_lost"):
            failures.append(f"{p['phase']}: {p['healthy_workers_lost']} healthy workers lost "
                            f"(not faulted, yet declared lost / disconnected / taken over), "
                            f"e.g. {'; '.join(p.get('healthy_lost_examples') or [])[:300]}")
        if p.get("unplanned_broker_deaths") or not p.get("broker_ok", True):
            failures.append(f"{p['phase']}: the broker died outside the planned restart")
        growth = p.get("broker_rss_growth_mb")
        if growth is not None and growth > max_rss_growth_mb:
            failures.append(f"{p['phase']}: broker RSS grew {growth} MB "
                            f"(bound {max_rss_growth_mb} MB)")
    if violations:
        failures.append("contract violations: " + ", ".join(f"{k}={v}" for k, v in
                                                             sorted(violations.items())))
    return failures


def exit_code(summary: dict) -> int:
    if summary["failures"]:
        return EXIT_FAILED
    if summary["tool_errors"]:
        return EXIT_SETUP
    return EXIT_OK


def _sum(runs: list[dict], key: str) -> int:
    return sum(int(r.get(key) or 0) for r in runs)


def _cell(kind: str, fmt):
    """One table cell for an issue-16 fault: '-' when it did not run in that phase."""
    def cell(attacks: dict) -> str:
        runs = attacks.get(kind) or []
        return fmt(runs) if runs else "-"
    return cell


# (label, cell) rows for the issue-16 faults (hostile_faults.py); the JSON has every figure
ATTACK_ROWS = [
    ("big bodies: sent / answered (outcomes)", _cell("big_bodies", lambda r: (
        f"{_sum(r, 'sent')} / {_sum(r, 'answered')} "
        f"({_fmt(_merge(x.get('outcomes') for x in r))})"))),
    ("big bodies: slowest answer (s)", _cell("big_bodies", lambda r: _fmt(
        max((s for x in r for s in x.get("answer_s") or []), default=None)))),
    ("poison worker: garbage frames / disconnects", _cell("poison_telemetry", lambda r: (
        f"{_sum(r, 'poison_frames')} / {_sum(r, 'disconnects')}"))),
    ("poison worker: status answered", _cell("poison_telemetry", lambda r: (
        f"{_sum(r, 'status_answered')} of {_sum(r, 'status_polls')}"))),
    ("rogue: READY as a real id / took it over", _cell("rogue_worker", lambda r: (
        f"{sum((x.get('frames_sent') or {}).get('READY-as-victim', 0) for x in r)} / "
        f"{sum(1 for x in r if x.get('takeover_registered'))}"))),
    ("rogue: jobs forged for / forged frames", _cell("rogue_worker", lambda r: (
        f"{_sum(r, 'jobs_forged_for')} / "
        f"{sum(n for x in r for k, n in (x.get('frames_sent') or {}).items() if 'forged' in k)}"))),
    ("stuck worker: jobs taken / aborts to it", _cell("stuck_worker", lambda r: (
        f"{_sum(r, 'jobs_taken')} / {_sum(r, 'aborts_received')}"))),
    ("stuck worker's jobs: done while it was stuck / after it left / never "
     "(+ nobody waiting)", _cell(
        "stuck_worker", lambda r: (f"{_sum(r, 'finished_while_stuck')} / "
                                   f"{_sum(r, 'finished_after_it_left')} / "
                                   f"{_sum(r, 'never_finished')} "
                                   f"(+{_sum(r, 'nobody_waiting')})"))),
    ("full disk: answered while full / sent (outcomes)", _cell("full_disk", lambda r: (
        f"{_sum(r, 'answered_while_full')} / {_sum(r, 'requests_while_full')} "
        f"({_fmt(_merge({o: 1} for x in r for o in x.get('outcomes_while_full') or []))})"))),
    ("full disk: journal errors the broker logged", _cell("full_disk", lambda r: (
        f"{_sum(r, 'disk_errors_logged')}"))),
    ("full disk: resends after freeing answered", _cell("full_disk", lambda r: (
        f"{_sum(r, 'resends_answered')} of {_sum(r, 'resent_after_free')}"))),
]


def _merge(counts) -> dict:
    out: dict = {}
    for c in counts:
        for k, n in (c or {}).items():
            out[k] = out.get(k, 0) + n
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {n}" for k, n in v.items()) or "-"
    return str(v)


def print_table(summary: dict, console: Console | None = None) -> None:
    console = console or Console()
    phases = list(summary["phases"].values())
    table = Table(title="sdxl-broker stress run", show_lines=False)
    table.add_column("metric")
    for p in phases:
        table.add_column(p["phase"], justify="right")
    table.add_column("total", justify="right", style="bold")
    t = summary["totals"]

    def row(label: str, key: str, total_value=None, style: str | None = None):
        values = [_fmt(p.get(key)) for p in phases]
        table.add_row(label, *values, _fmt(t.get(key) if total_value is None else total_value),
                      style=style)

    def sum_of(key: str):
        vals = [p.get(key) for p in phases if isinstance(p.get(key), (int, float))]
        return sum(vals) if vals else None

    row("load (s)", "load_s", sum_of("load_s"))
    row("generation requests sent", "sent")
    row("frames sent (incl. resends, probes, cancels)", "frames_sent")
    row("accepted", "accepted")
    row("completed", "completed")
    row("failed", "failed")
    codes = sorted({c for p in phases for c in (p.get("failed_by_code") or {})})
    for code in codes:
        table.add_row(f"  failed: {code}",
                      *[_fmt((p.get("failed_by_code") or {}).get(code, 0)) for p in phases],
                      _fmt(t["failed_by_code"].get(code, 0)))
    style_lost = "red" if t["lost"] else "green"
    style_dup = "red" if t["duplicated"] else "green"
    row("LOST (no final reply)", "lost", style=style_lost)
    row("DUPLICATED (more than one final)", "duplicated", style=style_dup)
    style_healthy = "red" if t.get("healthy_workers_lost") else "green"
    row("HEALTHY WORKERS LOST (not faulted)", "healthy_workers_lost", style=style_healthy)
    row("workers given up on (faulted ones included)", "worker_give_ups",
        sum_of("worker_give_ups"))
    row("resent by clients during the run", "resent_in_run")
    table.add_row("resent at the end / answered",
                  *[f"{p.get('resent_at_end', 0)} / {p.get('recovered_at_end', 0)}" for p in phases],
                  f"{t['resent_at_end']} / {t['recovered_at_end']}")
    row("requests of vanished clients", "vanished_clients_requests")
    row("duplicate-id probes", "duplicate_id_probes")
    row("cancels sent", "cancels_sent")
    row("progress messages", "progress_messages")
    row("broker restarts (planned)", "planned_broker_restarts", sum_of("planned_broker_restarts"))
    row("broker deaths (unplanned)", "unplanned_broker_deaths", sum_of("unplanned_broker_deaths"))
    row("worker kill -9", "worker_kills", sum_of("worker_kills"))
    row("worker SIGSTOP+SIGCONT", "worker_stops", sum_of("worker_stops"))
    row("worker restarts seen", "worker_restarts", sum_of("worker_restarts"))
    row("broker RSS start (MB)", "broker_rss_start_mb", "-")
    row("broker RSS end (MB)", "broker_rss_end_mb", "-")
    row("broker RSS growth (MB)", "broker_rss_growth_mb", "-")
    row("latency p50 (s)", "latency_p50_s")
    row("latency p99 (s)", "latency_p99_s")
    for label, cell in ATTACK_ROWS:
        cells = [cell(p.get("attacks") or {}) for p in phases]
        if any(c != "-" for c in cells):
            table.add_row(label, *cells, "")
    table.add_row("bad input sent", *[_fmt((p.get("bad_input") or {}).get("sent")) for p in phases],
                  _fmt(sum((p.get("bad_input") or {}).get("sent", 0) for p in phases)))
    table.add_row("bad input outcomes",
                  *[_fmt((p.get("bad_input") or {}).get("outcomes")) for p in phases], "")
    console.print(table)
    if summary["violations"]:
        console.print("[red]violations:[/red] " + _fmt(summary["violations"]))
        for name, example in summary["violation_examples"].items():
            console.print(f"  {name}: {example}")
    for p in phases:
        for _at, fault, outcome in p.get("faults") or []:
            if str(outcome).startswith("skipped"):
                console.print(f"note ({p['phase']}): fault {fault} {outcome}")
    for p in phases:
        worker_policed = (p.get("bad_input") or {}).get("worker_policed_accepted_by_sim")
        if worker_policed:
            console.print(f"note ({p['phase']}): {worker_policed} bad model names were run by "
                          "SIMULATED workers, which have no model files to police; real workers "
                          "refuse them (run with --real to check)")
    if summary["failures"]:
        console.print("[bold red]FAILED[/bold red]")
        for f in summary["failures"]:
            console.print(f"  - {f}")
    elif summary["tool_errors"]:
        console.print("[bold yellow]TOOL ERRORS[/bold yellow] " + "; ".join(summary["tool_errors"]))
    else:
        console.print("[bold green]OK[/bold green]: nothing lost, nothing duplicated, no "
                      "healthy worker lost, the broker lived, memory within bound")
