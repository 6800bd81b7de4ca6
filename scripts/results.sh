#!/usr/bin/env bash
# Reproduces every figure in the README's Results section. 2-core CPU: embedding the full splits (70k images) took
# ~20 min per dataset at 224² (second session) and ~35 min at 112² (first session, before two speed-ups); every later
# run reuses the cached stores (the unsupervised, group and ablation runs at 224² took ~5 min together).
# Usage: scripts/results.sh [OUT_DIR]   (default runs/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs}
dn2() { .venv/bin/dn2 "$@"; }
R=112  # the second resolution of the one-class tables

# One-class, full splits, k = 2: EfficientNet-Lite0 at 224² (default) and 112², with L2-normalised (default)
# and raw features, and the raw-pixel baseline through the same kNN path.
for ds in fashion_mnist mnist; do
  dn2 eval --dataset $ds --full --out $OUT/$ds-lite0-224  # the default input size (the backbone's preset)
  dn2 eval --dataset $ds --full --no-normalize --out $OUT/$ds-lite0-224-raw
  dn2 eval --dataset $ds --full --input-size $R --out $OUT/$ds-lite0-$R
  dn2 eval --dataset $ds --full --input-size $R --no-normalize --out $OUT/$ds-lite0-$R-raw
  dn2 eval --dataset $ds --full --backbone pixels --no-normalize --out $OUT/$ds-pixels
done

# Unsupervised: contaminated banks, cleaning off and on (both in one results.json).
for r in 0 0.05 0.1 0.2; do
  dn2 eval --mode unsupervised --contamination $r --full --out $OUT/unsup-r$r
done

# Group anomaly detection: sets of 3 images, group DN2 vs the pointwise baseline.
dn2 eval --mode group --group-size 3 --train-groups 1000 --test-groups 1000 --out $OUT/group-m3

# Ablations: k, and bank size per class.
for k in 1 2 5 10 50; do
  dn2 eval --full --k $k --out $OUT/ablation-k$k
done
for n in 10 100 1000; do
  dn2 eval --bank-size $n --test-size 10000 --out $OUT/ablation-bank$n
done

# Resolution: 224 (the backbone's preset) vs 112, on a subsample (200 train images per class, 2000 test).
for res in 224 112; do
  dn2 eval --bank-size 200 --test-size 2000 --input-size $res --out $OUT/res-$res
  dn2 eval --bank-size 200 --test-size 2000 --input-size $res --no-normalize --out $OUT/res-$res-raw
done
