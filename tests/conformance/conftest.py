"""One `sdxl-broker serve` with a real CPU worker on the tiny kit, shared by the conformance
tests (starting one costs ~20 s of CPU), plus the input images they send as paths."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import ServeProcess, one_cpu_worker_argv

SIZE = 256


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def photo() -> np.ndarray:
    """A colour picture with edges in it (a bright square on a ramp): canny finds edges."""
    array = np.zeros((SIZE, SIZE, 3), np.uint8)
    array[:, :, 1] = np.linspace(0, 255, SIZE, dtype=np.uint8)[None, :]
    array[64:192, 64:192] = (250, 200, 40)
    return array


def edge_map() -> np.ndarray:
    """What a client's own canny preprocessor sends: thin white lines on black."""
    array = np.zeros((SIZE, SIZE, 3), np.uint8)
    array[64, 64:192] = array[191, 64:192] = 255
    array[64:192, 64] = array[64:192, 191] = 255
    return array


def depth_map() -> np.ndarray:
    """A ready depth map: a grey ramp, near = bright."""
    ramp = np.linspace(30, 220, SIZE, dtype=np.uint8)[:, None].repeat(SIZE, axis=1)
    return np.stack([ramp] * 3, axis=-1)


def mask() -> np.ndarray:
    array = np.zeros((SIZE, SIZE), np.uint8)
    array[96:160, 96:160] = 255
    return array


INPUTS = {"photo.png": photo, "edges.png": edge_map, "depth.png": depth_map, "mask.png": mask}


@pytest.fixture(scope="session")
def conformance_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance")
    (root / "inputs").mkdir()
    (root / "outputs").mkdir()
    for name, make in INPUTS.items():
        (root / "inputs" / name).write_bytes(png_bytes(make()))
    return root


@pytest.fixture(scope="session")
def serve(demo_models_dir, conformance_dirs):
    sp = ServeProcess(one_cpu_worker_argv(demo_models_dir, conformance_dirs / "outputs",
                                          conformance_dirs / "inputs"), ready_timeout_s=180)
    yield sp
    sp.kill()


@pytest.fixture(scope="session")
def client(serve):
    from clients.client import BrokerClient

    with BrokerClient(serve.endpoint, timeout_s=300) as c:
        yield c


def image_bytes(entry: dict) -> bytes:
    """The encoded image of one generated_images entry (base64 in JSON replies)."""
    data = entry["image"]
    return data if isinstance(data, bytes) else base64.b64decode(data)


def pixels(entry: dict) -> np.ndarray:
    with Image.open(io.BytesIO(image_bytes(entry))) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)
