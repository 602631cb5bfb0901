"""The height-rule baseline: its features on hand-made surfaces, the rule on synthetic scenes with
known answers, the grid search against the plain rule, the harness's tile draw, and the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.synthetic import synthetic_scene, write_scene_geotiffs
from data_pipelines.tile_writer import write_tiles
from demmae_jax import baselines as B, metrics

ROOT = Path(__file__).resolve().parent.parent


def scene_of(dsm, cell=1.0, valid=None):
  dsm = np.asarray(dsm, np.float32)
  return B.Scene(dsm, np.ones(dsm.shape, bool) if valid is None else valid, cell)


def test_slope_of_planes_is_their_angle_and_roughness_is_zero_on_them():
  cols = np.arange(32, dtype=np.float32)
  for degrees, cell in ((10.0, 0.5), (30.0, 1.0), (45.0, 2.0)):
    plane = np.tile(cols * cell * np.tan(np.radians(degrees)), (32, 1))
    for z in (plane, plane.T):
      np.testing.assert_allclose(B.slope_deg(z[None], cell)[0, 1:-1, 1:-1], degrees, atol=1e-3)
      assert np.abs(B.roughness(z[None])).max() < 1e-4
  bumpy = np.random.default_rng(0).normal(0, 0.5, (1, 32, 32)).astype(np.float32)
  assert np.median(B.roughness(bumpy)) > 0.1


def test_fill_invalid_takes_the_nearest_valid_cell_of_the_same_tile():
  z = np.array([[[3, 9, 9, 8, 7]], [[9, 9, 4, 5, 9]]], np.float32)
  valid = np.array([[[1, 0, 0, 1, 1]], [[0, 0, 1, 1, 0]]], bool)
  # tile 1's first cell is 2 cells from its 4 but 1 from tile 0's 3 across the batch axis
  np.testing.assert_array_equal(B.fill_invalid(z, valid), [[[3, 3, 8, 8, 7]], [[4, 4, 4, 5, 5]]])


def test_objects_and_holes_stay_within_their_tile():
  mask = np.zeros((2, 8, 8), bool)
  mask[0, 5:, 2:4] = mask[1, :3, 2:4] = True  # would touch across the batch axis
  ids, sizes = B.objects(mask)
  assert len(sizes) == 3 and sorted(sizes[1:]) == [6, 6]
  ring = np.zeros((1, 8, 8), bool)
  ring[0, 1:6, 1:6] = True
  ring[0, 2:4, 2:4] = False  # a 4-cell hole
  ring[0, 4:6, 6:] = True
  ring[0, 5, 7] = False  # a notch open to the edge: not a hole
  rule = B.Rule("buildings", max_hole_m2=1.5)  # 0.5 m cells: the hole is 1 m2
  filled = B._post(ring, rule, 0.5)
  want = ring.copy()
  want[0, 2:4, 2:4] = True
  np.testing.assert_array_equal(filled, want)
  np.testing.assert_array_equal(B._post(ring, B.Rule("buildings", max_hole_m2=0.5), 0.5), ring)


def test_roughness_rejects_a_tree_but_keeps_the_whole_building_with_its_walls():
  z = np.zeros((40, 40), np.float32)
  rows, cols = np.mgrid[:40, :40]
  z[5:20, 5:20] = 4 + 0.5 * (rows[5:20, 5:20] - 5)  # pitched roof, 4-11 m
  crown = (rows - 28) ** 2 + (cols - 28) ** 2 <= 36
  z[crown] = np.random.default_rng(1).uniform(3, 10, crown.sum())
  building = np.zeros((40, 40), bool)
  building[5:20, 5:20] = True
  scene = scene_of(z[None], cell=0.5)
  plain = B.apply(B.Rule("buildings", window_m=15, height_m=2), scene)[0]
  assert (plain & building).sum() == building.sum() and (plain & crown).sum() > 0.8 * crown.sum()
  smooth = B.apply(B.Rule("buildings", window_m=15, height_m=2, max_roughness_m=0.2), scene)[0]
  np.testing.assert_array_equal(smooth & ~crown, building)  # walls and ridge included
  # only the crown's rim survives, where the 5 x 5 median sees more smooth ground than crown
  rim = crown & ~ndi_erode(crown, 2)
  assert (smooth & crown).sum() < 0.25 * crown.sum() and not (smooth & crown & ~rim).any()


def ndi_erode(mask, n):
  from scipy.ndimage import binary_erosion

  return binary_erosion(mask, np.ones((3, 3)), iterations=n)


def test_building_rule_recovers_synthetic_boxes_when_the_window_exceeds_them():
  sc = synthetic_scene(192, 192, seed=0, n_buildings=15)
  scene = scene_of(sc.dsm[None])
  np.testing.assert_array_equal(
    B.apply(B.Rule("buildings", window_m=40, height_m=2), scene)[0], sc.label == 1
  )
  # a window narrower than the buildings leaves their roofs at the "ground"
  narrow = B.apply(B.Rule("buildings", window_m=10, height_m=2), scene)[0]
  assert narrow.sum() < 0.5 * (sc.label == 1).sum()


def test_grid_search_agrees_with_the_plain_rule_on_every_rule_and_takes_the_first_best():
  sc = synthetic_scene(192, 192, seed=2, n_buildings=15)
  tiles = np.stack([sc.dsm[r : r + 64, c : c + 64] for r in (0, 64, 128) for c in (0, 64, 128)])
  label = np.stack(
    [sc.label[r : r + 64, c : c + 64] == 1 for r in (0, 64, 128) for c in (0, 64, 128)]
  )
  label = label.astype(np.int32)
  label[:, :4] = metrics.IGNORE_INDEX
  valid = np.ones(label.shape, np.uint8)
  valid[:, :, :3] = 0
  scene = scene_of(tiles)
  rules = B.grid(
    "buildings",
    window_m=(10, 40),
    height_m=(2, 30),
    max_roughness_m=(None, 0.05),
    min_area_m2=(0, 200),
    max_hole_m2=(0, 50),
  )
  best, table = B.tune(scene, label, valid, rules)
  for rule, row in zip(rules, table):
    want = B.evaluate(B.apply(rule, scene), label, valid, 1.0)["iou"]
    assert row["iou"] == pytest.approx(want, abs=1e-12), rule
  ious = [r["iou"] for r in table]
  assert best == rules[ious.index(max(ious))]  # the first of the best
  # per tile, buildings cut by a tile's edge lose their cut part (its opening stays on the roof)
  assert best.window_m == 40 and best.height_m == 2 and max(ious) > 0.8


def test_raster_mode_crops_the_prediction_at_the_tiles():
  raster = np.arange(6 * 8).reshape(1, 6, 8)
  windows = np.array([[0, 0, 3, 3], [5, 2, 3, 3]])  # col, row, width, height
  got = B.crop(windows)(raster)
  np.testing.assert_array_equal(got[0], raster[0, 0:3, 0:3])
  np.testing.assert_array_equal(got[1], raster[0, 2:5, 5:8])


@pytest.fixture(scope="module")
def synthetic_tiles(tmp_path_factory):
  folder = tmp_path_factory.mktemp("bl")
  scene = synthetic_scene(256, 256, seed=5, n_buildings=30)
  paths = write_scene_geotiffs(scene, folder / "rasters", cell_size=1.0, label_value=1)
  return write_tiles(
    paths["dsm"],
    folder / "tiles",
    label=paths["label"],
    extras={"ndsm": paths["ndsm"]},
    tile_size=64,
    stride=16,
    block_px=64,
    label_names={0: "background", 1: "building"},
    progress=False,
  )


def test_draw_gives_the_tiles_the_experiment_harness_gives_its_models(synthetic_tiles, tmp_path):
  from data_pipelines.reader import read_manifest
  from demmae_jax import config_files
  from demmae_jax.experiments import draws, plan

  cfg = config_files.get_config("experiments", "tiny")
  data = draws.Data(cfg, tmp_path, progress=lambda *_: None)
  data._base["delft_buildings"] = read_manifest(
    str(synthetic_tiles)
  )  # stands in for the prepared set
  train = B.load_tiles(str(synthetic_tiles), "train")
  for seed in (0, 1):
    _, info = data.manifest(plan.Run("delft_buildings", "unet", 5, seed))
    assert train["tile_id"][B.draw(train["window"], 5, seed)].tolist() == info["tile_ids"]


def test_cli_tunes_on_draws_and_reports_both_modes(synthetic_tiles, tmp_path):
  out, png = tmp_path / "r.json", tmp_path / "r.png"
  cmd = [
    sys.executable,
    str(ROOT / "scripts" / "baseline.py"),
    "--manifest",
    str(synthetic_tiles),
    "--draw",
    "4",
    "--seeds",
    "0,1",
    "--out",
    str(out),
    "--pictures",
    str(png),
  ]
  done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  r = json.loads(out.read_text())
  m = json.loads(Path(synthetic_tiles).read_text())
  assert r["task"] == "buildings" and r["eval_tiles"] == m["splits"]["test"]["count"]
  assert [(x["mode"], x["seed"], x["tune_tiles"]) for x in r["results"]] == [
    ("tile", 0, 4),
    ("tile", 1, 4),
    ("raster", 0, 4),
    ("raster", 1, 4),
  ]
  test = B.load_tiles(str(synthetic_tiles), "test")
  counted = ((test["label"] != 255) & (test["valid"] > 0)).sum()
  for x in r["results"]:
    assert x["test"]["pixels"] == counted and x["test"]["boundary"]["band_px"] == 1
    assert x["test"]["iou"] > 0.9 and x["tune_iou"] == x["top_rules"][0]["iou"]
  assert r["mean"]["raster"]["iou"]["n"] == 2 and "mean over 2 draws" in done.stdout
  assert "boundary IoU" in done.stdout and png.stat().st_size > 10_000
  again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert again.returncode == 2 and "already exists" in again.stderr
  assert subprocess.run(cmd[:2] + ["--help"], capture_output=True, cwd=ROOT).returncode == 0
