"""Logs as an operator reads them, from a real `serve`: one line per finished job, no
third-party noise, and with --log-format json every stderr line of serve, the broker and the
workers (third-party messages included) is one JSON object."""

from __future__ import annotations

import json
import re

import pytest

from tests.serve.conftest import cli, one_cpu_worker_argv

NOISE = ("No LoRA keys associated", "should be kept in float32", "torchvision", "[transformers]",
         "peft_config")


@pytest.mark.slow
def test_json_logs_every_line_with_one_line_per_finished_job(start_serve, demo_models_dir, tmp_path):
    sp = start_serve(one_cpu_worker_argv(demo_models_dir, tmp_path / "out", tmp_path,
                                         "--log-format", "json"), ready_timeout_s=180)
    common = ["--model", "tiny-sdxl", "--steps", "1", "--size", "256x256", "--endpoint", sp.endpoint]
    ids = {}
    for name, extra in (("lora", ["--lora", "tiny-lora-a:0.8"]), ("vae", ["--vae", "tiny-vae"]),
                        ("two_loras", ["--lora", "tiny-lora-a:0.8", "--lora", "tiny-lora-b:0.5"]),
                        ("missing", ["--lora", "no-such-lora"])):
        done = cli("generate", "a fox", *common, *extra, timeout_s=180)
        ids[name] = re.match(r"request (\S+)", done.stderr).group(1)
        assert done.returncode == (1 if name == "missing" else 0), done.stderr
    assert sp.stop() == 0

    lines = [line for line in sp.stderr_lines if line.strip()]
    records = []
    for line in lines:
        record = json.loads(line)            # every single line is one JSON object
        assert isinstance(record, dict) and {"ts", "level", "logger", "pid", "message"} <= set(record)
        records.append(record)
    pids = {r["pid"] for r in records}
    assert len(pids) >= 2                    # serve/broker and the worker process
    assert any(r["logger"].startswith("gpu_worker") for r in records)
    assert not [r for r in records if any(n in r["message"] for n in NOISE)]

    jobs = {r["job"]["request_id"]: r for r in records if r["logger"] == "broker.jobs"}
    assert set(jobs) == set(ids.values())    # exactly one line per finished job
    lora = jobs[ids["lora"]]
    assert lora["level"] == "INFO"
    assert lora["job"]["mode"] == "txt2img+lora" and lora["job"]["form"] == "flat"
    assert lora["job"]["worker"] == "cpu-0" and lora["job"]["outcome"] == "completed"
    assert lora["job"]["inference_s"] > 0 and lora["job"]["total_s"] >= lora["job"]["inference_s"]
    assert f"job {ids['lora']} completed: flat txt2img+lora on cpu-0, queue " in lora["message"]
    missing = jobs[ids["missing"]]["job"]
    assert missing["outcome"] == "failed" and missing["error_code"] == "model_not_found"
    print("\n".join(r["message"] for r in jobs.values()))


def test_text_logs_say_what_each_job_did(start_serve):
    sp = start_serve(["--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
                      "--sim-workers", "1", "--sim-step-s", "0.01"])
    done = cli("generate", "a fox", "--model", "tiny-sdxl", "--steps", "3", "--size", "256x256",
               "--endpoint", sp.endpoint, timeout_s=60)
    assert done.returncode == 0, done.stderr
    request_id = re.match(r"request (\S+)", done.stderr).group(1)
    assert sp.stop() == 0
    job_lines = [line for line in sp.stderr_lines if "broker.jobs" in line]
    assert len(job_lines) == 1, job_lines
    assert re.search(rf"INFO broker\.jobs: job {request_id} completed: flat txt2img on sim-0, "
                     r"queue \d+\.\d\ds, inference \d+\.\d\ds, total \d+\.\d\ds$", job_lines[0].rstrip())
