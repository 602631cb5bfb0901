"""Tiling into TFRecord shards: exact round trip, spatial splits, subsets, manifest, bad input."""

import json

import numpy as np
import pytest
import rasterio
import tensorflow as tf

from data_pipelines.errors import DataError
from data_pipelines.synthetic import synthetic_scene, write_scene_geotiffs
from data_pipelines.tile_records import decode_tile_numpy
from data_pipelines.tile_writer import write_tiles
from data_pipelines.tiles import (
  assign_blocks,
  assign_blocks_nested,
  few_label_subsets,
  tile_windows,
)


def _records(manifest_path, split):
  m = json.loads(manifest_path.read_text())
  entry = m["splits"].get(split) or m["subsets"][split]
  files = [str(manifest_path.parent / f) for f in entry["files"]]
  return m, [
    decode_tile_numpy(r, m["channels"], m["dtype"], m["tile_size"])
    for r in tf.data.TFRecordDataset(files).as_numpy_iterator()
  ]


@pytest.fixture(scope="module")
def scene_tifs(tmp_path_factory):
  scene = synthetic_scene(200, 180, seed=3)
  return scene, write_scene_geotiffs(scene, tmp_path_factory.mktemp("scene"), label_value=1)


def test_tile_windows_cover_the_raster_edges():
  wins = tile_windows(100, 70, 32, 24)
  rows, cols = sorted({w.row for w in wins}), sorted({w.col for w in wins})
  assert rows == [0, 24, 48, 68] and cols == [0, 24, 38]
  with pytest.raises(ValueError, match="smaller than one 32 px tile"):
    tile_windows(20, 70, 32, 32)


def test_block_assignment_reaches_each_fraction_and_is_seeded():
  weights = np.ones((10, 10))
  a = assign_blocks(weights, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=1)
  assert np.bincount(a.ravel(), minlength=3).tolist() == [70, 15, 15]
  np.testing.assert_array_equal(
    a, assign_blocks(weights, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=1)
  )
  assert not np.array_equal(
    a, assign_blocks(weights, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=2)
  )


def test_nested_assignment_gives_both_areas_their_fractions():
  outer = np.ones((10, 20))
  inner = np.zeros((10, 20))
  inner[:, :8] = 1  # the inner survey covers 80 of the 200 blocks
  fr = {"train": 0.7, "val": 0.15, "test": 0.15}
  a = assign_blocks_nested(inner, outer, fr, seed=0)
  assert np.bincount(a[:, :8].ravel(), minlength=3).tolist() == [56, 12, 12]
  assert np.bincount(a.ravel(), minlength=3).tolist() == [140, 30, 30]
  # a plain draw on the outer weights leaves the inner area's shares to chance
  plain = [
    np.bincount(assign_blocks(outer, fr, s)[:, :8].ravel(), minlength=3)[2] for s in range(20)
  ]
  assert len(set(plain)) > 1


def test_few_label_subsets_are_nested_seeded_and_within_train():
  ids = list(range(1000, 1600))
  s = few_label_subsets(ids, seed=0)
  assert [len(s[k]) for k in ("train_10", "train_50", "train_200", "train_450")] == [
    10,
    50,
    200,
    450,
  ]
  assert (
    set(s["train_10"])
    <= set(s["train_50"])
    <= set(s["train_200"])
    <= set(s["train_450"])
    <= set(ids)
  )
  assert few_label_subsets(ids, seed=0) == s and few_label_subsets(ids, seed=1) != s
  assert list(few_label_subsets(list(range(40)), seed=0)) == ["train_10"]


def test_records_round_trip_the_raster_windows_exactly(tmp_path, scene_tifs):
  scene, tifs = scene_tifs
  m_path = write_tiles(
    tifs["dsm"],
    tmp_path / "t",
    label=tifs["label"],
    extras={"ndsm": tifs["ndsm"]},
    tile_size=32,
    stride=16,
    block_px=64,
    progress=False,
    dtype="float32",
  )
  m, recs = _records(m_path, "train")
  assert len(recs) == m["splits"]["train"]["count"] > 0
  with rasterio.open(tifs["dsm"]) as src:
    for r in recs:
      col, row, w, h = r["window"]
      np.testing.assert_array_equal(r["elevation"], scene.dsm[row : row + h, col : col + w])
      np.testing.assert_array_equal(r["label"], (scene.label[row : row + h, col : col + w] == 1))
      np.testing.assert_allclose(
        r["ndsm"], (scene.dsm - scene.dtm)[row : row + h, col : col + w], atol=1e-5
      )
      window = rasterio.windows.Window(col, row, w, h)
      assert tuple(r["transform"]) == tuple(rasterio.windows.transform(window, src.transform))[:6]
      assert rasterio.crs.CRS.from_wkt(r["crs_wkt"]) == src.crs and r["source"] == "dsm.tif"
  # manifest statistics are those of the training tiles' pixels
  train = np.concatenate([r["elevation"].ravel() for r in recs])
  assert m["stats"]["elevation"]["mean"] == pytest.approx(train.mean(), rel=1e-6)
  assert m["stats"]["elevation"]["std"] == pytest.approx(train.std(), rel=1e-4)
  lbl = np.concatenate([r["label"].ravel() for r in recs])
  assert m["splits"]["train"]["classes"]["pixel_counts"] == {
    "0": int((lbl == 0).sum()),
    "1": int((lbl == 1).sum()),
  }


def test_float16_storage_error_is_bounded_by_the_tile_relief(tmp_path, scene_tifs):
  scene, tifs = scene_tifs
  m_path = write_tiles(
    tifs["dsm"], tmp_path / "t", tile_size=32, stride=32, progress=False, dtype="float16"
  )
  _, recs = _records(m_path, "train")
  for r in recs:
    col, row, w, h = r["window"]
    truth = scene.dsm[row : row + h, col : col + w]
    # relief < 32 m -> float16 spacing <= 2**-5 m, rounding error <= half of it
    assert np.abs(r["elevation"] - truth).max() <= 2.0**-6 + 1e-4


def test_no_pixel_is_in_two_splits_even_with_overlapping_tiles(tmp_path, scene_tifs):
  _, tifs = scene_tifs
  m_path = write_tiles(
    tifs["dsm"],
    tmp_path / "t",
    label=tifs["label"],
    tile_size=32,
    stride=8,
    block_px=48,
    min_labelled=0,
    progress=False,
  )
  owner = np.full((200, 180), -1)
  for i, split in enumerate(("train", "val", "test")):
    m, recs = _records(m_path, split)
    assert recs, split
    for r in recs:
      col, row, w, h = r["window"]
      seen = owner[row : row + h, col : col + w]
      assert np.isin(seen, [-1, i]).all(), f"{split} tile {r['tile_id']} overlaps another split"
      owner[row : row + h, col : col + w] = i
  assert m["skipped"]["straddles_splits"] > 0
  total = sum(m["splits"][s]["count"] for s in m["splits"]) + sum(m["skipped"].values())
  assert total == m["candidates"]


def test_nodata_and_nan_become_invalid_never_nan(tmp_path):
  scene = synthetic_scene(64, 64, seed=1)
  scene.dsm[:10, :10] = np.nan
  tifs = write_scene_geotiffs(scene, tmp_path / "s")
  m_path = write_tiles(
    tifs["dsm"],
    tmp_path / "t",
    tile_size=32,
    min_valid=0.5,
    progress=False,
    fractions={"train": 1.0, "val": 0.0, "test": 0.0},
  )
  _, recs = _records(m_path, "train")
  first = next(r for r in recs if tuple(r["window"][:2]) == (0, 0))
  assert first["valid"][:10, :10].sum() == 0 and first["valid"].sum() == 32 * 32 - 100
  assert np.isfinite(first["elevation"]).all()
  assert first["elevation"][:10, :10].min() == first["elevation"][first["valid"] > 0].min()


def test_interpolated_cells_keep_their_height_but_stay_invalid(tmp_path):
  """A scan gap the rasteriser interpolated (finite DSM, valid 0) is stored as its height, so a
  roof keeps no pit to street level; it stays out of the loss through `valid`."""
  import rasterio

  scene = synthetic_scene(64, 64, seed=1)
  tifs = write_scene_geotiffs(scene, tmp_path / "s")
  with rasterio.open(tifs["dsm"]) as src:
    profile = src.profile
  gap = np.ones((64, 64), np.uint8)
  gap[20:24, 20:24] = 0
  profile.update(dtype="uint8", nodata=None)
  with rasterio.open(tmp_path / "valid.tif", "w", **profile) as dst:
    dst.write(gap, 1)
  m_path = write_tiles(
    tifs["dsm"],
    tmp_path / "t",
    valid=tmp_path / "valid.tif",
    tile_size=32,
    min_valid=0.5,
    progress=False,
    dtype="float32",
    fractions={"train": 1.0, "val": 0.0, "test": 0.0},
  )
  _, recs = _records(m_path, "train")
  first = next(r for r in recs if tuple(r["window"][:2]) == (0, 0))
  assert first["valid"][20:24, 20:24].sum() == 0
  np.testing.assert_array_equal(first["elevation"][20:24, 20:24], scene.dsm[20:24, 20:24])


def test_bad_inputs_fail_clearly_and_leave_nothing(tmp_path, scene_tifs):
  _, tifs = scene_tifs
  small = write_scene_geotiffs(synthetic_scene(20, 40, seed=0), tmp_path / "small")
  with pytest.raises(
    DataError, match="dsm.tif: raster of 20 x 40 px is smaller than one 32 px tile"
  ):
    write_tiles(small["dsm"], tmp_path / "o1", tile_size=32, progress=False)
  with pytest.raises(DataError, match="label.tif: grid differs"):
    write_tiles(tifs["dsm"], tmp_path / "o2", label=small["label"], tile_size=16, progress=False)
  other = write_scene_geotiffs(
    synthetic_scene(200, 180, seed=3), tmp_path / "utm32", crs="EPSG:32632"
  )
  with pytest.raises(DataError, match="CRS mismatch"):
    write_tiles(tifs["dsm"], tmp_path / "o3", label=other["label"], tile_size=16, progress=False)
  (tmp_path / "junk.tif").write_bytes(b"II*\x00" + b"\x00" * 20)
  with pytest.raises(DataError, match="junk.tif: not a readable raster"):
    write_tiles(tmp_path / "junk.tif", tmp_path / "o4", tile_size=16, progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.tif", "small", "utm32"]


def test_existing_output_is_refused_unless_overwrite(tmp_path, scene_tifs):
  _, tifs = scene_tifs
  kw = dict(tile_size=64, progress=False, fractions={"train": 1.0, "val": 0.0, "test": 0.0})
  write_tiles(tifs["dsm"], tmp_path / "t", **kw)
  with pytest.raises(FileExistsError, match="already exists"):
    write_tiles(tifs["dsm"], tmp_path / "t", **kw)
  m = write_tiles(tifs["dsm"], tmp_path / "t", overwrite=True, dtype="float16", **kw)
  assert json.loads(m.read_text())["dtype"] == "float16"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_truncated_geotiff_is_named_and_leaves_nothing(tmp_path, scene_tifs):
  _, tifs = scene_tifs
  with rasterio.open(tifs["dsm"]) as src:
    data, profile = src.read(1), src.profile
  profile.update(tiled=True, blockxsize=64, blockysize=64, compress="deflate")
  with rasterio.open(tmp_path / "whole.tif", "w", **profile) as dst:
    dst.write(data, 1)
  raw = (tmp_path / "whole.tif").read_bytes()
  (tmp_path / "cut.tif").write_bytes(raw[: len(raw) // 2])
  with pytest.raises(DataError, match="cut.tif: corrupt or truncated raster"):
    write_tiles(tmp_path / "cut.tif", tmp_path / "out", tile_size=32, progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tif", "whole.tif"]


def test_a_given_block_split_decides_every_tile(tmp_path, scene_tifs):
  _, tifs = scene_tifs  # 200 x 180 px: 4 x 4 blocks of 50 px
  given = np.zeros((4, 4), np.int8)
  given[0, :], given[3, 2:] = 2, 1  # top row test, two bottom-right blocks val
  m_path = write_tiles(
    tifs["dsm"],
    tmp_path / "t",
    label=tifs["label"],
    tile_size=25,
    stride=25,
    block_px=50,
    min_labelled=0,
    block_split=given,
    progress=False,
  )
  m = json.loads(m_path.read_text())
  assert m["split"]["block_splits"] == given.tolist() and m["split"]["given"]
  for i, split in enumerate(("train", "val", "test")):
    _, recs = _records(m_path, split)
    assert len(recs) == 4 * int((given == i).sum())  # 25 px tiles, 4 per 50 px block
    for r in recs:
      col, row = r["window"][:2]
      assert given[row // 50, col // 50] == i
  with pytest.raises(ValueError, match="block_split must be 4 x 4"):
    write_tiles(
      tifs["dsm"], tmp_path / "o", tile_size=25, block_px=50, block_split=given[:3], progress=False
    )


def test_a_set_drawn_wholly_for_evaluation_keeps_every_tile_in_test(tmp_path, scene_tifs):
  """A held-out area (leave-one-area-out): no split boundary, so no tile is lost to straddling."""
  _, tifs = scene_tifs
  kw = dict(
    label=tifs["label"], tile_size=32, stride=16, block_px=64, min_labelled=0, progress=False
  )
  m = json.loads(
    write_tiles(
      tifs["dsm"], tmp_path / "t", fractions={"train": 0, "val": 0, "test": 1}, **kw
    ).read_text()
  )
  assert m["splits"]["train"]["count"] == m["splits"]["val"]["count"] == 0 and not m["subsets"]
  assert m["splits"]["test"]["count"] == m["candidates"] == len(tile_windows(200, 180, 32, 16))
  assert m["stats"]["elevation"] == {"count": 0}
  split = json.loads(write_tiles(tifs["dsm"], tmp_path / "s", **kw).read_text())
  assert split["skipped"]["straddles_splits"] > 0
