"""The `cluster` fixture for broker tests (harness in broker_harness.py)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from broker_harness import Cluster


@pytest.fixture
def cluster():
    tmp = tempfile.mkdtemp(prefix="brk")  # short: ipc paths are limited to ~100 bytes
    c = Cluster(tmp)
    try:
        yield c
    finally:
        c.close()
        if not os.environ.get("BROKER_TEST_KEEP_LOGS"):  # set it to read the processes' logs
            shutil.rmtree(tmp, ignore_errors=True)
