"""The product study's bookkeeping (demmae_jax/study.py): aggregation over seeds, the doc block it
rewrites, the window each arm is scored with, and the arms' configs."""

import dataclasses
import json

import numpy as np
import pytest

from demmae_jax import study


def _result(out, run_id, arm, task, tile, area):
  path = out / "results" / f"{run_id}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(
    json.dumps(
      {
        "id": run_id,
        "arm": arm,
        "task": task,
        "tile_iou": tile,
        "area_iou": area,
        "area": {"iou": area, "boundary_iou": area / 2},
      }
    )
  )


def test_report_is_mean_and_sample_std_over_seeds(tmp_path):
  for seed, (tile, area) in enumerate([(0.70, 0.79), (0.72, 0.80), (0.74, 0.81)]):
    _result(
      tmp_path, f"delft/buildings/unet_ndsm/n10_s{seed}", "unet_ndsm", "buildings", tile, area
    )
  _result(tmp_path, "loao/roads/gothenburg/unet_ndsm/s0", "unet_ndsm", "roads", 0.5, 0.6)
  text = study.report(tmp_path)
  assert (
    "| buildings | UNet, nDSM input (recommended) | 72.0 ± 2.0 (3) | 80.0 ± 1.0 (3) | 40.0 ± 0.5 (3) |"
    in text
  )
  assert (
    "| roads | gothenburg | UNet, nDSM input (recommended) | 50.0 (1) | 60.0 (1) | 30.0 (1) |"
    in text
  )


def test_write_into_replaces_only_the_generated_block(tmp_path):
  doc = tmp_path / "r.md"
  doc.write_text(f"intro\n{study.BEGIN}\nold\n{study.END}\noutro\n")
  study.write_into(doc, "new table")
  assert doc.read_text() == f"intro\n{study.BEGIN}\nnew table\n{study.END}\noutro\n"
  (tmp_path / "plain.md").write_text("no markers")
  with pytest.raises(ValueError, match="no .* block"):
    study.write_into(tmp_path / "plain.md", "x")


def test_area_windows_follow_the_normalisation_and_the_architecture():
  unet = {"kind": "unet", "tile_size": 64, "normalisation": {"mode": "ndsm"}}
  assert study.area_predict(unet)["window"] == study.AREA_PREDICT["window"]
  assert study.area_predict({**unet, "normalisation": {"mode": "minmax"}})["window"] == 64
  assert study.area_predict({**unet, "kind": "hybrid"})["window"] == 64


@pytest.mark.parametrize("arm", sorted(study.ARMS))
def test_every_arm_builds_a_valid_finetuning_config(arm, tmp_path):
  c = study.finetune_config(arm, "roads", tmp_path / "m.json", seed=2)
  recipe = study.MODEL_RECIPE if arm.endswith("_model") else study.RECIPE
  assert c.seed == 2 and c.data.seed == 2 and c.total_steps == recipe["total_steps"]
  assert c.data.manifest == str(tmp_path / "m.json")
  if arm.endswith("_dem"):
    assert c.init == study.DEM_ENCODER
  if arm.startswith("hybrid"):  # the pairs differ only in the encoder's start (and frozen or not)
    assert c.freeze_backbone == ("frozen" in arm)
    assert c.data.normalisation.mode == "ndsm"
  if arm.startswith("upernet_frozen_ndsm"):
    assert c.freeze_backbone and c.data.normalisation.mode == "ndsm"


def test_make_model_trains_a_measured_arm_per_task_with_the_data_augmentation_it_names():
  assert set(study.MODEL_ARMS) == set(study.LOAO_AREAS)
  for task, arm in study.MODEL_ARMS.items():
    c = study.finetune_config(arm, task, "m.json", seed=0, **study.MODEL_RECIPE)
    assert c.total_steps == 1500 and c.data.normalisation.mode == "ndsm"
    assert c.data.coarsen == (0.5 if "coarsen" in arm else 0.0) and c.data.densify == 0.0


@pytest.mark.realdata
@pytest.mark.slow
def _wall_line_run(tmp_path):
  """A finished LOAO run on Gothenburg whose kept map is its roof outlines shrunk by one cell,
  and a Delft run record beside it: (study folder, the Gothenburg run id, its area scores)."""
  import numpy as np
  import rasterio
  import scipy.ndimage as ndi

  from data_pipelines.areas import prepare_area
  from data_pipelines.reader import read_manifest
  from demmae_jax import area_eval

  manifest = prepare_area(
    "gothenburg", tmp_path / "g", "buildings", cell_size=1.0, holdout=True, progress=False
  )
  with rasterio.open(tmp_path / "g" / "labels" / "buildings.tif") as src:
    label, profile = src.read(1), src.profile
  walls = ndi.binary_erosion(label == 1, structure=ndi.generate_binary_structure(2, 1))
  pred = walls.astype(np.uint8)
  run_id = "loao/buildings/gothenburg/unet_ndsm/s0"
  kept = tmp_path / "out" / "workdirs" / run_id / "test_area_classes.tif"
  kept.parent.mkdir(parents=True)
  with rasterio.open(kept, "w", **{**profile, "dtype": "uint8", "nodata": 255}) as dst:
    dst.write(pred, 1)
  area = area_eval.score_area(
    pred, read_manifest(str(manifest)), "test", ("background", "building")
  )
  for rid in (run_id, "loao/buildings/delft/unet_ndsm/s0"):
    path = tmp_path / "out" / "results" / f"{rid}.json"
    path.parent.mkdir(parents=True)
    path.write_text(
      json.dumps(
        {
          "id": rid,
          "arm": "unet_ndsm",
          "task": "buildings",
          "tile_iou": None,
          "area_manifest": str(manifest),
          "area": area,
          "area_iou": area["iou"],
        }
      )
    )
  return tmp_path / "out", run_id, area


def test_outline_scores_convert_wall_line_maps_on_roof_outlined_areas_only(tmp_path):
  """Gothenburg's labels outline roofs: a map one cell inside them (what a model trained on wall
  lines draws) scores higher once grown by the eave; a wall-line area is left alone."""
  _, run_id, area = _wall_line_run(tmp_path)
  assert study.outline_scores(tmp_path / "out", log=lambda *_: None) == 1
  rec = json.loads((tmp_path / "out" / "results" / f"{run_id}.json").read_text())
  assert rec["area_outline"]["iou"] > max(0.9, area["iou"] + 0.1), (
    area["iou"],
    rec["area_outline"]["iou"],
  )
  delft = json.loads(
    (tmp_path / "out" / "results" / "loao/buildings/delft/unet_ndsm/s0.json").read_text()
  )
  assert "area_outline" not in delft
  assert study.outline_scores(tmp_path / "out", log=lambda *_: None) == 0  # already scored


def test_gate_scores_rescore_kept_maps_with_the_height_gate_once(tmp_path):
  """A kept map from before the height gate that also calls the bare ground a building: the
  rescoring removes those cells (the walls' score comes back), keeps the old score beside, also
  redoes the roof-outline score, and leaves a run without a workdir, and itself, alone."""
  import numpy as np
  import rasterio

  from data_pipelines.reader import read_manifest
  from demmae_jax import area_eval

  out, run_id, walls = _wall_line_run(tmp_path)
  path = out / "results" / f"{run_id}.json"
  rec = json.loads(path.read_text())
  m = read_manifest(rec["area_manifest"])
  workdir = out / "workdirs" / run_id
  kept = workdir / "test_area_classes.tif"
  with rasterio.open(area_eval.source_path(m, "ndsm")) as src:
    ground = src.read(1) < 0.5
  with rasterio.open(kept, "r+") as dst:
    dst.write(np.where(ground, 1, dst.read(1)).astype(np.uint8), 1)
    blobs = dst.read(1)
  rec["area"] = area_eval.score_area(blobs, m, "test", ("background", "building"))
  rec["area_iou"] = rec["area"]["iou"]
  path.write_text(json.dumps(rec))
  assert study.outline_scores(out, log=lambda *_: None) == 1
  rec = json.loads(path.read_text())
  (workdir / "segmenter.json").write_text(
    json.dumps({"normalisation": {"mode": "ndsm"}, "class_names": ["background", "building"]})
  )
  assert study.gate_scores(out, log=lambda *_: None) == 1
  gated = json.loads(path.read_text())
  assert gated["min_height_m"] == 2.0 and gated["area_ungated"]["iou"] == rec["area_iou"]
  assert rec["area_iou"] < walls["iou"] - 0.2  # the ground blobs cost the ungated map
  assert abs(gated["area_iou"] - walls["iou"]) < 0.02, (gated["area_iou"], walls["iou"])
  assert gated["area_outline_ungated"] == rec["area_outline"]
  assert gated["area_outline"]["iou"] > rec["area_outline"]["iou"] + 0.2
  assert study.gate_scores(out, log=lambda *_: None) == 0  # scored once


def test_run_study_draws_the_kept_maps_of_finished_runs_and_names_unfinished_ones(tmp_path, capsys):
  import matplotlib.image

  from script_support import load_script

  run_study = load_script("run_study")
  out, run_id, _ = _wall_line_run(tmp_path)
  png = tmp_path / "fig.png"
  argv = ["--out", str(out), "--figure", str(png)]
  assert run_study.main([*argv, "--figure_runs", f"{run_id},delft/buildings/x/n10_s0"]) == 2
  assert "not finished: ['delft/buildings/x/n10_s0']" in capsys.readouterr().err
  assert not png.exists()
  assert run_study.main([*argv, "--figure_runs", run_id]) == 0
  img = matplotlib.image.imread(png)
  assert img.shape[0] > 300 and img.shape[1] > 700  # one row, two panels
  assert img[..., :3].std() > 0.05  # drawn, not blank


@pytest.mark.realdata
@pytest.mark.slow
def test_thinned_holdout_rescores_the_rule_on_a_thinned_survey_against_the_same_labels(tmp_path):
  """The rule's LOAO record on Delft, rerun on Delft rasterised from fewer points: a density above
  the survey's gives back its score exactly; Amsterdam's 3.4 points/m2 changes it; both are
  kept and not redone."""
  from data_pipelines.areas import prepare_area
  from data_pipelines.reader import read_manifest
  from demmae_jax import area_eval, baselines

  out = tmp_path / "out"
  with pytest.raises(ValueError, match="no finished leave-one-area-out runs of delft"):
    study.thinned_holdout(out, "delft", 3.4)
  holdout = out / "data" / "areas" / "buildings" / "delft_holdout"
  manifest = prepare_area("delft", holdout, "buildings", 1.0, holdout=True, progress=False)
  rule = baselines.Rule("buildings", window_m=60, height_m=3, max_roughness_m=0.4, min_area_m2=100)
  pred = baselines.apply(rule, baselines.raster_scene(str(manifest)))[0].astype(np.uint8)
  area = area_eval.score_area(pred, read_manifest(str(manifest)), "test")
  run_id = "loao/buildings/delft/height_rule/s0"
  path = study.result_path(out, run_id)
  path.parent.mkdir(parents=True)
  rec = {"id": run_id, "arm": "height_rule", "rule": dataclasses.asdict(rule)}
  path.write_text(
    json.dumps({**rec, "area_manifest": str(manifest), "area": area, "area_iou": area["iou"]})
  )
  quiet = lambda *_: None  # noqa: E731
  (same,) = study.thinned_holdout(out, "delft", 1000.0, log=quiet)
  assert same["area_iou"] == same["native_area_iou"] == area["iou"]
  (thin,) = study.thinned_holdout(out, "delft", 3.4, log=quiet)
  assert abs(thin["area_iou"] - area["iou"]) > 0.02 and thin["area_manifest"] == str(manifest)
  assert study.thinned_holdout(out, "delft", 3.4, log=quiet) == [thin]  # kept, not redone
  table = study.thinned_table([thin])
  assert f"| {study.ARM_NAMES['height_rule']} | {100 * area['iou']:.1f} (1) | " in table
  assert table.endswith(f"| {100 * thin['area_iou']:.1f} (1) |")


@pytest.mark.realdata
@pytest.mark.slow
def test_errors_by_lidar_class_counts_a_maps_errors_by_the_top_return(tmp_path):
  """A kept Delft map equal to its labels but for 10 tree cells called buildings and 5 roof
  cells missed: the table names exactly those."""
  import rasterio

  from data_pipelines.areas import prepare_area
  from data_pipelines.reader import read_manifest
  from demmae_jax import area_eval

  out = tmp_path / "out"
  area = tmp_path / "delft"
  manifest = prepare_area("delft", area, "buildings", 1.0, holdout=True, progress=False)
  m = read_manifest(str(manifest))
  with rasterio.open(area / "labels" / "buildings.tif") as src:
    label, profile = src.read(1), src.profile
  with (
    rasterio.open(area / "rasters" / "class.tif") as a,
    rasterio.open(area / "rasters" / "valid.tif") as b,
  ):
    top, valid = a.read(1), b.read(1) > 0
  pred = np.where(label == 1, 1, 0).astype(np.uint8)
  scored = area_eval.test_area_mask(m, label.shape) & valid
  trees = np.flatnonzero((scored & (label == 0) & (top == 1)).ravel())[:10]
  roofs = np.flatnonzero((scored & (label == 1) & (top == 6)).ravel())[:5]
  pred.ravel()[trees], pred.ravel()[roofs] = 1, 0
  run_id = "loao/buildings/delft/unet_ndsm/s0"
  kept = out / "workdirs" / run_id / "test_area_classes.tif"
  kept.parent.mkdir(parents=True)
  with rasterio.open(kept, "w", **{**profile, "dtype": "uint8", "nodata": 255}) as dst:
    dst.write(pred, 1)
  score = area_eval.score_area(pred, m, "test")
  path = study.result_path(out, run_id)
  path.parent.mkdir(parents=True)
  rec = {"id": run_id, "arm": "unet_ndsm", "area_manifest": str(manifest)}
  path.write_text(json.dumps({**rec, "area": score, "area_iou": score["iou"]}))
  table = study.errors_by_lidar_class(out, [run_id])
  assert table.splitlines()[-1] == (
    f"| {run_id} | {100 * score['iou']:.1f} | unclassified (trees) 10 | building 5 |"
  )
  with pytest.raises(ValueError, match="not finished"):
    study.errors_by_lidar_class(out, ["loao/buildings/delft/unet_ndsm/s1"])
