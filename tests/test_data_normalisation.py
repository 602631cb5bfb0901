"""Normalisation modes: the one tf definition, checked against plain NumPy formulas."""

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines.normalisation import normalise, normalise_numpy


@pytest.fixture
def tiles():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(4, 96, 96)) * 5 + 50).astype(np.float32)
  valid = rng.random((4, 96, 96)) > 0.1
  return x, valid


def test_minmax_is_per_tile_over_valid_pixels(tiles):
  x, valid = tiles
  x = x.copy()
  x[~valid] = 1e6  # invalid values must not move the range
  out = normalise_numpy(x, valid, "minmax", channels=3)
  assert out.shape == (4, 96, 96, 3) and np.array_equal(out[..., 0], out[..., 2])
  for i in range(4):
    lo, hi = x[i][valid[i]].min(), x[i][valid[i]].max()
    np.testing.assert_allclose(
      out[i, ..., 0][valid[i]], (x[i][valid[i]] - lo) / (hi - lo), atol=1e-6
    )
    assert (out[i, ..., 0][~valid[i]] == 0).all()
  assert (normalise_numpy(np.full((8, 8), 3.0), None, "minmax") == 0).all()  # flat tile, no NaN


def test_zscore_uses_the_given_global_statistics(tiles):
  x, valid = tiles
  out = normalise_numpy(x, valid, "zscore", stats={"mean": 50.0, "std": 5.0})[..., 0]
  np.testing.assert_allclose(out[valid], (x[valid] - 50) / 5, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="zscore needs stats"):
    normalise_numpy(x, valid, "zscore")


def test_relative_height_is_above_the_low_percentile_in_fixed_metres(tiles):
  x, valid = tiles
  out = normalise_numpy(x, valid, "relative", scale_m=20.0, low_percentile=2.0)[..., 0]
  for i in range(4):
    # 96 x 96 > 4096 pixels: the percentile is taken on every 2nd row and column
    sub = x[i, ::2, ::2][valid[i, ::2, ::2]]
    p2 = np.sort(sub)[int(np.floor(0.02 * (sub.size - 1)))]
    np.testing.assert_allclose(
      out[i][valid[i]], np.clip((x[i][valid[i]] - p2) / 20, 0, 1), atol=1e-6
    )


@pytest.mark.parametrize("shape", [(224, 224), (64, 64), (96, 96), (17, 33), (1, 1)])
@pytest.mark.parametrize("q", [0.0, 2.0, 10.0, 50.0, 98.0, 100.0])
def test_percentile_selection_equals_the_full_sort(shape, q):
  from data_pipelines.normalisation import _masked_percentile, sorted_percentile

  rng = np.random.default_rng(int(q) * 1000 + shape[0])
  b = 6
  x = (rng.normal(size=(b, *shape)) * 5 + 50).astype(np.float16).astype(np.float32)
  x[1] = np.round(x[1])  # many ties
  valid = rng.random((b, *shape)) > np.array([0, 0.1, 0.5, 0.99, 1.0, 0.0])[:, None, None]
  x[2][valid[2]] = -x[2][valid[2]]  # negative heights
  want = sorted_percentile(tf.constant(x), tf.constant(valid), q).numpy()
  got = _masked_percentile(tf.constant(x), tf.constant(valid), q).numpy()
  np.testing.assert_array_equal(got, want)  # bit for bit, the empty tile (inf) included
  out = normalise(tf.constant(x), tf.constant(valid), "relative", low_percentile=q).numpy()
  lo = want[:, None, None]
  np.testing.assert_array_equal(
    out[..., 0], np.where(valid, np.clip((x - lo) / np.float32(30.0), 0, 1), 0)
  )


def test_ndsm_mode_scales_height_above_ground():
  ndsm = np.array([[0.0, 3.0], [15.0, 60.0]], np.float32)
  out = normalise_numpy(np.zeros((2, 2)), np.ones((2, 2), bool), "ndsm", ndsm=ndsm, scale_m=30.0)
  np.testing.assert_allclose(out[..., 0], [[0, 0.1], [0.5, 1.0]])
  with pytest.raises(ValueError, match="ndsm mode needs"):
    normalise_numpy(np.zeros((2, 2)), None, "ndsm")


def test_numpy_entry_point_treats_nan_as_invalid_and_matches_batched_tf():
  x = np.arange(16, dtype=np.float32).reshape(4, 4)
  x[0, 0] = np.nan
  single = normalise_numpy(x, None, "minmax")[..., 0]
  assert single[0, 0] == 0 and single[0, 1] == 0 and single[3, 3] == 1
  batched = normalise(
    tf.constant(np.nan_to_num(x)[None]), tf.constant(np.isfinite(x)[None]), "minmax"
  ).numpy()
  np.testing.assert_array_equal(batched[0, ..., 0], single)
  with pytest.raises(ValueError, match="unknown or repeated normalisation mode"):
    normalise_numpy(x, None, "histogram")


def test_modes_joined_by_plus_stack_one_channel_per_mode(tiles):
  x, valid = tiles
  ndsm = np.maximum(x - 45.0, 0)
  both = normalise(
    tf.constant(x), tf.constant(valid), "relative+ndsm", ndsm=tf.constant(ndsm), channels=2
  ).numpy()
  assert both.shape == (4, 96, 96, 2)
  rel = normalise(tf.constant(x), tf.constant(valid), "relative").numpy()[..., 0]
  nd = normalise(tf.constant(x), tf.constant(valid), "ndsm", ndsm=tf.constant(ndsm)).numpy()[..., 0]
  np.testing.assert_array_equal(both[..., 0], rel)
  np.testing.assert_array_equal(both[..., 1], nd)
  with pytest.raises(ValueError, match="gives 2 channels, not 1"):
    normalise(tf.constant(x), tf.constant(valid), "relative+ndsm", ndsm=tf.constant(ndsm))
  with pytest.raises(ValueError, match="unknown or repeated"):
    normalise(tf.constant(x), tf.constant(valid), "relative+relative", channels=2)
