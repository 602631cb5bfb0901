"""Resampling a raster to another cell size: same extent and CRS, exact on planes, labels stay classes."""

import numpy as np
import pytest
import rasterio
import rasterio.transform

from data_pipelines.errors import DataError
from data_pipelines.labels import IGNORE
from data_pipelines.resample import resample_raster

X0, Y0 = 500_000.0, 5_000_000.0


def _write(path, a, cell, nodata=None, crs="EPSG:32631"):
  with rasterio.open(
    path,
    "w",
    driver="GTiff",
    width=a.shape[1],
    height=a.shape[0],
    count=1,
    dtype=a.dtype,
    crs=crs,
    transform=rasterio.transform.from_origin(X0, Y0, cell, cell),
    nodata=nodata,
  ) as d:
    d.write(a, 1)
  return path


def test_refining_elevation_is_bilinear_and_keeps_the_extent(tmp_path):
  rows, cols = np.mgrid[0:20, 0:30]
  plane = (3.0 * cols - 2.0 * rows + 100).astype(np.float32)  # metres per 2 m cell
  plane[5, 5] = -9999
  src = _write(tmp_path / "dsm.tif", plane, 2.0, nodata=-9999)
  out = resample_raster(src, tmp_path / "dsm1.tif", 1.0)
  with rasterio.open(out) as r, rasterio.open(src) as s:
    a = r.read(1)
    assert r.res == (1.0, 1.0) and r.crs == s.crs and r.bounds == s.bounds and a.shape == (40, 60)
  # bilinear reproduces a plane: the 1 m cell centred at 2 m-cell coordinates (i/2 - 1/4, j/2 - 1/4)
  i, j = np.mgrid[0:40, 0:60]
  truth = 3.0 * (j / 2 - 0.25) - 2.0 * (i / 2 - 0.25) + 100
  far = (np.abs(i // 2 - 5) > 2) | (np.abs(j // 2 - 5) > 2)
  inner = far & (i > 1) & (i < 38) & (j > 1) & (j < 58)
  np.testing.assert_allclose(a[inner], truth[inner], atol=1e-3)
  assert np.isnan(a[10:12, 10:12]).all()  # the nodata cell stays nodata, never a height of -9999
  assert np.nanmin(a) > 50


def test_coarsening_averages_elevation_and_takes_the_mode_of_labels(tmp_path):
  rng = np.random.default_rng(0)
  fine = rng.normal(size=(8, 12)).astype(np.float32)
  lab = np.zeros((8, 12), np.uint8)
  lab[:2, :2] = [[1, 1], [1, 0]]  # majority 1
  lab[2:4, 2:4] = [[0, 0], [1, 0]]  # majority 0
  e = resample_raster(_write(tmp_path / "e.tif", fine, 1.0), tmp_path / "e2.tif", 2.0)
  l2 = resample_raster(_write(tmp_path / "l.tif", lab, 1.0), tmp_path / "l2.tif", 2.0, kind="label")
  coarse = rasterio.open(e).read(1)
  np.testing.assert_allclose(coarse, fine.reshape(4, 2, 6, 2).mean(axis=(1, 3)), atol=1e-6)
  with rasterio.open(l2) as r:
    got = r.read(1)
    assert r.dtypes[0] == "uint8" and r.nodata == IGNORE
  assert got[0, 0] == 1 and got[1, 1] == 0 and got.sum() == 1


def test_refining_labels_copies_each_cell(tmp_path):
  lab = np.arange(12, dtype=np.uint8).reshape(3, 4)
  out = resample_raster(
    _write(tmp_path / "l.tif", lab, 2.0), tmp_path / "l1.tif", 1.0, kind="label"
  )
  np.testing.assert_array_equal(rasterio.open(out).read(1), np.kron(lab, np.ones((2, 2), np.uint8)))


def test_bad_requests_are_refused(tmp_path):
  src = _write(tmp_path / "e.tif", np.zeros((4, 4), np.float32), 1.0)
  with pytest.raises(ValueError, match="kind"):
    resample_raster(src, tmp_path / "o.tif", 2.0, kind="landcover")
  with pytest.raises(ValueError, match="positive"):
    resample_raster(src, tmp_path / "o.tif", 0)
  nocrs = _write(tmp_path / "n.tif", np.zeros((4, 4), np.float32), 1.0, crs=None)
  with pytest.raises(DataError, match="n.tif: raster has no CRS"):
    resample_raster(nocrs, tmp_path / "o.tif", 2.0)
  resample_raster(src, tmp_path / "o.tif", 2.0)
  with pytest.raises(FileExistsError):
    resample_raster(src, tmp_path / "o.tif", 2.0)
