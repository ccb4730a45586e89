#!/usr/bin/env bash
# Create or reuse .venv and install the project into it. Sourced by demo.sh and test.sh.
# torch goes first, pinned, so pip takes the CPU wheel instead of a multi-GB CUDA build;
# GPU users set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0 --index-url <their CUDA index>").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
# constraints.txt pins every dependency to the versions the suite passed with, so every fresh
# machine installs the same stack. UPGRADE=1 leaves it out: the newest versions pyproject.toml's
# bounds allow (docs/dependencies.md says how to upgrade on purpose).
CONSTRAINTS=(-c "$ROOT/constraints.txt")
if [ "${UPGRADE:-0}" = 1 ]; then CONSTRAINTS=(); fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  "${PIP[@]}" install "${CONSTRAINTS[@]}" $TORCH_SPEC
fi
# Reinstall the project only when its metadata changed (keeps test.sh fast on a warm venv).
STAMP="$VENV/.sdxl-broker-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] || [ "$ROOT/constraints.txt" -nt "$STAMP" ] \
   || [ "${UPGRADE:-0}" = 1 ]; then
  echo "[setup] installing sdxl-broker and its dependencies"
  "${PIP[@]}" install "${CONSTRAINTS[@]}" -e "$ROOT[test]"
  # Without their declared torchvision (PyPI's Linux torchvision is a CUDA build that breaks
  # the CPU torch wheel): spandrel runs the upscalers (gpu_worker/upscalers.py says why this is
  # safe); GPU installs with a matching torchvision can use the [upscale] extra instead.
  "${PIP[@]}" install --no-deps "${CONSTRAINTS[@]}" "spandrel>=0.4,<0.5"
  # Only its CLIP vocabulary file is read (gpu_worker/clip_vocab.py), never imported: the
  # tokenizers of single-file SDXL checkpoints and of the tiny kit
  "${PIP[@]}" install --no-deps "${CONSTRAINTS[@]}" "open-clip-torch>=3,<4"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
