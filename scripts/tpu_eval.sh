#!/usr/bin/env bash
# DN2 on a Cloud TPU VM or pod slice. Run the same command on every worker, e.g. from your workstation:
#   gcloud compute tpus tpu-vm scp --recurse dn2-jax "$TPU": --zone "$ZONE" --worker=all
#   gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all \
#       --command "cd dn2-jax && scripts/tpu_eval.sh runs/tpu"
# jax.distributed.initialize() needs no arguments
# on Cloud TPU: coordinator, process count and index are read from the TPU metadata.
# Env: DATASETS (default "fashion_mnist mnist"), DATA_DIR, BACKBONE, BATCH (per host).
# Results (worker 0): OUT_DIR/<dataset>-exact/results.json (exact kNN, bank sharded over every TPU core).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/tpu}}
DATASETS=${DATASETS:-"fashion_mnist mnist"}
BACKBONE=${BACKBONE:-efficientnet_lite0}
BATCH=${BATCH:-1024}
DATA_ARGS=()
[ -n "${DATA_DIR:-}" ] && DATA_ARGS=(--data-dir "$DATA_DIR")

scripts/setup
JAX_VERSION=$(.venv/bin/python -c "import jax; print(jax.__version__)")
.venv/bin/python -m pip install -q "jax[tpu]==$JAX_VERSION"
mkdir -p "$OUT_DIR"

# Several hosts: every worker runs the same `dn2 eval`; jax.distributed is detected from the TPU environment.
for ds in $DATASETS; do
  .venv/bin/dn2 eval --dataset "$ds" "${DATA_ARGS[@]}" --full --backbone "$BACKBONE" \
    --batch-size "$BATCH" --out "$OUT_DIR/$ds-exact"
done
echo "results under $OUT_DIR (worker 0)"
