"""LAS/LAZ -> DSM/DTM/nDSM/class/valid rasters (synthetic point clouds with known answers)."""

import numpy as np
import pytest
import rasterio

from data_pipelines.errors import DataError
from data_pipelines.lidar import inspect_las, las_to_rasters
from data_pipelines.synthetic import write_las

X0, Y0 = 500_000.0, 5_000_000.0


def _cloud(seed=0, size=20, hole=(5, 5)):
  """Ground points in every 1 m cell but `hole`, plus a roof over cells [10:14, 10:14]."""
  rng = np.random.default_rng(seed)
  pts, cls = [], []
  for r in range(size):
    for c in range(size):
      if (r, c) == hole:
        continue
      x, y = X0 + c + 0.5, Y0 + size - r - 0.5
      roof = 10 <= r < 14 and 10 <= c < 14
      if not roof:
        pts.append([x, y, 1.0 + 0.01 * c])
        cls.append(2)
      pts.append([x + 0.1, y - 0.1, (9.0 if roof else 1.5) + rng.uniform(0, 0.1)])
      cls.append(6 if roof else 1)
  return np.array(pts), np.array(cls)


def _read(outputs):
  return {k: rasterio.open(p).read(1) for k, p in outputs.items()}


def test_highest_return_ground_mean_and_filled_holes(tmp_path):
  xyz, cls = _cloud()
  write_las(tmp_path / "a.laz", xyz, cls, crs="EPSG:32631")
  out = las_to_rasters(
    [tmp_path / "a.laz"],
    tmp_path / "r",
    cell_size=1.0,
    progress=False,
    dsm_fill_px=2,
    dtm_fill_px=10,
  )
  r = _read(out)
  with rasterio.open(out["dsm"]) as d:
    assert d.crs.to_epsg() == 32631 and d.transform.a == 1.0
    assert (d.bounds.left, d.bounds.top) == (X0, Y0 + 20)
  # cell (0, 3): ground z = 1.03 and an unclassified return at 1.5..1.6 -> DSM is the highest
  assert 1.5 <= r["dsm"][0, 3] <= 1.6 and r["class"][0, 3] == 1
  assert r["dtm"][0, 3] == pytest.approx(1.03, abs=1e-3)
  assert r["class"][11, 11] == 6 and r["dsm"][11, 11] >= 9.0
  # no ground under the roof: DTM interpolated from the surrounding ground, nDSM ~ 8 m
  assert 1.0 <= r["dtm"][11, 11] <= 1.2 and 7.8 <= r["ndsm"][11, 11] <= 8.1
  # the empty cell is filled but recorded as invalid
  assert r["valid"][5, 5] == 0 and r["valid"].sum() == r["valid"].size - 1
  assert np.isfinite(r["dsm"][5, 5]) and 1.0 <= r["dsm"][5, 5] <= 1.7


def test_windows_and_file_split_do_not_change_the_mosaic(tmp_path):
  xyz, cls = _cloud(seed=1)
  write_las(tmp_path / "all.laz", xyz, cls, crs="EPSG:32631")
  west = xyz[:, 0] < X0 + 9
  write_las(tmp_path / "w.laz", xyz[west], cls[west], crs="EPSG:32631")
  write_las(tmp_path / "e.las", xyz[~west], cls[~west], crs="EPSG:32631")
  kw = dict(cell_size=1.0, progress=False, dtm_fill_px=10)
  one = _read(las_to_rasters([tmp_path / "all.laz"], tmp_path / "one", window_px=64, **kw))
  many = _read(
    las_to_rasters(
      [tmp_path / "w.laz", tmp_path / "e.las"], tmp_path / "many", window_px=7, chunk_size=50, **kw
    )
  )
  for k in one:
    np.testing.assert_array_equal(one[k], many[k], err_msg=k)


def test_given_bounds_fix_the_grid_whatever_the_files_cover(tmp_path):
  """Two surveys of one place on one grid (Amsterdam AHN2 / AHN3): the extent comes from the caller."""
  xyz, cls = _cloud(seed=2)
  part = xyz[:, 0] < X0 + 9
  write_las(tmp_path / "all.laz", xyz, cls, crs="EPSG:32631")
  write_las(tmp_path / "part.laz", xyz[part], cls[part], crs="EPSG:32631")
  kw = dict(
    cell_size=1.0, progress=False, dtm_fill_px=10, bounds=(X0 - 4.5, Y0, X0 + 24, Y0 + 20.5)
  )
  whole, west = (
    las_to_rasters([tmp_path / f], tmp_path / f[:-4], **kw) for f in ("all.laz", "part.laz")
  )
  with rasterio.open(whole["dsm"]) as a, rasterio.open(west["dsm"]) as b:
    assert a.transform == b.transform and a.shape == b.shape == (
      22,
      30,
    )  # snapped outward, +1 edge cell
    assert (a.bounds.left, a.bounds.top) == (X0 - 5, Y0 + 21)
  w, p = _read(whole), _read(west)
  # cell (r, c) of the cloud is at row r + 1, col c + 5; the partial survey's cells agree where it has points
  np.testing.assert_array_equal(w["dsm"][1:21, 5:14], p["dsm"][1:21, 5:14])
  assert p["valid"][:, 14:].sum() == 0 and w["valid"][1:21, 14:25].all()
  with pytest.raises(ValueError, match="empty bounds"):
    las_to_rasters(
      [tmp_path / "all.laz"],
      tmp_path / "x",
      cell_size=1.0,
      bounds=(X0, Y0, X0, Y0 + 1),
      progress=False,
    )


def test_crs_missing_mismatched_or_given(tmp_path):
  xyz, cls = _cloud()
  write_las(tmp_path / "nocrs.laz", xyz, cls)
  write_las(tmp_path / "utm.laz", xyz, cls, crs="EPSG:32631")
  with pytest.raises(DataError, match="nocrs.laz: header has no CRS"):
    inspect_las(tmp_path / "nocrs.laz")
  assert inspect_las(tmp_path / "nocrs.laz", "EPSG:32631").crs.to_epsg() == 32631
  with pytest.raises(DataError, match="utm.laz: header CRS EPSG:32631 differs"):
    inspect_las(tmp_path / "utm.laz", "EPSG:28992")


def test_corrupt_and_truncated_laz_name_the_file_and_leave_nothing(tmp_path):
  (tmp_path / "junk.laz").write_bytes(b"definitely not a point cloud" * 10)
  with pytest.raises(DataError, match="junk.laz: not a readable LAS/LAZ"):
    las_to_rasters([tmp_path / "junk.laz"], tmp_path / "r1", crs="EPSG:32631", progress=False)
  xyz, cls = _cloud()
  write_las(tmp_path / "cut.laz", xyz, cls, crs="EPSG:32631")
  data = (tmp_path / "cut.laz").read_bytes()
  (tmp_path / "cut.laz").write_bytes(data[: len(data) * 2 // 3])
  with pytest.raises(DataError, match="cut.laz: failed while reading points"):
    las_to_rasters([tmp_path / "cut.laz"], tmp_path / "r2", cell_size=1.0, progress=False)
  assert not any(p.suffix == ".tif" for p in (tmp_path / "r2").glob("*"))
  assert not list((tmp_path / "r2").glob("*"))  # no temporary files either


def test_refuses_to_replace_outputs_unless_asked(tmp_path):
  xyz, cls = _cloud()
  write_las(tmp_path / "a.laz", xyz, cls, crs="EPSG:32631")
  las_to_rasters([tmp_path / "a.laz"], tmp_path / "r", cell_size=1.0, progress=False)
  with pytest.raises(FileExistsError, match="dsm.tif already exists"):
    las_to_rasters([tmp_path / "a.laz"], tmp_path / "r", cell_size=1.0, progress=False)
  las_to_rasters(
    [tmp_path / "a.laz"], tmp_path / "r", cell_size=2.0, progress=False, overwrite=True
  )
  assert rasterio.open(tmp_path / "r" / "dsm.tif").res == (2.0, 2.0)


def _dense_cloud(per_m2=16, size=20, seed=0):
  """`per_m2` random points per m2: ground at 1 m, a 4 x 4 m roof at 9 m over cells [10:14]."""
  rng = np.random.default_rng(seed)
  n = per_m2 * size * size
  x, y = rng.uniform(0, size, n), rng.uniform(0, size, n)
  roof = (x >= 10) & (x < 14) & (size - y >= 10) & (size - y < 14)
  z = np.where(roof, 9.0, 1.0) + rng.uniform(0, 0.1, n)
  return np.c_[X0 + x, Y0 + y, z], np.where(roof, 6, 2)


def test_max_density_keeps_that_share_of_points_whatever_the_windows(tmp_path):
  import laspy

  from data_pipelines.lidar import keep_fraction, thinned

  xyz, cls = _dense_cloud()
  write_las(tmp_path / "a.laz", xyz, cls, crs="EPSG:32631")
  lf = inspect_las(tmp_path / "a.laz")
  assert keep_fraction(lf, 4.0) == pytest.approx(4.0 * 20 * 20 / len(xyz), rel=0.02)
  assert keep_fraction(lf, 100.0) == 1.0 and keep_fraction(lf, None) == 1.0
  kept = thinned(laspy.read(tmp_path / "a.laz").points, 0.25)
  assert 0.22 < len(kept) / len(xyz) < 0.28
  kw = dict(cell_size=1.0, progress=False, dtm_fill_px=10, max_density=4.0)
  one = las_to_rasters([tmp_path / "a.laz"], tmp_path / "one", window_px=64, **kw)
  many = las_to_rasters([tmp_path / "a.laz"], tmp_path / "many", window_px=7, chunk_size=50, **kw)
  full = _read(
    las_to_rasters([tmp_path / "a.laz"], tmp_path / "full", **{**kw, "max_density": None})
  )
  one, many = _read(one), _read(many)
  for k in one:  # the same points kept in every window, halo and chunk
    np.testing.assert_array_equal(one[k], many[k], err_msg=k)
  # 16 returns a cell hit every cell; ~4 leave some empty (e^-4: 2 %); the roof stays a roof
  inner = np.s_[2:18, 2:18]
  assert full["valid"][inner].all() and 0.9 < one["valid"][inner].mean() < 1.0
  assert (one["ndsm"][10:14, 10:14] > 7.5).all() and one["class"][11, 11] == 6
  with rasterio.open(tmp_path / "one" / "dsm.tif") as src:
    assert src.tags()["max_density"] == "4.0"
  untouched = _read(
    las_to_rasters([tmp_path / "a.laz"], tmp_path / "big", **{**kw, "max_density": 99})
  )
  for k in full:  # a density above the survey's keeps every point
    np.testing.assert_array_equal(full[k], untouched[k], err_msg=k)
  with pytest.raises(ValueError, match="max_density"):
    las_to_rasters([tmp_path / "a.laz"], tmp_path / "bad", **{**kw, "max_density": 0})
