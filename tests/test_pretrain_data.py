"""RasterCrops: deterministic by (seed, step, sample), split over processes without changing
the global batch, nodata and flat crops redrawn; the shared SRTM .hgt read with its voids."""

import numpy as np
import pytest

from data_pipelines.raster_source import RasterCrops, read_elevation
from test_train_support import jacksboro_dem


def test_same_step_gives_same_batch_and_process_rows_tile_the_global_batch():
  src = RasterCrops([jacksboro_dem()], 16, 8, seed=3)
  full = src.batch(5)["image"]
  assert full.shape == (8, 16, 16, 1) and full.dtype == np.float32
  np.testing.assert_array_equal(src.batch(5)["image"], full)
  halves = np.concatenate([src.batch(5, (0, 4))["image"], src.batch(5, (4, 8))["image"]])
  np.testing.assert_array_equal(halves, full)
  assert not np.array_equal(src.batch(6)["image"], full)
  # Resuming the iterator at step 5 yields step 5's batch.
  np.testing.assert_array_equal(next(src.batches(5))["image"], full)
  # Per-crop min-max: each crop spans [0, 1].
  np.testing.assert_allclose(full.min(axis=(1, 2, 3)), 0)
  np.testing.assert_allclose(full.max(axis=(1, 2, 3)), 1)


def test_nodata_and_flat_crops_are_redrawn_and_hopeless_rasters_fail_clearly():
  dem = jacksboro_dem().copy()
  dem[:, :200] = np.nan  # left half void
  dem[:100, 200:] = 250.0  # a flat lake
  src = RasterCrops([dem], 32, 64, seed=0)
  images = src.batch(0)["image"]
  assert np.isfinite(images).all()
  assert (images.max(axis=(1, 2, 3)) - images.min(axis=(1, 2, 3)) == 1).all()
  with pytest.raises(ValueError, match="no valid 8x8 crop"):
    RasterCrops([np.full((40, 40), np.nan, np.float32)], 8, 2).batch(0)
  with pytest.raises(ValueError, match="smaller than one"):
    RasterCrops([np.zeros((10, 10), np.float32)], 16, 2)


@pytest.mark.realdata
def test_reads_shared_srtm_hgt_with_voids_as_nan():
  from data_pipelines.shared_data import shared_file

  path = shared_file("pretrain/N44W072.hgt")  # New Hampshire, SRTM 3 arc-second
  dem = read_elevation(path)
  assert dem.shape == (1201, 1201)
  valid = dem[np.isfinite(dem)]
  assert valid.size > 0.99 * dem.size
  assert 0 < np.median(valid) < 2000 and valid.max() < 2000  # metres: Mount Washington is 1917


def _minmax_before_normalisation_modes(src: RasterCrops, step: int, index: int) -> np.ndarray:
  """RasterCrops.sample as it was before it had normalisation modes (frozen copy)."""
  rng = np.random.default_rng([src.seed, step, index])
  c = src.crop
  for _ in range(100):
    r = src.rasters[rng.choice(len(src.rasters), p=src.weights)]
    y = rng.integers(0, r.shape[0] - c + 1)
    x = rng.integers(0, r.shape[1] - c + 1)
    tile = r[y : y + c, x : x + c]
    if np.isnan(tile).any():
      continue
    lo, hi = float(tile.min()), float(tile.max())
    if hi - lo < src.min_relief:
      continue
    tile = (tile - lo) / (hi - lo)
    if src.augment:
      tile = np.rot90(tile, k=int(rng.integers(4)))
      if rng.integers(2):
        tile = tile[:, ::-1]
    return np.ascontiguousarray(tile, np.float32)
  raise AssertionError("no crop")


def _two_rasters():
  dem = jacksboro_dem().copy()
  dem[:, :120] = np.nan  # voids and a flat lake force redraws
  dem[:60, 200:] = 250.0
  return [dem, jacksboro_dem()[::-1, 50:250] * 0.5]


@pytest.mark.parametrize("augment", [True, False])
def test_minmax_default_is_bit_identical_to_before(augment):
  src = RasterCrops(_two_rasters(), 24, 16, seed=7, augment=augment)
  for step in (0, 3):
    got = src.batch(step)["image"]
    want = np.stack([_minmax_before_normalisation_modes(src, step, j) for j in range(16)])[
      ..., None
    ]
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("mode", ["relative", "ndsm"])
def test_modes_normalise_the_raw_crop_as_finetuning_does(mode):
  from data_pipelines.normalisation import normalise_numpy

  rasters = _two_rasters()
  # 0-25 m above the lowest point: heights like an nDSM's, some above scale_m
  rasters = [(r - np.nanmin(r)) * np.float32(25 / (np.nanmax(r) - np.nanmin(r))) for r in rasters]
  src = RasterCrops(rasters, 32, 12, seed=1, normalisation=mode, scale_m=10.0, low_percentile=5.0)
  images = src.batch(2)["image"]
  assert images.shape == (12, 32, 32, 1) and images.dtype == np.float32
  for j in range(12):
    w = src.window(2, j)
    raw = src.raw(w)
    # the window, rotated and flipped, is the raw crop
    cut = rasters[w.raster][w.y : w.y + 32, w.x : w.x + 32]
    np.testing.assert_array_equal(
      raw, np.rot90(cut, w.rot)[:, ::-1] if w.flip else np.rot90(cut, w.rot)
    )
    kw = dict(ndsm=raw) if mode == "ndsm" else dict(low_percentile=5.0)
    np.testing.assert_array_equal(images[j], normalise_numpy(raw, None, mode, scale_m=10.0, **kw))
    np.testing.assert_array_equal(images[j, ..., 0], src.sample(2, j))
    # and by hand: metres / 10 (above the crop's 5th percentile for relative), clipped
    lo = np.percentile(raw, 5.0, method="lower") if mode == "relative" else 0.0
    np.testing.assert_allclose(images[j, ..., 0], np.clip((raw - lo) / 10.0, 0, 1), atol=1e-6)
  # fixed metres, not a per-crop stretch: crops above 10 m clip, others stay below 1
  assert (images.reshape(12, -1).max(1) == 1).any() and (images.reshape(12, -1).max(1) < 1).any()
  with pytest.raises(ValueError, match="normalisation must be one of"):
    RasterCrops(rasters, 32, 2, normalisation="zscore")
