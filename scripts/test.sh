#!/usr/bin/env bash
# The README's test command: sets up .venv on a fresh machine, then runs the whole suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m pytest -q -p no:cacheprovider "$@"
