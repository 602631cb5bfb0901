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
