"""The C# client (clients/csharp) built with the .NET SDK and run against a real `serve`.
Skips, saying why, where no `dotnet` is installed (Debian has no package for it; CI machines
with the SDK run it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.serve.conftest import ROOT

pytestmark = pytest.mark.slow
PROJECT = Path(ROOT) / "clients" / "csharp" / "SdxlBroker"


@pytest.fixture(scope="module")
def dotnet() -> str:
    found = shutil.which("dotnet")
    if found is None:
        pytest.skip("the .NET SDK (dotnet) is not installed here; the C# client is not built")
    return found


def test_csharp_client_generates_with_progress_against_serve(dotnet, start_serve, tmp_path):
    build = subprocess.run([dotnet, "build", str(PROJECT), "-o", str(tmp_path / "bin")],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    sp = start_serve(["--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
                      "--sim-workers", "1", "--sim-step-s", "0.05"])
    run = subprocess.run([dotnet, str(tmp_path / "bin" / "SdxlBroker.dll"), sp.endpoint, "a fox"],
                         capture_output=True, text=True, timeout=120, env={**os.environ})
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"^request \w+ -> ", run.stdout, re.M)
    assert "denoising 4/4" in run.stdout and re.search(r"^image 0: \S+ seed=42", run.stdout, re.M)

    nothing = subprocess.run([dotnet, str(tmp_path / "bin" / "SdxlBroker.dll"), "tcp://127.0.0.1:1"],
                             capture_output=True, text=True, timeout=60)
    assert nothing.returncode == 2 and "no answer from tcp://127.0.0.1:1" in nothing.stderr
