"""One decider for a request's id (protocol.request_ids), shared by the broker and the client,
and cheap to import: no pydantic behind it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clients.client import _ensure_request_id, _request_id_of
from protocol import constants as C
from protocol.parse import parse_request, peek
from protocol.request_ids import request_id_of

ROOT = Path(__file__).resolve().parents[2]

BODIES = [
    {"action": "generate", "session_id": "s", "request_id": "r"},
    {"action": "generate", "request_id": "r"},
    {"action": "generate", "session_id": "", "request_id": "r"},
    {"message_type": C.GENERATE_FLAT, "session_id": "s", "request_id": "r"},
    {"message_type": C.GENERATE_FLAT, "session_id": "s"},
    {"message_type": C.GENERATE_NESTED, "data": {"metadata": {"request_id": "m"}}},
    {"message_type": C.GENERATE_NESTED, "request_id": "r", "data": {"metadata": {"request_id": "m"}}},
    {"message_type": C.STATUS, "request_id": 7},
    {"message_type": C.STATUS, "request_id": True, "session_id": "s"},
    {"message_type": C.STATUS},
]


@pytest.mark.parametrize("body", BODIES)
def test_client_and_broker_decide_the_same_id(body):
    assert _request_id_of(body) == peek(body)[1] == request_id_of(body)


def test_the_broker_answers_the_id_the_client_waits_for():
    body = {"action": "generate", "session_id": "s", "request_id": "r", "prompt_submission": {
        "model": {"base": "m"}, "conditioning": {"prompt": "p"}}}
    assert parse_request(body).request_id == _request_id_of(_ensure_request_id(body)) == "s"
    fresh = _ensure_request_id({"action": "generate", "prompt_submission": body["prompt_submission"]})
    assert parse_request(fresh).request_id == _request_id_of(fresh)


def test_the_decider_imports_no_pydantic():
    probe = "import sys, protocol.request_ids; print('pydantic' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
