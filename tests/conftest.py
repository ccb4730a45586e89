"""Fixtures shared by every area's tests."""

from __future__ import annotations

import os

import pytest

# No model hub is reachable here; make any accidental hub lookup fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_models_dir(tmp_path_factory) -> str:
    """The tiny SDXL kit (CONTRACT.md names), built once per test session into a temp dir.

    Takes a few seconds the first time (imports diffusers into the test process). Read-only by
    convention: copy what you need to change."""
    from gpu_worker.demo_models import build_demo_models

    out_dir = tmp_path_factory.mktemp("demo-models")
    build_demo_models(str(out_dir))
    return str(out_dir)
