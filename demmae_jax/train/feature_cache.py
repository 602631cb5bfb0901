"""The frozen-encoder feature cache (`config.cache_features`): the encoder's maps of every training
tile under each of the 8 square symmetries, computed once and kept in host memory, so the head
trains on (maps, label) batches and the training step never runs the encoder.

A ViT is not equivariant to rotations and flips, so each symmetry is applied to the input tile
before the encoder (with `data_pipelines.augment.symmetry`, the reader's own transforms) and
cached separately. The normalisation (per-tile min/max and percentiles, or global z-score) does
not depend on pixel order, so transforming the normalised tile equals normalising the
transformed one, as the reader does. The encoder has no dropout or drop-path, so its training
output is its evaluation output: the cached step computes the same function as the full one
(the head's dropout still draws from the step's key, tests/test_finetune_cache.py).

Batches: per sample a uniformly random tile and symmetry (with replacement), drawn from
(seed, step) alone, so a resumed run sees the same batches. The reader instead shuffles tiles and
applies one symmetry per group of a batch; both sample every (tile, symmetry) pair uniformly.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Iterator

import jax
import numpy as np
from flax import nnx

FEATURE_KEYS = ("feature_0", "feature_1", "feature_2", "feature_3")
SYMMETRIES = 8


@dataclasses.dataclass
class FeatureCache:
  features: list[np.ndarray]  # per neck input: [8 symmetries, N tiles, H/p, W/p, D]
  label: np.ndarray  # uint8 [8, N, H, W], 255 = ignore
  valid: np.ndarray  # uint8 [8, N, H, W]
  seconds: float  # time to build

  @property
  def num_tiles(self) -> int:
    return self.label.shape[1]

  @property
  def nbytes(self) -> int:
    return sum(f.nbytes for f in self.features) + self.label.nbytes + self.valid.nbytes

  def batches(
    self, start: int, global_batch: int, rows: tuple[int, int], seed: int
  ) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches {feature_0..3, label int32, valid float32} from batch `start` on; this
    process's `rows` of each global batch."""
    for step in itertools.count(start):
      rng = np.random.default_rng([seed, step])
      tile = rng.integers(0, self.num_tiles, global_batch)[rows[0] : rows[1]]
      sym = rng.integers(0, SYMMETRIES, global_batch)[rows[0] : rows[1]]
      yield {
        **{k: f[sym, tile] for k, f in zip(FEATURE_KEYS, self.features)},
        "label": self.label[sym, tile].astype(np.int32),
        "valid": self.valid[sym, tile].astype(np.float32),
      }


@jax.jit
def _maps(graphdef, state, images):
  return nnx.merge(graphdef, state).encoder_maps(images)


def build(
  model: nnx.Module,
  tiles: Iterator[dict[str, np.ndarray]],
  batch_size: int,
  *,
  max_ram_fraction: float = 0.5,
) -> FeatureCache:
  """The cache of a Segmenter's frozen encoder over `tiles`: finite, unaugmented batches
  {image, label, valid} (the whole training split). Refuses a cache larger than
  `max_ram_fraction` of the machine's memory."""
  import tensorflow as tf

  from data_pipelines.augment import symmetry

  t0 = time.perf_counter()
  batches = list(tiles)
  data = {k: np.concatenate([b[k] for b in batches]) for k in ("image", "label", "valid")}
  n = len(data["image"])
  if n == 0:
    raise ValueError("cache_features: the training split has no tile")
  graphdef, state = nnx.split(model)
  maps = jax.eval_shape(
    lambda x: _maps(graphdef, state, x),
    jax.ShapeDtypeStruct((1,) + data["image"].shape[1:], np.float32),
  )
  per_tile = SYMMETRIES * (sum(m.size * m.dtype.itemsize for m in maps) + 2 * data["label"][0].size)
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  if n * per_tile > max_ram_fraction * ram:
    raise ValueError(
      f"cache_features: {n} tiles x {SYMMETRIES} symmetries need "
      f"{n * per_tile / 2**30:.1f} GiB, over {max_ram_fraction:.0%} of this machine's "
      f"{ram / 2**30:.1f} GiB; use a smaller train split or cache_features=False"
    )
  features = [np.empty((SYMMETRIES, n) + m.shape[1:], m.dtype) for m in maps]
  planes = {}
  for s in range(SYMMETRIES):
    planes.update({(k, s): symmetry(tf.constant(data[k]), s).numpy() for k in ("label", "valid")})
    images = symmetry(tf.constant(data["image"]), s).numpy()
    for lo in range(0, n, batch_size):
      x = images[lo : lo + batch_size]
      k = len(x)
      if k < batch_size:  # one compiled shape
        x = np.concatenate([x, np.zeros((batch_size - k,) + x.shape[1:], x.dtype)])
      for f, m in zip(features, _maps(graphdef, state, x)):
        f[s, lo : lo + k] = np.asarray(m)[:k]
  stack = lambda k: np.stack([planes[k, s] for s in range(SYMMETRIES)]).astype(np.uint8)
  return FeatureCache(features, stack("label"), stack("valid"), time.perf_counter() - t0)
