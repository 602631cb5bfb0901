"""Scoring over a test area (`demmae_jax.area_eval`) and the predictor's options it relies on:
test-time augmentation is exactly equivariant, windows larger than the tile only for the UNet,
and the test-area mask is the tile set's test blocks."""

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from demmae_jax.inference import apply, segmenter
from demmae_jax.models import unet


def test_tta_probabilities_are_equivariant_to_the_square_symmetries():
  model = unet.UNet(unet.UNetConfig(width=4, depth=2), rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32)
  plain, tta = apply.probabilities_fn(model), apply.probabilities_fn(model, tta=True)
  rotated = np.ascontiguousarray(np.rot90(x, 1, axes=(1, 2)))
  np.testing.assert_allclose(
    np.asarray(tta(rotated)), np.rot90(np.asarray(tta(x)), 1, axes=(1, 2)), atol=1e-6
  )
  # without TTA the network is not equivariant: the property is not trivially true
  assert (
    np.abs(np.asarray(plain(rotated)) - np.rot90(np.asarray(plain(x)), 1, axes=(1, 2))).max() > 1e-4
  )
  np.testing.assert_allclose(np.asarray(tta(x)).sum(-1), 1.0, atol=1e-5)


def test_prediction_windows_larger_than_the_tile_only_for_fully_convolutional_models():
  u = {"kind": "unet", "unet": {"depth": 4}, "tile_size": 64, "normalisation": {"mode": "ndsm"}}
  segmenter.check_window(u, 256)
  with pytest.raises(ValueError, match="windows of that size"):  # min-max would rescale heights
    segmenter.check_window({**u, "normalisation": {"mode": "minmax"}}, 256)
  segmenter.check_window({**u, "normalisation": {"mode": "minmax"}}, 64)
  with pytest.raises(ValueError, match="multiples of 16"):
    segmenter.check_window(u, 100)
  vit = {"kind": "upernet", "tile_size": 64, "normalisation": {"mode": "ndsm"}}
  segmenter.check_window(vit, 64)
  with pytest.raises(ValueError, match="tile size"):
    segmenter.check_window(vit, 128)


@pytest.mark.realdata
@pytest.mark.slow
def test_area_score_counts_the_test_blocks_and_matches_a_direct_count(tmp_path):
  import rasterio

  from data_pipelines.prepare import prepare_delft
  from data_pipelines.reader import make_tf_dataset, read_manifest
  from demmae_jax import area_eval, config_files
  from demmae_jax.train import finetune

  manifest_path = prepare_delft(
    tmp_path / "d", "buildings", tile_size=32, stride=16, progress=False
  )
  m = read_manifest(str(manifest_path))
  with rasterio.open(tmp_path / "d" / "rasters" / "ndsm.tif") as src:
    shape = src.shape
  test = area_eval.test_area_mask(m, shape)
  # every test tile lies inside the mask, no training tile touches it
  for split, inside in (("test", True), ("train", False)):
    ds = make_tf_dataset(
      str(manifest_path),
      split,
      global_batch_size=64,
      with_meta=True,
      process_index=0,
      process_count=1,
      repeat=False,
      shuffle=False,
      augment=False,
      drop_remainder=False,
    )
    for b in ds.as_numpy_iterator():
      for c, r, w, h in b["window"]:
        assert test[r : r + h, c : c + w].all() if inside else not test[r : r + h, c : c + w].any()
  config = config_files.get_config(
    "finetune",
    "tiny_unet",
    **{
      "data.manifest": str(manifest_path),
      "total_steps": 20,
      "eval_every_steps": 10,
      "checkpoint.every_steps": 10,
      "log.progress": False,
      "log.tensorboard": False,
      "data.normalisation.mode": "ndsm",
    },
  )
  finetune.run(config, tmp_path / "wd")
  out = tmp_path / "pred.tif"
  got = area_eval.evaluate_area(tmp_path / "wd", manifest_path, window=128, keep_prediction=out)
  with rasterio.open(out) as src:
    pred = src.read(1)
    assert src.crs is not None and src.shape == shape
  with rasterio.open(tmp_path / "d" / "labels" / "buildings.tif") as src:
    label = src.read(1)
  with rasterio.open(tmp_path / "d" / "rasters" / "valid.tif") as src:
    valid = src.read(1) > 0
  keep = test & valid & (label != 255) & (pred != 255)
  tp = np.sum(keep & (pred == 1) & (label == 1))
  union = np.sum(keep & ((pred == 1) | (label == 1)))
  assert got["pixels"] == keep.sum() > 0
  assert got["iou"] == pytest.approx(tp / union)
  assert 0 <= got["boundary_iou"] <= 1
  json.dumps(got)  # serialisable for the study's result files
  # another input on the same grid (here: every height doubled) is predicted instead, and scored
  # on the same labelled pixels
  with rasterio.open(tmp_path / "d" / "rasters" / "ndsm.tif") as src:
    profile, ndsm = src.profile, src.read(1)
  with rasterio.open(tmp_path / "taller.tif", "w", **profile) as dst:
    dst.write(ndsm * 2, 1)
  other = area_eval.evaluate_area(
    tmp_path / "wd", manifest_path, window=128, raster=tmp_path / "taller.tif"
  )
  assert other["pixels"] == got["pixels"] and other["confusion_matrix"] != got["confusion_matrix"]
  _predict_script_reads_height_above_ground(tmp_path, tmp_path / "wd", tmp_path / "d" / "rasters")


def _predict_script_reads_height_above_ground(tmp_path, workdir, rasters):
  """The nDSM model of the test above through scripts/predict.py: a DSM with --dtm is predicted
  as DSM - DTM, exactly as the nDSM; a DSM of a city 40 m above its datum without one is refused
  before the model loads."""
  import subprocess
  import sys

  import rasterio

  root = Path(__file__).resolve().parent.parent
  with rasterio.open(rasters / "dsm.tif") as src:
    profile, dsm = src.profile, src.read(1)
  with rasterio.open(tmp_path / "dsm40.tif", "w", **profile) as dst:
    dst.write(dsm + 40, 1)
  base = [
    sys.executable,
    str(root / "scripts" / "predict.py"),
    f"--workdir={workdir}",
    "--window=128",
  ]
  run = lambda *a: subprocess.run(base + list(a), capture_output=True, text=True, cwd=root)  # noqa: E731
  refused = run(f"--input={tmp_path / 'dsm40.tif'}", f"--output={tmp_path / 'no.tif'}")
  assert (
    refused.returncode == 2
    and "dsm40.tif" in refused.stderr
    and "not height above ground" in refused.stderr
  )
  assert not (tmp_path / "no.tif").exists()
  outs = {}
  for name, args in (
    ("ndsm", [f"--input={rasters / 'ndsm.tif'}"]),
    ("dsm_dtm", [f"--input={rasters / 'dsm.tif'}", f"--dtm={rasters / 'dtm.tif'}"]),
  ):
    done = run(*args, f"--output={tmp_path / name}.tif")
    assert done.returncode == 0, done.stderr[-2000:]
    with rasterio.open(tmp_path / f"{name}.tif") as src:
      outs[name] = src.read(1)
  np.testing.assert_array_equal(outs["ndsm"], outs["dsm_dtm"])
  assert (outs["ndsm"] == 1).mean() > 0.05
