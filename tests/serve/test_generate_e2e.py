"""`sdxl-broker generate` end to end: serve with a real cpu worker (diffusers) on the tiny
local model kit, the people's CLI, a real image file on disk."""

import re
from pathlib import Path

import pytest
from PIL import Image

from tests.serve.conftest import cli, one_cpu_worker_argv

pytestmark = pytest.mark.slow


def test_generate_writes_an_image(start_serve, demo_models_dir, tmp_path):
    sp = start_serve(one_cpu_worker_argv(demo_models_dir, tmp_path / "images", tmp_path),
                     ready_timeout_s=180)
    out_dir = tmp_path / "here"
    done = cli("generate", "a red fox", "--model", "tiny-sdxl", "--steps", "2", "--size", "256x256",
               "--seed", "7", "--out", str(out_dir), "--endpoint", sp.endpoint, timeout_s=180)
    assert done.returncode == 0, done.stderr + sp.log()
    # stdout names the image written here; the worker's own copy is under --output-dir
    written = [Path(line.split()[0]) for line in done.stdout.splitlines() if line.strip()]
    assert len(written) == 1 and written[0].parent == out_dir, done.stdout
    with Image.open(written[0]) as image:
        assert image.size == (256, 256)
    assert list((tmp_path / "images").rglob(written[0].name)), "worker did not save its copy"
    assert re.search(r"seed 7\b", done.stdout)
    assert sp.stop() == 0
