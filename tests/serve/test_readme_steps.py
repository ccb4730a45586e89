"""The README's CURVE and translate steps, run as pasted (in a fresh directory). Only the
endpoints come from the environment (SDXL_BROKER_FRONTEND / _BACKEND for serve,
SDXL_BROKER_ENDPOINT for the client), so the test never takes the default ports; the workers are
simulated (SDXL_BROKER_SIM_WORKERS=1), which CURVE does not care about."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from tests.serve.conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def _section_commands(heading: str) -> list[str]:
    """The command lines of the first bash block after `## heading` (comments dropped)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    section = text[text.index(f"## {heading}\n"):]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    lines, pending = [], ""
    for raw in block.splitlines():
        line = pending + raw.rstrip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        command = re.sub(r"\s+#[^'\"]*$", "", line).strip()
        if command:
            lines.append(command)
    return lines


def _env(**extra) -> dict:
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, **extra}


def _bash(command: str, cwd, env, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout_s)


def test_readme_translate_step_works_as_pasted(tmp_path):
    commands = [c for c in _section_commands("Using it") if "request.json" in c]
    assert len(commands) == 2 and commands[0].startswith("echo ")
    for command in commands:
        done = _bash(command, tmp_path, _env())
        assert done.returncode == 0, done.stderr
    assert '"prompt_submission"' in done.stdout and '"base": "tiny-sdxl"' in done.stdout


def test_readme_curve_steps_work_as_pasted(tmp_path):
    keys, allow, serve, status = _section_commands("CURVE")
    frontend = f"tcp://127.0.0.1:{free_port()}"
    env = _env(SDXL_BROKER_FRONTEND=frontend, SDXL_BROKER_BACKEND=f"tcp://127.0.0.1:{free_port()}",
               SDXL_BROKER_ENDPOINT=frontend, SDXL_BROKER_SIM_WORKERS="1")
    for command in (keys, allow):
        done = _bash(command, tmp_path, env)
        assert done.returncode == 0, done.stderr
    assert os.path.isfile(tmp_path / "keys" / "allowed" / "client.key")

    proc = subprocess.Popen(["bash", "-c", f"exec {serve}"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    ready = threading.Event()
    threading.Thread(target=lambda: [ready.set() for line in proc.stdout if line.startswith("ready ")],
                     daemon=True).start()
    try:
        assert ready.wait(120), proc.stderr.read() if proc.poll() is not None else "no ready line"
        shown = _bash(status, tmp_path, env)
        assert shown.returncode == 0, shown.stderr
        assert "sim-0" in shown.stdout
        # the same status without the client's keys is refused with a hint, not served
        plain = _bash("sdxl-broker status --connect-timeout-s 2", tmp_path, env)
        assert plain.returncode != 0 and "sim-0" not in plain.stdout
        assert "CURVE" in plain.stderr, plain.stderr
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
