"""Per-pixel uncertainty of a prediction, from its class probabilities.

The uncertainty is the predictive entropy of the (test-time augmentation averaged, window blended)
class probabilities, normalised by log(K) to [0, 1]: 0 where one class has all the probability, 1
where all K classes are equally likely. With `--tta` the probabilities are the mean over the 8
square symmetries, so the entropy also grows where the symmetries disagree (the entropy of a mean
is at least the mean entropy; the difference is the symmetries' mutual information).

The raster is computed block by block from the probability GeoTIFF (memory flat in its size) and
written as a Cloud-Optimized GeoTIFF (float32, NaN = nodata, gis/cog.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio

from data_pipelines.raster_io import open_raster
from demmae_jax.gis import cog


def normalised_entropy(probs: np.ndarray, axis: int = 0) -> np.ndarray:
  """-sum p log p / log K along `axis` (the classes), in [0, 1]; NaN where any p is NaN."""
  probs = np.asarray(probs, np.float32)
  k = probs.shape[axis]
  if k < 2:
    raise ValueError(f"entropy needs at least 2 classes; got {k}")
  p = np.clip(probs, 0.0, 1.0)
  with np.errstate(divide="ignore", invalid="ignore"):
    h = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=axis) / np.log(k)
  h = np.clip(h, 0.0, 1.0).astype(np.float32)
  h[np.isnan(probs).any(axis=axis)] = np.nan
  return h


def write_uncertainty(probabilities: str | Path, out: str | Path, overwrite: bool = False) -> Path:
  """The normalised entropy of a probability GeoTIFF (one band per class) into `out` (a COG on
  the same grid), block by block."""
  with open_raster(probabilities) as src:
    if src.count < 2:
      raise ValueError(
        f"{probabilities}: a probability raster has one band per class (>= 2); it has {src.count}"
      )
    profile = dict(
      driver="GTiff",
      width=src.width,
      height=src.height,
      crs=src.crs,
      transform=src.transform,
      count=1,
      dtype="float32",
      nodata=float("nan"),
      tiled=True,
      blockxsize=cog.BLOCK,
      blockysize=cog.BLOCK,
      compress="deflate",
    )
    with cog.cog_output(out, overwrite, "average", predictor=3) as staged:
      with rasterio.open(staged, "w", **profile) as dst:
        dst.set_band_description(
          1, "normalised entropy of the class probabilities (0 sure, 1 unsure)"
        )
        dst.update_tags(source=Path(probabilities).name, measure="normalised_entropy")
        for _, win in dst.block_windows(1):
          dst.write(normalised_entropy(src.read(window=win)), 1, window=win)
  return Path(out)
