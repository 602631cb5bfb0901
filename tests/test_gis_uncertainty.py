"""Uncertainty raster (normalised entropy) and calibration (reliability, ECE) on small synthetic
rasters whose answers are known."""

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from data_pipelines.errors import DataError
from demmae_jax.gis import calibration, cog, uncertainty

CRS = "EPSG:28992"
TRANSFORM = from_origin(84800.0, 447650.0, 1.0, 1.0)


def write(path, data, dtype, nodata=None, transform=TRANSFORM):
  data = np.asarray(data)
  data = data[None] if data.ndim == 2 else data
  with rasterio.open(
    path,
    "w",
    driver="GTiff",
    width=data.shape[2],
    height=data.shape[1],
    count=data.shape[0],
    dtype=dtype,
    crs=CRS,
    transform=transform,
    nodata=nodata,
    tiled=True,
    blockxsize=64,
    blockysize=64,
  ) as dst:
    dst.write(data.astype(dtype))
  return path


def test_normalised_entropy_is_0_when_sure_1_when_uniform_and_nan_on_nodata():
  p = np.array([[1.0, 0.5, 0.9, np.nan], [0.0, 0.5, 0.1, np.nan]])
  h = uncertainty.normalised_entropy(p)
  np.testing.assert_allclose(
    h[:3], [0.0, 1.0, -(0.9 * np.log(0.9) + 0.1 * np.log(0.1)) / np.log(2)], rtol=1e-6
  )
  assert np.isnan(h[3])
  three = uncertainty.normalised_entropy(np.full((3, 2), 1 / 3))
  np.testing.assert_allclose(three, 1.0, rtol=1e-6)


def test_uncertainty_raster_is_a_cog_on_the_probabilities_grid(tmp_path):
  rng = np.random.default_rng(0)
  p1 = rng.uniform(0, 1, (300, 280)).astype(np.float32)
  p1[:10, :10] = np.nan
  probs = write(tmp_path / "p.tif", np.stack([1 - p1, p1]), "float32", nodata=np.nan)
  out = uncertainty.write_uncertainty(probs, tmp_path / "u.tif")
  assert cog.validate(out, strict=True)[0]
  with rasterio.open(out) as u:
    assert u.crs == rasterio.crs.CRS.from_string(CRS) and u.transform == TRANSFORM
    assert u.overviews(1) == [2]
    np.testing.assert_allclose(
      u.read(1), uncertainty.normalised_entropy(np.stack([1 - p1, p1])), rtol=1e-6, equal_nan=True
    )
  with pytest.raises(FileExistsError, match="u.tif"):
    uncertainty.write_uncertainty(probs, out)


def test_ece_is_zero_when_calibrated_and_the_gap_when_overconfident(tmp_path):
  n = 100 * 100
  p1 = np.full(n, 0.8, np.float32)  # 80 % sure of class 1 everywhere
  labels = np.zeros(n, np.uint8)
  labels[: int(0.8 * n)] = 1  # right 80 % of the time: calibrated
  rel = calibration.Reliability.empty(10, low=0.5)
  rel.add(np.stack([1 - p1, p1]), labels)
  assert rel.ece() == pytest.approx(0.0, abs=1e-6) and rel.total == n
  labels[:] = 1  # always right at 80 % confidence: under-confident by 0.2
  sure = calibration.Reliability.empty(10, low=0.5)
  sure.add(np.stack([1 - p1, p1]), labels)
  assert sure.ece() == pytest.approx(0.2, abs=1e-6)


def test_reliability_of_rasters_skips_ignored_and_nodata_pixels(tmp_path):
  p1 = np.full((128, 128), 0.9, np.float32)
  labels = np.ones((128, 128), np.uint8)
  labels[:, :64] = 0  # wrong where confident ...
  labels[:, :64][:, :32] = 255  # ... but half of that is unlabelled
  p1[:, 32:64] = np.nan  # and the other half has no probability
  probs = write(tmp_path / "p.tif", np.stack([1 - p1, p1]), "float32", nodata=np.nan)
  lab = write(tmp_path / "l.tif", labels, "uint8")
  rel = calibration.reliability_of_rasters(probs, lab)
  assert rel.total == 128 * 64 and rel.ece() == pytest.approx(0.1, abs=1e-5)
  png = calibration.plot_reliability({"synthetic": rel}, tmp_path / "r.png")
  assert png.read_bytes()[:4] == b"\x89PNG"
  shifted = write(
    tmp_path / "l2.tif", labels, "uint8", transform=from_origin(84000.0, 447000.0, 1.0, 1.0)
  )
  with pytest.raises(DataError, match="l2.tif"):
    calibration.reliability_of_rasters(probs, shifted)


def test_uncertainty_of_errors_finds_the_wrong_pixels_where_uncertainty_is_high(tmp_path):
  rng = np.random.default_rng(1)
  p1 = rng.uniform(0, 1, (128, 128)).astype(np.float32)
  probs = np.stack([1 - p1, p1])
  truth = (p1 > 0.5).astype(np.uint8)
  flip = (np.abs(p1 - 0.5) < 0.1) & (rng.uniform(size=p1.shape) < 0.5)  # errors only when unsure
  labels = np.where(flip, 1 - truth, truth)
  p = write(tmp_path / "p.tif", probs, "float32", nodata=np.nan)
  lab = write(tmp_path / "l.tif", labels, "uint8")
  u = write(tmp_path / "u.tif", uncertainty.normalised_entropy(probs), "float32", nodata=np.nan)
  got = calibration.uncertainty_of_errors(p, lab, u)
  assert got["error_rate"] == pytest.approx(flip.mean())
  assert got["mean_uncertainty_wrong"] > 0.9 > got["mean_uncertainty_correct"]
  assert got["error_rate_least_uncertain_tenth"] == 0.0
  assert got["error_rate_most_uncertain_tenth"] > 0.3
  assert all(share >= 0.1 for share in got["tenths_pixel_shares"])
