"""The stress tool: its accounting rules (fast, no processes), its bad-input corpus checked
against the product's own decoder and parser, and one short real run against simulated
workers (scripts/stress.py as a user runs it, through subprocess)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from stress_lib import report  # noqa: E402
from stress_lib.bad_input import CORPUS  # noqa: E402
from stress_lib.ledger import Entry, Ledger  # noqa: E402


def _final(rid, success=True, code=None, seed=7, mt="generate_sdxl_enhanced_response"):
    data = {"generated_images": [{"seed": seed, "sha256": f"h{seed}"}]} if success else None
    return {"message_type": mt, "request_id": rid, "final": True, "success": success,
            "error_code": code, "data": data}


def _entry(ledger, key, kind="dealer", parent=None, rid=None):
    return ledger.add(Entry(key=key, request_id=rid or key, kind=kind, phase="t", frame=b"{}",
                            codec="json", expected_reply_type="generate_sdxl_enhanced_response",
                            parent=parent))


def test_ledger_counts_lost_duplicated_and_reruns():
    ledger = Ledger()
    for key in ("ok", "lost", "dup", "orig"):
        _entry(ledger, key)
        ledger.sent(key)
    _entry(ledger, "orig#probe", kind="probe_same", parent="orig", rid="orig")
    ledger.sent("orig#probe")
    ledger.final("ok", _final("ok"))
    ledger.final("dup", _final("dup"))
    ledger.final("dup", _final("dup"))
    ledger.final("orig", _final("orig", seed=1))
    ledger.final("orig#probe", _final("orig", seed=2))  # a second run of the same job
    s = ledger.summary()
    assert (s["lost"], s["lost_examples"]) == (1, ["lost"])
    assert s["duplicated"] == 2
    assert any(x.startswith("orig#probe") for x in s["duplicated_examples"])
    assert "dup" in s["duplicated_examples"]
    assert s["completed"] == 3 and s["sent"] == 4


def test_ledger_flags_wrong_dedupe_and_reply_type():
    ledger = Ledger()
    _entry(ledger, "a")
    ledger.sent("a")
    ledger.final("a", _final("a", success=False, code="timeout"))
    _entry(ledger, "a#probe", kind="probe_diff", parent="a", rid="a")
    ledger.sent("a#probe")
    ledger.final("a#probe", _final("a", mt="inference_response"))  # a changed body ran
    s = ledger.summary()
    assert s["dedupe_mismatches"] and "different body" in s["dedupe_mismatches"][0]
    assert ledger.violations["wrong_reply_type"] == 1
    assert s["accepted"] == 1 and s["failed_by_code"] == {"timeout": 1}


def test_exit_rules():
    clean = {"lost": 0, "duplicated": 0, "lost_examples": [], "duplicated_examples": []}
    ok_phase = {"phase": "serve", "broker_ok": True, "unplanned_broker_deaths": 0,
                "broker_rss_growth_mb": 10.0}
    assert report.evaluate(clean, [ok_phase], {}, 200) == []
    assert report.evaluate({**clean, "lost": 1, "lost_examples": ["x"]}, [ok_phase], {}, 200)
    assert report.evaluate(clean, [{**ok_phase, "broker_rss_growth_mb": 250.0}], {}, 200)
    assert report.evaluate(clean, [{**ok_phase, "unplanned_broker_deaths": 1}], {}, 200)
    assert report.evaluate(clean, [ok_phase], {"req_got_progress": 1}, 200)


@pytest.mark.parametrize("case", [c for c in CORPUS if c.policed_by == "broker"],
                         ids=lambda c: c.name)
def test_bad_input_corpus_is_refused_by_the_product_parser(case):
    """Each broker-policed case, built 5 times, is refused by protocol.codec + protocol.parse
    with one of the codes the stress run accepts (the heavy 10 MB cases once)."""
    from protocol import codec
    from protocol.errors import ProtocolError
    from protocol.parse import parse_request

    rng = random.Random(case.name)
    for i in range(1 if case.heavy else 5):
        frame = case.build(rng, f"rid-{i}")
        with pytest.raises(ProtocolError) as info:
            body, _codec = codec.decode(frame)
            parse_request(body)
        assert info.value.code in case.expect, (case.name, info.value.code, info.value.message)


@pytest.mark.slow
def test_short_stress_run_loses_nothing(tmp_path):
    """`scripts/stress.py --seconds 40` against simulated workers, both phases (serve, and a
    broker + workers with one kill -9 and restart of the broker): exit 0, and its JSON summary
    shows work done, faults injected, bad input refused, nothing lost or duplicated."""
    out = tmp_path / "summary.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "stress.py"), "--seconds", "40",
           "--drain-s", "20", "--resend-wait-s", "20", "--seed", "1234",
           "--run-dir", str(tmp_path / "run"), "--json-out", str(out), "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # the tool cleans up on SIGTERM; make sure of it
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    assert out.exists(), output[-3000:]
    summary = json.loads(out.read_text())
    totals = summary["totals"]
    assert proc.returncode == 0, (summary["failures"], summary["tool_errors"], output[-3000:])
    assert totals["lost"] == 0 and totals["duplicated"] == 0
    assert totals["accepted"] > 0 and totals["completed"] > 0
    assert set(summary["phases"]) == {"serve", "split"}
    events = summary["events"]
    for fault in ("fault_kill_worker", "fault_stop_worker", "fault_burst", "fault_oversize",
                  "fault_restart_broker"):
        assert events.get(fault, 0) >= 1, (fault, events)
    assert summary["phases"]["split"]["planned_broker_restarts"] == 1
    assert totals["failed_by_code"].get("queue_full", 0) > 0  # the burst went past --max-queue
    bad = summary["phases"]["serve"]["bad_input"]
    assert bad["outcomes"].get("refused", 0) > 0 and not bad["violations"]
