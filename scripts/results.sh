#!/usr/bin/env bash
# Reproduces every figure in the README's Results section (2-core CPU: about 1.5 hours for the 112² runs when
# those figures were made, plus ~20 min per dataset for the 224² embeddings; later runs reuse the cached stores).
# Usage: scripts/results.sh [OUT_DIR]   (default runs/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs}
dn2() { .venv/bin/dn2 "$@"; }
R=112  # input resolution of the ablation runs (see the resolution rows)

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
  dn2 eval --mode unsupervised --contamination $r --full --input-size $R --out $OUT/unsup-r$r
done

# Group anomaly detection: sets of 3 images, group DN2 vs the pointwise baseline.
dn2 eval --mode group --group-size 3 --train-groups 1000 --test-groups 1000 --full --input-size $R --out $OUT/group-m3

# Ablations: k, and bank size per class.
for k in 1 2 5 10 50; do
  dn2 eval --full --input-size $R --k $k --out $OUT/ablation-k$k
done
for n in 10 100 1000; do
  dn2 eval --bank-size $n --test-size 10000 --input-size $R --out $OUT/ablation-bank$n
done

# Resolution: 224 (the backbone's preset) vs 112, on a subsample (200 train images per class, 2000 test).
for res in 224 112; do
  dn2 eval --bank-size 200 --test-size 2000 --input-size $res --out $OUT/res-$res
  dn2 eval --bank-size 200 --test-size 2000 --input-size $res --no-normalize --out $OUT/res-$res-raw
done
