"""The listing messages as a person and a client see them, against a real `serve`:
`sdxl-broker models` (what the workers can load, from their real model folders),
`sdxl-broker queue` (running and queued jobs with their steps; prompts only when asked) and `sdxl-broker history`
(recent finished jobs with their image paths), and the replies against their JSON schemas."""

from __future__ import annotations

import json
import threading

import pytest

from clients.client import BrokerClient
from protocol import reply_models as R
from tests.serve.conftest import cli, one_cpu_worker_argv, wait_for

_MODELS = {"reply.list_models": R.ListModelsReply, "reply.list_queue": R.ListQueueReply,
           "reply.list_history": R.ListHistoryReply}


def _validate(reply: dict, stem: str) -> None:
    """Against the reply model protocol/schemas/<stem>.json is generated from, after a JSON
    round trip (what a C# client parses)."""
    _MODELS[stem].model_validate(json.loads(json.dumps(reply)))


@pytest.mark.slow
def test_models_lists_every_file_a_worker_can_load_by_kind(start_serve, demo_models_dir, tmp_path):
    sp = start_serve(one_cpu_worker_argv(demo_models_dir, tmp_path / "out", tmp_path),
                     ready_timeout_s=180)
    with BrokerClient(sp.endpoint, timeout_s=60.0) as client:
        client.load_model("tiny-sdxl")
        reply = client.request({"message_type": "list_models"})
        made = client.generate(prompt="a fox", model_base="tiny-sdxl", steps=1, width=256,
                               height=256, request_id="real-1")
        history = client.list_history(5)["jobs"]
    assert history[0]["request_id"] == "real-1" and history[0]["images"] == [made.images[0].path]
    assert (tmp_path / "out").exists() and history[0]["images"][0].startswith(str(tmp_path / "out"))
    assert reply["success"] is True and reply["message_type"] == "list_models_response"
    _validate(reply, "reply.list_models")
    models = reply["data"]["models"]
    names = {kind: {m["name"]: m for m in rows} for kind, rows in models.items()}
    assert {"tiny-sdxl", "tiny-sdxl.safetensors"} <= set(names["base"])
    assert set(names["refiner"]) == {"tiny-sdxl-refiner"} and set(names["vae"]) == {"tiny-vae"}
    assert {"tiny-lora-a", "tiny-lora-b"} <= set(names["lora"])
    assert {"tiny-canny", "tiny-depth"} <= set(names["controlnet"])
    assert "tiny-ti" in names["embedding"] and "tiny-esrgan" in names["upscaler"]
    assert names["base"]["tiny-sdxl"]["loaded_on"] == ["cpu-0"]          # loaded above
    assert names["refiner"]["tiny-sdxl-refiner"]["loaded_on"] == []
    assert names["base"]["tiny-sdxl"]["size_mb"] > 1 and names["base"]["tiny-sdxl"]["workers"] == ["cpu-0"]
    assert "DPM++ 2M Karras" in reply["data"]["schedulers"]

    table = cli("models", "--endpoint", sp.endpoint, timeout_s=60)
    assert table.returncode == 0, table.stderr
    for text in ("tiny-sdxl-refiner", "tiny-lora-a", "tiny-canny", "tiny-ti", "tiny-esrgan",
                 "DPM++ 2M Karras"):
        assert text in table.stdout
    as_json = json.loads(cli("models", "--endpoint", sp.endpoint, "--json", timeout_s=60).stdout)
    assert as_json["workers"][0]["worker_id"] == "cpu-0" and as_json["workers"][0]["device"] == "cpu"


def test_queue_and_history_show_jobs_without_prompts(start_serve, tmp_path):
    local = f"ipc://{tmp_path}/local.sock"   # the operator's endpoint (a dashboard, tools)
    sp = start_serve(["--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
                      "--sim-workers", "1", "--sim-step-s", "0.1", "--local-frontend", local])
    secret = "a secret prompt nobody else may read"
    with BrokerClient(sp.endpoint, timeout_s=30.0) as client:
        first = client.generate(prompt="a fox", model_base="tiny-sdxl", steps=2, width=256,
                                height=256, request_id="done-1")
        assert first.images
        outcomes = {}

        def send(rid, steps, priority):
            with BrokerClient(sp.endpoint, timeout_s=30.0) as own:
                outcomes[rid] = own.generate(prompt=secret, model_base="tiny-sdxl", steps=steps,
                                             width=256, height=256, request_id=rid,
                                             priority=priority, raise_on_error=False).reply
        threads = [threading.Thread(target=send, args=args, daemon=True)
                   for args in (("long-1", 150, "normal"), ("pre-1", 2, "low"),
                                ("q-low", 2, "low"), ("q-high", 2, "high"))]
        threads[0].start()
        assert wait_for(lambda: [j["stage"] for j in client.list_queue()["jobs"]] == ["denoising"])
        threads[1].start()   # a worker holds one running job and one prefetched
        assert wait_for(lambda: client.list_queue()["running"] == 2)
        threads[2].start()
        assert wait_for(lambda: client.list_queue()["queued"] == 1)
        threads[3].start()
        assert wait_for(lambda: client.list_queue()["queued"] == 2)
        queue_reply = client.request({"message_type": "list_queue"})
        _validate(queue_reply, "reply.list_queue")
        listed = queue_reply["data"]["jobs"]
        assert [j["request_id"] for j in listed] == ["long-1", "pre-1", "q-high", "q-low"]
        assert [j["state"] for j in listed] == ["running", "running", "queued", "queued"]
        assert [j["worker_id"] for j in listed] == ["sim-0", "sim-0", None, None]
        assert listed[0]["stage"] == "denoising" and listed[1]["stage"] == "dispatched"
        assert [j["position"] for j in listed] == [None, None, 0, 1]
        assert [j["priority"] for j in listed] == ["normal", "low", "high", "low"]
        assert all(j["age_s"] >= 0 for j in listed)
        assert secret not in json.dumps(queue_reply)
        # the running job's step as its worker reported it; queued ones have none
        assert listed[0]["total_steps"] == 150 and 1 <= listed[0]["step"] <= 150
        assert [(j["step"], j["total_steps"]) for j in listed[2:]] == [(0, 0), (0, 0)]
        # another client asking for the prompts gets none of them: they are their owners'
        asked = client.request({"message_type": "list_queue", "data": {"include_prompts": True}})
        assert [j.get("prompt") for j in asked["data"]["jobs"]] == [None] * 4
        assert secret not in json.dumps(asked)
        # an operator's dashboard on the local frontend gets them
        with BrokerClient(local, timeout_s=30.0) as operator:
            with_prompts = operator.request({"message_type": "list_queue",
                                             "data": {"include_prompts": True}})
        _validate(with_prompts, "reply.list_queue")
        assert [j["prompt"] for j in with_prompts["data"]["jobs"]] == [secret] * 4
        assert wait_for(lambda: client.list_queue()["jobs"][0]["step"] > listed[0]["step"])

        table = cli("queue", "--endpoint", sp.endpoint, timeout_s=60)
        assert table.returncode == 0 and "2 running, 2 queued" in table.stdout, table.stdout
        assert "q-high" in table.stdout and secret not in table.stdout
        table = cli("queue", "--endpoint", local, "--prompts", timeout_s=60)
        assert table.returncode == 0 and "secret" in table.stdout and "prompt" in table.stdout, table.stdout
        with BrokerClient(local, timeout_s=30.0) as operator:
            operator.cancel("long-1")
        for thread in threads:
            thread.join(30)
        history_reply = client.request({"message_type": "list_history", "data": {"limit": 10}})
    _validate(history_reply, "reply.list_history")
    history = history_reply["data"]["jobs"]
    finished_at = [j["finished_at"] for j in history]
    assert finished_at == sorted(finished_at, reverse=True)          # newest first
    by_id = {j["request_id"]: j for j in history}
    assert set(by_id) == {"done-1", "long-1", "pre-1", "q-high", "q-low"}
    assert by_id["long-1"]["outcome"] == "cancelled" and by_id["long-1"]["error_code"] == "cancelled"
    assert by_id["done-1"]["outcome"] == "completed" and by_id["done-1"]["worker_id"] == "sim-0"
    assert by_id["done-1"]["images"] == [i.path for i in first.images if i.path]  # sim: none saved
    assert by_id["done-1"]["total_time"] >= by_id["done-1"]["inference_time"] > 0
    assert secret not in json.dumps(history_reply)

    table = cli("history", "--endpoint", sp.endpoint, "--limit", "2", timeout_s=60)
    assert table.returncode == 0 and "2 recent job(s)" in table.stdout, table.stdout
    assert "done-1" not in table.stdout                      # only the two newest
    bad = cli("history", "--endpoint", sp.endpoint, "--limit", "0", timeout_s=60)
    assert bad.returncode == 1 and "data.limit" in bad.stderr
