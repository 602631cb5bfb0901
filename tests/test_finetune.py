"""Finetuning through the shared training loop on real Delft tiles (delft/ahn3_cropped_{1,2}.laz
rasterised at 0.5 m, BGT buildings from delft/bgt_pand.sqlite, via data_pipelines.prepare_delft):
the frozen encoder keeps its pretrained weights bit for bit and has no optimiser state, the head
learns, the run resumes, and evaluation and loading refuse a model of another class count."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from demmae_jax import api
from demmae_jax.inference import segmenter
from demmae_jax.inference.restore import load_trained
from demmae_jax.sharding import path_str
from demmae_jax.train import finetune

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def tiny_config(manifest, init="", **overrides):
  from demmae_jax import config_files

  return config_files.get_config(
    "finetune",
    "tiny",
    **{
      "data.manifest": str(manifest),
      "init": init,
      "total_steps": 48,
      "eval_every_steps": 24,
      "checkpoint.every_steps": 24,
      "log.progress": False,
      "log.tensorboard": False,
      **overrides,
    },
  )


@pytest.fixture(scope="module")
def delft_tiles(tmp_path_factory):
  from data_pipelines.prepare import prepare_delft

  out = tmp_path_factory.mktemp("delft") / "buildings"
  return prepare_delft(out, "buildings", tile_size=32, stride=16, progress=False)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A tiny 1-channel MAE saved as our checkpoint format (stands in for a pretraining export)."""
  model = api.build("tiny", in_chans=1, img_size=32, seed=7)
  return api.save_model(model, tmp_path_factory.mktemp("mae") / "tiny_mae"), model


@pytest.fixture(scope="module")
def trained(delft_tiles, pretrained, tmp_path_factory):
  """Trained in two calls (stopped after 24 steps, then resumed to 48), as after a preemption."""
  workdir = tmp_path_factory.mktemp("runs") / "tiny"
  config = tiny_config(delft_tiles, init=str(pretrained[0]))
  first = finetune.run(config, workdir, stop_after=24)
  second = finetune.run(config, workdir)
  return workdir, first, second


def test_run_resumes_and_keeps_best_validation_checkpoint(trained):
  workdir, first, second = trained
  assert first.step == 24 and second.step == 48
  assert second.history[0]["step"] > 24  # the second call started where the first stopped
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if "eval_iou" in r]
  assert [r["step"] for r in evals] == [24, 48]
  model, spec, step = load_trained(workdir)
  assert step == max(evals, key=lambda r: r["eval_iou"])["step"]
  assert spec["class_names"] == ["background", "building"] and spec["tile_size"] == 32


def test_head_learns_on_real_tiles(trained):
  workdir, _, _ = trained
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["main_loss"] for r in rows if "main_loss" in r]
  assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:2]), losses


def test_frozen_backbone_is_untouched_and_has_no_optimizer_state(trained, pretrained):
  import orbax.checkpoint as ocp

  workdir, _, _ = trained
  saved = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "48" / "state")
  opt_paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(saved["opt_state"])[0]]
  assert opt_paths and not any("backbone" in p for p in opt_paths)
  assert "backbone" not in saved["params"] and "backbone" in saved["rest"]
  # every encoder parameter equals the pretrained checkpoint's, bit for bit
  want = nnx.to_pure_dict(nnx.state(pretrained[1], nnx.Param))
  got = saved["rest"]["backbone"]
  for path, w in jax.tree_util.tree_flatten_with_path(want)[0]:
    p = path_str(path)
    if p.startswith(("decoder", "mask_token")):  # loaded encoder-only: the decoder is not used
      continue
    g = got
    for part in p.split("/"):
      g = g[int(part) if part.isdigit() and not isinstance(g, dict) else part]
    np.testing.assert_array_equal(
      np.asarray(g.get("value", g) if isinstance(g, dict) else g), w, err_msg=p
    )


def test_checkpoint_of_another_class_count_is_refused(trained, tmp_path):
  workdir, _, _ = trained
  other = tmp_path / "other"
  shutil.copytree(workdir, other)
  spec = json.loads((other / "segmenter.json").read_text())
  spec["num_classes"], spec["class_names"] = 3, ["background", "building", "road"]
  spec["head"]["num_classes"] = 3
  (other / "segmenter.json").write_text(json.dumps(spec))
  with pytest.raises(
    ValueError,
    match=r"(?s)does not fit the model.*3 classes.*decode_head/cls/kernel: "
    r"checkpoint \(1, 1, 32, 2\) vs model \(1, 1, 32, 3\)",
  ):
    load_trained(other)


def test_evaluate_script_writes_metrics_and_pictures(trained, tmp_path):
  workdir, _, _ = trained
  out = tmp_path / "eval"
  cmd = [
    sys.executable,
    str(ROOT / "scripts" / "evaluate.py"),
    f"--workdir={workdir}",
    "--split=test",
    "--pictures=3",
    f"--out={out}",
  ]
  done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-2000:]
  m = json.loads((out / "metrics.json").read_text())
  cm = np.array(m["confusion_matrix"])
  assert m["iou"] == pytest.approx(cm[1, 1] / (cm[1].sum() + cm[:, 1].sum() - cm[1, 1]))
  assert m["split"] == "test" and cm.sum() == m["pixels"] > 10_000
  assert (out / "tiles.png").stat().st_size > 10_000 and "IoU (building)" in (
    out / "metrics.md"
  ).read_text()
  b = m["boundary"]  # 1 m band at 0.5 m; a boundary pixel is a counted pixel
  assert b["band_px"] == 2 and m["boundary_iou"] == b["intersection"] / b["union"]
  assert 0 < b["union"] < m["pixels"] and f"boundary IoU = {m['boundary_iou']:.4f}" in done.stdout
  again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)  # never overwritten
  assert again.returncode == 2 and "already exists" in again.stderr


def test_finetune_config_rejects_unknown_keys_and_tiles_of_another_size(delft_tiles):
  with pytest.raises(KeyError, match='Did you mean "channels"'):
    tiny_config(delft_tiles, **{"model.head.chanels": 8})
  from data_pipelines.reader import read_manifest

  manifest = read_manifest(str(delft_tiles))
  config = tiny_config(delft_tiles)
  spec = finetune.model_spec(config, manifest, finetune._backbone(config, 64, 1)[0])
  spec["tile_size"] = 64  # a model made for 64 px tiles, given the 32 px tile set
  with pytest.raises(ValueError, match="tiles are 32 px but the model was built for 64 px"):
    segmenter.check_spec_against_data(spec, manifest, "delft tiles")


def test_predict_script_keeps_crs_transform_and_agrees_with_labels(trained, delft_tiles, tmp_path):
  """scripts/predict.py on the whole rasterised Delft DSM (528 x 456 px), read back."""
  import rasterio

  workdir, _, _ = trained
  root = Path(delft_tiles).parent.parent
  dsm, labels = root / "rasters" / "dsm.tif", root / "labels" / "buildings.tif"
  out = tmp_path / "buildings.tif"
  cmd = [
    sys.executable,
    str(ROOT / "scripts" / "predict.py"),
    f"--workdir={workdir}",
    f"--input={dsm}",
    f"--output={out}",
    f"--polygons={tmp_path / 'b.gpkg'}",
    f"--png={tmp_path / 'preview.png'}",
    "--block=200",
  ]
  done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  with rasterio.open(out) as p, rasterio.open(dsm) as d, rasterio.open(labels) as lab:
    assert p.crs == d.crs and p.transform == d.transform and p.shape == d.shape
    assert p.nodata == 255 and p.profile["tiled"] and p.profile["compress"] == "deflate"
    pred, height, label = p.read(1), d.read(1, masked=True), lab.read(1)
  invalid = np.ma.getmaskarray(height) | ~np.isfinite(height.filled(np.nan))
  assert (pred[invalid] == 255).all() and (pred[~invalid] != 255).all()
  counted = (label != 255) & ~invalid
  agree = (pred[counted] == label[counted]).mean()
  building = label[counted] == 1
  iou = (building & (pred[counted] == 1)).sum() / (building | (pred[counted] == 1)).sum()
  # better than the best constant map on both counts
  assert agree > max(building.mean(), 1 - building.mean()) + 0.03, agree
  assert iou > building.mean() + 0.1, (iou, building.mean())
  print(
    f"predict vs labels: agreement {agree:.3f}, building IoU {iou:.3f}, building share "
    f"{building.mean():.3f}"
  )
  assert (tmp_path / "b.gpkg").exists() and (tmp_path / "preview.png").stat().st_size > 10_000
  before = out.read_bytes()
  again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert again.returncode == 2 and "already exist" in again.stderr and out.read_bytes() == before


def test_predict_script_rasterises_a_laz_input_first(trained, tmp_path):
  """delft/ahn3_cropped_2.laz (no CRS in its header) straight into scripts/predict.py."""
  import rasterio

  from data_pipelines.shared_data import shared_file

  workdir, _, _ = trained
  laz = shared_file("delft/ahn3_cropped_2.laz")
  cmd = [
    sys.executable,
    str(ROOT / "scripts" / "predict.py"),
    f"--workdir={workdir}",
    f"--input={laz}",
    f"--output={tmp_path / 'b.tif'}",
  ]
  refused = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert refused.returncode == 2 and "header has no CRS" in refused.stderr
  assert not (tmp_path / "b.tif").exists()
  done = subprocess.run(cmd + ["--crs=EPSG:28992"], capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  with rasterio.open(tmp_path / "b.tif") as p:
    assert p.crs == rasterio.crs.CRS.from_epsg(28992) and p.res == (0.5, 0.5)
    classes = p.read(1)
  assert set(np.unique(classes)) <= {0, 1, 255} and (classes == 1).mean() > 0.05
  # The library stage the script wraps, in process, with outline="roof": the same map with every
  # building grown by the 1 m eave (two 0.5 m cells)
  from demmae_jax import predict
  from demmae_jax.inference.outline import to_roof_outline

  summary = predict.predict(
    workdir,
    laz,
    predict.Outputs(classes=str(tmp_path / "roof.tif")),
    predict.Options(crs="EPSG:28992", outline="roof"),
  )
  assert summary["outline"].startswith("roof") and summary["input"] == str(laz)
  with rasterio.open(tmp_path / "roof.tif") as p:
    np.testing.assert_array_equal(p.read(1), to_roof_outline(classes, 0.5, 1.0))
    assert "roof" in p.tags()["outline"]
  # thinned to 2 points/m2 first (0.5 a cell): a sparser DSM, so another map on the same grid
  predict.predict(
    workdir,
    laz,
    predict.Outputs(classes=str(tmp_path / "thin.tif")),
    predict.Options(crs="EPSG:28992", max_density=2.0),
  )
  with rasterio.open(tmp_path / "thin.tif") as p:
    thin = p.read(1)
  assert thin.shape == classes.shape and 0.01 < (thin != classes).mean() < 0.5
  with pytest.raises(ValueError, match="thins a LAS/LAZ point cloud"):
    predict.predict(
      workdir,
      str(tmp_path / "b.tif"),
      predict.Outputs(classes=str(tmp_path / "x.tif")),
      predict.Options(max_density=2.0),
    )
  # the height gate is for building models on height above ground (this one reads the DSM)
  for value, message in ((2.0, "is for building models on height above ground"), (-1.0, ">= 0")):
    with pytest.raises(ValueError, match=message):
      predict.predict(
        workdir,
        laz,
        predict.Outputs(classes=str(tmp_path / "gated.tif")),
        predict.Options(crs="EPSG:28992", min_height_m=value),
      )
  assert not (tmp_path / "gated.tif").exists()
