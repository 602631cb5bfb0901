"""Random square crops of real elevation rasters as NumPy batches, resumable and multi-host.

Sample `j` of global step `s` is a pure function of (seed, s, j): a resumed run, or a run split
over several processes (each producing only its own rows of the global batch), sees exactly the
batches of one uninterrupted single-process run. Crops touching nodata (SRTM voids) are redrawn.
Each crop is scaled to [0, 1] by its own min and max (the paper's per-tile normalisation); flat
crops (max - min below `min_relief` metres) are redrawn too, since they carry no shape to learn.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

MAX_TRIES = 100


def read_elevation(path: str | Path) -> np.ndarray:
  """The one band of a GeoTIFF / .hgt as float32 with nodata as NaN (several bands: an error,
  data_pipelines.raster_io's one band rule). Geographic CRSs are fine here: crops are scaled by
  their own min and max, so no cell size is compared."""
  from data_pipelines.raster_io import check_elevation_range, elevation_band, open_raster, read_band
  with open_raster(path) as src:
    band = read_band(src, band=elevation_band(src, None, flag=None)
                     ).astype(np.float32)
    nodata = src.nodata
  if nodata is not None:
    band[band == np.float32(nodata)] = np.nan
  if Path(path).suffix.lower() == ".hgt":
    band[band <= -32768] = np.nan  # SRTM void
  check_elevation_range(band, np.isfinite(band), path)
  return band


class RasterCrops:
  """`batches(start_step, rows=(a, b))` yields {"image": float32 [b - a, crop, crop, 1]}."""

  def __init__(self, rasters: Sequence[np.ndarray], crop: int, global_batch: int, *,
               seed: int = 0, augment: bool = True, min_relief: float = 1.0,
               names: Sequence[str] | None = None):
    self.rasters = [np.asarray(r, np.float32) for r in rasters]
    self.names = list(names or [f"raster{i}" for i in range(len(self.rasters))])
    self.crop, self.global_batch, self.seed = int(crop), int(global_batch), int(seed)
    self.augment, self.min_relief = augment, float(min_relief)
    for name, r in zip(self.names, self.rasters):
      if r.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D elevation grid, got shape {r.shape}")
      if min(r.shape) < self.crop:
        raise ValueError(f"{name}: {r.shape[0]}x{r.shape[1]} is smaller than one {crop}x{crop} crop")
    if not self.rasters:
      raise ValueError("no rasters given")
    # Files are drawn in proportion to the crops they hold.
    sizes = np.array([(r.shape[0] - crop + 1) * (r.shape[1] - crop + 1) for r in self.rasters],
                     np.float64)
    self.weights = sizes / sizes.sum()

  @classmethod
  def from_files(cls, paths: Sequence[str | Path], crop: int, global_batch: int, **kw):
    return cls([read_elevation(p) for p in paths], crop, global_batch,
               names=[Path(p).name for p in paths], **kw)

  def sample(self, step: int, index: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, step, index])
    c = self.crop
    for _ in range(MAX_TRIES):
      r = self.rasters[rng.choice(len(self.rasters), p=self.weights)]
      y = rng.integers(0, r.shape[0] - c + 1)
      x = rng.integers(0, r.shape[1] - c + 1)
      tile = r[y:y + c, x:x + c]
      if np.isnan(tile).any():
        continue
      lo, hi = float(tile.min()), float(tile.max())
      if hi - lo < self.min_relief:
        continue
      tile = (tile - lo) / (hi - lo)
      if self.augment:
        tile = np.rot90(tile, k=int(rng.integers(4)))
        if rng.integers(2):
          tile = tile[:, ::-1]
      return np.ascontiguousarray(tile, np.float32)
    raise ValueError(f"no valid {c}x{c} crop found in {MAX_TRIES} tries (step {step}, sample "
                     f"{index}): the rasters are mostly nodata or flat")

  def batch(self, step: int, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    a, b = rows or (0, self.global_batch)
    return {"image": np.stack([self.sample(step, j) for j in range(a, b)])[..., None]}

  def batches(self, start_step: int = 0, rows: tuple[int, int] | None = None
              ) -> Iterator[dict[str, np.ndarray]]:
    step = start_step
    while True:
      yield self.batch(step, rows)
      step += 1
