"""A real rig for the gateway's tests: `sdxl-broker serve --http` with a real cpu worker on the
tiny kit (or simulated workers where only the HTTP surface matters), started once per session."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import requests

from tests.serve.conftest import ServeProcess, free_port


@dataclass
class Rig:
    serve: ServeProcess
    url: str            # http://127.0.0.1:PORT
    endpoint: str       # the broker frontend
    output_dir: str
    token: str | None = None

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def start_rig(tmp_path, argv: list[str], *, token: str | None = None,
              ready_timeout_s: float = 240.0) -> Rig:
    port = free_port()
    output_dir = tmp_path / "outputs"
    serve = ServeProcess(["--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
                          "--output-dir", str(output_dir), "--input-dir", str(tmp_path),
                          "--http", f"127.0.0.1:{port}", "--default-model-base", "tiny-sdxl", *argv,
                          *(["--http-token", token] if token else [])],
                         ready_timeout_s=ready_timeout_s)
    rig = Rig(serve=serve, url=f"http://127.0.0.1:{port}", endpoint=serve.endpoint,
              output_dir=str(output_dir), token=token)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # serve printed ready once the port accepted
        try:
            if requests.get(rig.url + "/v1/status", headers=rig.headers(), timeout=5).ok:
                return rig
        except requests.RequestException:
            pass
        time.sleep(0.2)
    serve.kill()
    raise AssertionError("the gateway did not answer /v1/status:\n" + serve.log())


@pytest.fixture(scope="session")
def real_rig(demo_models_dir, tmp_path_factory):
    """serve --http with one real cpu worker (diffusers) on the tiny kit."""
    rig = start_rig(tmp_path_factory.mktemp("rig"),
                    ["--cpu-workers", "1", "--models-dir", demo_models_dir])
    yield rig
    rig.serve.kill()


@pytest.fixture(scope="session")
def sim_rig(tmp_path_factory):
    """serve --http with two simulated workers (no diffusers: fast, for the HTTP surface)."""
    rig = start_rig(tmp_path_factory.mktemp("sim-rig"),
                    ["--sim-workers", "2", "--sim-step-s", "0.01", "--sim-load-s", "0.05"])
    yield rig
    rig.serve.kill()
