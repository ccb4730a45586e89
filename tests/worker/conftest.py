"""Fixtures for the real executor's tests: one warm executor per module on the tiny kit."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def worker_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker")
    dirs = {name: root / name for name in ("outputs", "inputs")}
    for path in dirs.values():
        path.mkdir()
    return {name: str(path) for name, path in dirs.items()}


@pytest.fixture(scope="module")
def executor(demo_models_dir, worker_dirs):
    from gpu_worker.executor import DiffusersExecutor

    return DiffusersExecutor("cpu", models_dir=demo_models_dir, output_dir=worker_dirs["outputs"],
                             input_dir=worker_dirs["inputs"], worker_id="test-worker")


@pytest.fixture(scope="session")
def structured_image() -> bytes:
    """256x256 with edges (a white square) and a colour ramp: canny finds edges in it."""
    array = np.zeros((256, 256, 3), np.uint8)
    array[64:192, 64:192] = 255
    array[:, :, 1] = np.linspace(0, 255, 256, dtype=np.uint8)[None, :]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
