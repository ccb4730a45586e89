"""The stuck-job watchdog against a real `serve` (issue 16 item 7).

serve runs one healthy simulated worker; a second simulated worker, started on its own, takes
jobs and then stalls forever in them while it keeps heart-beating (`--sim-stall-after-jobs 0`,
a SIMULATED fault). Every client still gets its result, from the healthy worker; status and
/metrics show the stalled worker unhealthy and the watchdog's firing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from clients.client import BrokerClient
from tests.serve.conftest import ROOT, cli, free_port, stop_processes, wait_for
from tests.serve.test_metrics import scrape, value


def test_a_stalled_worker_s_jobs_are_rerun_on_the_healthy_one(start_serve, tmp_path, monkeypatch):
    backend, metrics_port = f"tcp://127.0.0.1:{free_port()}", free_port()
    serve = start_serve(["--frontend", "tcp://127.0.0.1:*", "--backend", backend,
                         "--sim-workers", "1", "--routing", "round-robin",
                         "--stuck-job-s", "3", "--metrics-port", str(metrics_port)])
    log_path = tmp_path / "stalled.log"
    with open(log_path, "w") as log:
        stalled = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "worker", "--connect", backend, "--sim",
             "--worker-id", "stalled", "--sim-stall-after-jobs", "0"],
            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=log,
            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        with BrokerClient(serve.endpoint, timeout_s=30.0) as client:
            assert wait_for(lambda: len(client.status()["workers"]) == 2, 60), serve.log()
            replies: dict[str, dict] = {}

            def generate(rid: str) -> None:
                with BrokerClient(serve.endpoint, timeout_s=120.0) as own:
                    replies[rid] = own.generate(prompt="a fox", model_base="tiny-sdxl", steps=3,
                                                width=256, height=256, request_id=rid,
                                                raise_on_error=False).reply

            threads = [threading.Thread(target=generate, args=(f"job-{i}",)) for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(180)
            assert sorted(replies) == [f"job-{i}" for i in range(4)], serve.log()
            for rid, reply in replies.items():
                assert reply["success"] is True, (rid, reply, serve.log())
                assert reply["data"]["processing_metrics"]["worker_id"] == "sim-0"

            rows = {w["worker_id"]: w for w in client.status()["workers"]}
            assert rows["stalled"]["healthy"] is False and rows["stalled"]["stalls"] >= 1
            assert "no progress for" in rows["stalled"]["unhealthy_reason"]
            assert rows["sim-0"]["healthy"] is True
        # what an operator sees in `sdxl-broker status` (wide enough for one line per worker)
        monkeypatch.setenv("COLUMNS", "200")
        shown = cli("status", "--endpoint", serve.endpoint)
        assert shown.returncode == 0, shown.stderr
        stalled_line = next(line for line in shown.stdout.splitlines() if "stalled" in line)
        assert "unhealthy" in stalled_line
        assert not any("unhealthy" in line for line in shown.stdout.splitlines() if "sim-0" in line)
        samples = scrape(metrics_port)
        assert value(samples, "sdxl_broker_watchdog_firings_total", worker_id="stalled") >= 1
        assert value(samples, "sdxl_worker_healthy", worker_id="stalled", device="cpu") == 0.0
        assert "watchdog: worker stalled holds job(s)" in "".join(serve.stderr_lines)
        assert "SIMULATED stall" in log_path.read_text()
    finally:
        stop_processes([stalled], timeout_s=5)
