#!/usr/bin/env bash
# The whole chain on the real data in ../shared/data, at CPU scale (about 10 minutes on 2 cores):
#   Delft LiDAR + BGT footprints -> tiles; masked pretraining (configs/dem_pretrain.py:cpu)
#   streamed from a TFRecord corpus of the shared SRTM, LiDAR and DSMs built on first use, which
#   drops every tile touching an evaluation split's val/test blocks (Delft's test area among them),
#   its reconstructions as pictures; the recommended segmentation model (UNet on height above
#   ground, docs/results_product.md) trained on Delft buildings; evaluation on the spatially
#   separate test area, per tile and over the area as the predictor maps it; prediction over the
#   Delft nDSM to a GeoTIFF, polygons and a PNG.
# Every run writes to a new folder (runs/demo/<UTC time>), so nothing earlier is overwritten.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
OUT=${DEMO_OUT:-runs/demo/$(date -u +%Y%m%dT%H%M%SZ)}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-400}
FINETUNE_STEPS=${FINETUNE_STEPS:-200}
if [ -e "$OUT" ]; then echo "demo: $OUT exists; choose another DEMO_OUT" >&2; exit 2; fi
mkdir -p "$OUT"
step() { printf '\n=== [%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

step "1/6 Delft LiDAR + BGT buildings -> 0.5 m rasters and 64 px tiles"
$PY scripts/prepare_data.py delft --out "$OUT/data" --task buildings

step "2/6 masked pretraining on a corpus of the shared elevation, $PRETRAIN_STEPS steps; held out:
  every evaluation split's val/test blocks (Delft's test area of step 5 included; Delft's training
  blocks are pretrained on) and the IGN La Rochelle tile (the held-out loss)"
$PY scripts/pretrain.py --config configs/dem_pretrain.py:cpu --workdir "$OUT/pretrain" \
  --config.total_steps="$PRETRAIN_STEPS" --config.optim.warmup_steps=40 \
  --config.log.picture_every_steps=200

step "3/6 export the encoder"
$PY scripts/export_encoder.py --workdir "$OUT/pretrain" --out "$OUT/dem_mae"

step "4/6 train the recommended model (UNet, nDSM input) on Delft buildings, $FINETUNE_STEPS steps"
# (the paper's arm, UperNet on the frozen encoder of step 3, is --config configs/finetune.py:cpu_buildings
#  --config.init="$OUT/dem_mae"; scripts/run_experiments.py compares them)
$PY scripts/finetune.py --config configs/finetune.py:cpu_unet_buildings --workdir "$OUT/buildings" \
  --config.data.normalisation.mode=ndsm \
  --config.data.manifest="$OUT/data/buildings/tiles/manifest.json" --config.total_steps="$FINETUNE_STEPS"

step "5/6 evaluate on the held-out test area"
$PY scripts/evaluate.py --workdir "$OUT/buildings" --split test --out "$OUT/eval_test"

step "6/6 predict over the whole Delft nDSM (256 px windows, 8-symmetry TTA)"
$PY scripts/predict.py --workdir "$OUT/buildings" --input "$OUT/data/buildings/rasters/ndsm.tif" \
  --output "$OUT/prediction/buildings.tif" --polygons "$OUT/prediction/buildings.gpkg" \
  --png "$OUT/prediction/buildings.png" --window 256 --tta

step "done: outputs in $OUT"
cat <<EOF
  tiles + manifest         $OUT/data/buildings/tiles/manifest.json
  pretraining (metrics, reconstructions)  $OUT/pretrain/{metrics.jsonl,pictures/}
  encoder export           $OUT/dem_mae
  finetuning               $OUT/buildings
  test metrics             $OUT/eval_test/metrics.md
  prediction (GeoTIFF for QGIS, polygons, preview)  $OUT/prediction/
EOF
cat "$OUT/eval_test/metrics.md" 2>/dev/null || true
