#!/usr/bin/env bash
# The whole fluxc chain on the built-in tiny FLUX.1 model, into one demo folder:
#   fluxc tiny -> fluxc export -> fluxc compile -> fluxc verify -> fluxc run
# Leaves DEMO/result.png (chip simulator), DEMO/result_onnx.png (float reference) and
# DEMO/verify_report.json. Re-running reuses the export and the compile cache.
# Usage: scripts/demo.sh [DEMO_DIR]   (default: demo)
set -euo pipefail

DEMO="${1:-demo}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${FLUXC:-}" ]]; then
  :
elif [[ -x "$HERE/.venv/bin/fluxc" ]]; then
  FLUXC="$HERE/.venv/bin/fluxc"
else
  FLUXC="$(command -v fluxc || true)"
fi
if [[ -z "$FLUXC" ]]; then
  echo "error: fluxc is not installed; run 'make setup' first" >&2
  exit 2
fi

FLUX_TYPE="${DEMO_FLUX_TYPE:-schnell}"
HEIGHT="${DEMO_HEIGHT:-64}"
WIDTH="${DEMO_WIDTH:-64}"
T5_LEN="${DEMO_T5_LEN:-32}"
STEPS="${DEMO_STEPS:-2}"
PROMPT="${DEMO_PROMPT:-a photo of an astronaut riding a horse on the moon}"
MODELS="$DEMO/models"

mkdir -p "$DEMO"
step() { printf '\n== %s\n' "$*"; }

step "1/5 tiny model ($FLUX_TYPE, random weights) -> $DEMO/tiny-$FLUX_TYPE"
if [[ -f "$DEMO/tiny-$FLUX_TYPE/model_index.json" ]]; then
  echo "reusing $DEMO/tiny-$FLUX_TYPE"
else
  "$FLUXC" tiny "$DEMO/tiny-$FLUX_TYPE" --flux-type "$FLUX_TYPE" --seed 0 --force
fi

step "2/5 export to ONNX pieces (${WIDTH}x${HEIGHT}, T5 length $T5_LEN, tiny VAE) -> $MODELS/onnx"
"$FLUXC" export "$DEMO/tiny-$FLUX_TYPE" --models "$MODELS" --height "$HEIGHT" --width "$WIDTH" \
  --t5-seq-len "$T5_LEN" --tiny-vae "$DEMO/tiny-$FLUX_TYPE/tiny_vae"

step "3/5 compile with TPU-MLIR (W4BF16 transformer) -> $MODELS/BM1684X"
"$FLUXC" compile --models "$MODELS" --quantize W4BF16 --flux-type "$FLUX_TYPE" --tiny-vae

step "4/5 verify on the chip simulator -> $DEMO/verify_report.json"
"$FLUXC" verify --models "$MODELS" --steps 1 --report "$DEMO/verify_report.json"

step "5/5 generate on the chip simulator ($STEPS steps) -> $DEMO/result.png"
"$FLUXC" run --models "$MODELS" --backend cmodel --prompt "$PROMPT" --steps "$STEPS" --seed 42 \
  --out "$DEMO/result.png"
"$FLUXC" run --models "$MODELS" --backend onnx --prompt "$PROMPT" --steps "$STEPS" --seed 42 \
  --out "$DEMO/result_onnx.png"

printf '\ndone: %s/result.png (simulator), %s/result_onnx.png (float reference), %s/verify_report.json\n' \
  "$DEMO" "$DEMO" "$DEMO"
