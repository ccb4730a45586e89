#!/usr/bin/env bash
# The main job on a fresh machine: set up the venv, build the tiny local models, start
# `sdxl-broker serve` with two CPU workers, generate one image each for txt2img, img2img,
# inpaint, LoRA, ControlNet and refiner (256x256, 4 steps), print paths and timings, stop all.
# Usage: scripts/demo.sh [OUT_DIR]   (default ./demo-out; FRONTEND/BACKEND may be overridden)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup_env.sh
source "$ROOT/scripts/setup_env.sh"

OUT="${1:-./demo-out}"
FRONTEND="${FRONTEND:-tcp://127.0.0.1:5555}"
BACKEND="${BACKEND:-tcp://127.0.0.1:5556}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

if [ ! -d "$OUT/models/tiny-sdxl" ]; then
  echo "[demo] building the tiny models into $OUT/models"
  sdxl-broker demo-models --out "$OUT/models"
fi

SERVE_LOG="$OUT/serve.log"
READY_FIFO="$(mktemp -u "${TMPDIR:-/tmp}/sdxl-demo-ready.XXXXXX")"
mkfifo "$READY_FIFO"
SERVE_PID=""
cleanup() {
  if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
    echo "[demo] stopping serve (pid $SERVE_PID)"
    kill -TERM "$SERVE_PID" 2>/dev/null || true
    wait "$SERVE_PID" 2>/dev/null || true
  fi
  rm -f "$READY_FIFO"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "[demo] starting serve with 2 cpu workers (log: $SERVE_LOG)"
sdxl-broker serve --cpu-workers 2 --frontend "$FRONTEND" --backend "$BACKEND" \
  --models-dir "$OUT/models" --output-dir "$OUT/images" --input-dir "$OUT/inputs" \
  --state-dir "$OUT/state" --ready-timeout-s 300 >"$READY_FIFO" 2>"$SERVE_LOG" &
SERVE_PID=$!

SECONDS=0
if ! read -r -t 300 ready endpoint <"$READY_FIFO" || [ "$ready" != "ready" ]; then
  echo "[demo] serve did not become ready; last log lines:" >&2
  tail -n 30 "$SERVE_LOG" >&2
  exit 1
fi
echo "[demo] ready at $endpoint after ${SECONDS}s"

python "$ROOT/scripts/demo.py" --endpoint "$endpoint" --size 256 --steps 4
echo "[demo] images are under $OUT/images"
