import subprocess
import sys


def test_console_script_lists_commands():
    out = subprocess.run([sys.executable, "-m", "broker.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "sdxl-broker" in out.stdout
