"""Flips and 90-degree rotations (the 8 symmetries of a square) on whole batches, in TF.

The batch is cut into `groups` consecutive groups (one tile per group when the batch is no larger)
and each group gets one random symmetry; every plane of a tile (elevation, validity, label) gets
the same one. One transform per group, not per tile, keeps the cost at one transpose/reverse pass
of the batch (a per-tile select computes all variants); the reader shuffles before batching, so
groups are random sets of tiles and each tile sees every symmetry over the epochs.
"""

from __future__ import annotations

import tensorflow as tf

GROUPS = 8


def _t(x: tf.Tensor) -> tf.Tensor:
  return tf.transpose(x, [0, 2, 1, *range(3, x.shape.rank)])


# the 8 symmetries, each with at most one transpose (the costly part) and one reverse
SYMMETRIES = (
  lambda x: x,  # identity
  lambda x: tf.reverse(_t(x), [1]),  # quarter turn
  lambda x: tf.reverse(x, [1, 2]),  # half turn
  lambda x: tf.reverse(_t(x), [2]),  # three quarter turns
  lambda x: tf.reverse(x, [1]),  # flip rows
  lambda x: tf.reverse(x, [2]),  # flip columns
  _t,  # transpose
  lambda x: tf.reverse(_t(x), [1, 2]),  # anti-transpose
)


def symmetry(x: tf.Tensor, i: int) -> tf.Tensor:
  """Symmetry i in 0..7 of x [B, H, W, ...]."""
  return SYMMETRIES[i](x)


def random_symmetries(
  planes: list[tf.Tensor], seed: tf.Tensor, groups: int = GROUPS
) -> list[tf.Tensor]:
  """The same random symmetry per group on every plane ([B, H, W, ...] each, square tiles)."""
  batch = tf.shape(planes[0])[0]
  static = planes[0].shape[0]
  n = min(groups, static) if static is not None else groups
  sizes = [(batch + n - 1 - g) // n for g in range(n)]  # near-equal, some may be 0 when dynamic
  picks = tf.random.stateless_uniform([n], seed, 0, 8, tf.int32)
  out = []
  for plane in planes:
    parts = tf.split(plane, tf.stack(sizes), num=n)
    out.append(
      tf.concat(
        [
          tf.switch_case(picks[g], [lambda p=p, f=f: f(p) for f in SYMMETRIES])
          for g, p in enumerate(parts)
        ],
        axis=0,
      )
    )
  return out


def random_coarsening(image: tf.Tensor, seed: tf.Tensor, prob: float, factor: int = 2) -> tf.Tensor:
  """With probability `prob` per tile, `image` [B, H, W, C] as a source `factor` times coarser
  would give it: block means, bilinearly interpolated back to the grid (as `resample.py` brings a
  2 m DSM to 1 m). A model trained only on fine LiDAR reads such smoothed crowns as roofs."""
  if prob <= 0:
    return image
  shape = tf.shape(image)
  coarse = tf.nn.avg_pool2d(image, factor, factor, "VALID")
  back = tf.image.resize(coarse, shape[1:3], "bilinear")
  pick = tf.random.stateless_uniform(tf.stack([shape[0], 1, 1, 1]), seed) < prob
  return tf.where(pick, back, image)


def random_closing(image: tf.Tensor, seed: tf.Tensor, prob: float, size: int = 3) -> tf.Tensor:
  """With probability `prob` per tile, `image` [B, H, W, C] as a denser survey would draw it: a
  `size` x `size` grey closing (max then min filter). A DSM cell is its highest return; with ~3
  returns a cell, tree crowns are pitted where all of them fell through the foliage, with ~15 (a
  dense survey) they are not: the closing fills pits (and gaps) narrower than `size` cells, and
  brings crowns of a 3.4 points/m2 survey to the roughness of a 14.6 points/m2 one at 1 m
  (docs/results_product.md). Heights only rise, and only into such pits."""
  if prob <= 0:
    return image
  up = tf.nn.max_pool2d(image, size, 1, "SAME")
  closed = -tf.nn.max_pool2d(-up, size, 1, "SAME")
  pick = tf.random.stateless_uniform(tf.stack([tf.shape(image)[0], 1, 1, 1]), seed) < prob
  return tf.where(pick, closed, image)
