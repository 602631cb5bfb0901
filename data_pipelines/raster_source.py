"""Random square crops of real elevation rasters as NumPy batches, resumable and multi-host.

Sample `j` of global step `s` is a pure function of (seed, s, j): a resumed run, or a run split
over several processes (each producing only its own rows of the global batch), sees exactly the
batches of one uninterrupted single-process run. Crops touching nodata (SRTM voids) are redrawn.
By default each crop is scaled to [0, 1] by its own min and max (the paper's per-tile
normalisation); `normalisation="relative"` or `"ndsm"` instead normalises the batch of raw crops
with `data_pipelines.normalisation.normalise_numpy`, the function finetuning and prediction use,
so pretraining sees inputs on the scale the encoder meets later. Flat crops (max - min of the raw
metres below `min_relief`) are redrawn in every mode, since they carry no shape to learn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

MAX_TRIES = 100
NORMALISATIONS = ("minmax", "relative", "ndsm")  # "ndsm": the rasters given are nDSM rasters


@dataclasses.dataclass(frozen=True)
class CropWindow:
  """Where sample (step, index) comes from: raster `raster`, rows y:y+size, cols x:x+size, then
  `rot` quarter turns (np.rot90) and a left-right flip if `flip`."""

  raster: int
  y: int
  x: int
  size: int
  rot: int = 0
  flip: bool = False


def read_elevation(path: str | Path) -> np.ndarray:
  """The one band of a GeoTIFF / .hgt as float32 with nodata as NaN (several bands: an error,
  data_pipelines.raster_io's one band rule). Geographic CRSs are fine here: crops are scaled by
  their own min and max, so no cell size is compared."""
  from data_pipelines.raster_io import check_elevation_range, elevation_band, open_raster, read_band

  with open_raster(path) as src:
    band = read_band(src, band=elevation_band(src, None, flag=None)).astype(np.float32)
    nodata = src.nodata
  if nodata is not None:
    band[band == np.float32(nodata)] = np.nan
  if Path(path).suffix.lower() == ".hgt":
    band[band <= -32768] = np.nan  # SRTM void
  check_elevation_range(band, np.isfinite(band), path)
  return band


class RasterCrops:
  """`batches(start_step, rows=(a, b))` yields {"image": float32 [b - a, crop, crop, 1]}.

  `normalisation` "minmax" (default), "relative" (height above the crop's `low_percentile`
  percentile / `scale_m`, clipped to [0, 1]) or "ndsm" (the rasters are nDSMs: / `scale_m`,
  clipped); see data_pipelines/normalisation.py."""

  def __init__(
    self,
    rasters: Sequence[np.ndarray],
    crop: int,
    global_batch: int,
    *,
    seed: int = 0,
    augment: bool = True,
    min_relief: float = 1.0,
    names: Sequence[str] | None = None,
    normalisation: str = "minmax",
    scale_m: float = 30.0,
    low_percentile: float = 2.0,
  ):
    if normalisation not in NORMALISATIONS:
      raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    self.normalisation, self.scale_m = normalisation, float(scale_m)
    self.low_percentile = float(low_percentile)
    self.rasters = [np.asarray(r, np.float32) for r in rasters]
    self.names = list(names or [f"raster{i}" for i in range(len(self.rasters))])
    self.crop, self.global_batch, self.seed = int(crop), int(global_batch), int(seed)
    self.augment, self.min_relief = augment, float(min_relief)
    for name, r in zip(self.names, self.rasters):
      if r.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D elevation grid, got shape {r.shape}")
      if min(r.shape) < self.crop:
        raise ValueError(
          f"{name}: {r.shape[0]}x{r.shape[1]} is smaller than one {crop}x{crop} crop"
        )
    if not self.rasters:
      raise ValueError("no rasters given")
    # Files are drawn in proportion to the crops they hold.
    sizes = np.array(
      [(r.shape[0] - crop + 1) * (r.shape[1] - crop + 1) for r in self.rasters], np.float64
    )
    self.weights = sizes / sizes.sum()

  @classmethod
  def from_files(cls, paths: Sequence[str | Path], crop: int, global_batch: int, **kw):
    return cls(
      [read_elevation(p) for p in paths],
      crop,
      global_batch,
      names=[Path(p).name for p in paths],
      **kw,
    )

  def window(self, step: int, index: int) -> CropWindow:
    """The crop sample (step, index) takes: a pure function of (seed, step, index)."""
    rng = np.random.default_rng([self.seed, step, index])
    c = self.crop
    for _ in range(MAX_TRIES):
      i = rng.choice(len(self.rasters), p=self.weights)
      r = self.rasters[i]
      y = int(rng.integers(0, r.shape[0] - c + 1))
      x = int(rng.integers(0, r.shape[1] - c + 1))
      tile = r[y : y + c, x : x + c]
      if np.isnan(tile).any():
        continue
      if float(tile.max()) - float(tile.min()) < self.min_relief:
        continue
      rot, flip = 0, False
      if self.augment:  # the draws in the order the min-max-only version made them
        rot = int(rng.integers(4))
        flip = bool(rng.integers(2))
      return CropWindow(int(i), y, x, c, rot, flip)
    raise ValueError(
      f"no valid {c}x{c} crop found in {MAX_TRIES} tries (step {step}, sample "
      f"{index}): the rasters are mostly nodata or flat"
    )

  def raw(self, w: CropWindow) -> np.ndarray:
    """The window's metres, rotated and flipped as the sample is (before normalisation)."""
    tile = self.rasters[w.raster][w.y : w.y + w.size, w.x : w.x + w.size]
    tile = np.rot90(tile, k=w.rot)
    return np.ascontiguousarray(tile[:, ::-1] if w.flip else tile, np.float32)

  def sample(self, step: int, index: int) -> np.ndarray:
    """Sample (step, index) normalised: [crop, crop] float32."""
    w = self.window(step, index)
    if self.normalisation != "minmax":
      return self.normalise(self.raw(w)[None])[0, ..., 0]
    tile = self.rasters[w.raster][w.y : w.y + w.size, w.x : w.x + w.size]
    lo, hi = float(tile.min()), float(tile.max())
    tile = (tile - lo) / (hi - lo)  # NumPy, as before normalise_numpy existed: bit-identical
    tile = np.rot90(tile, k=w.rot)
    if w.flip:
      tile = tile[:, ::-1]
    return np.ascontiguousarray(tile, np.float32)

  def normalise(self, raw: np.ndarray) -> np.ndarray:
    """Raw crops [B, H, W] (metres, no NaN) -> [B, H, W, 1] by `normalise_numpy` ("relative",
    "ndsm"), the function the finetuning reader and the predictor use."""
    from data_pipelines.normalisation import normalise_numpy  # TensorFlow: only when needed

    kw = {"ndsm": raw} if self.normalisation == "ndsm" else {"low_percentile": self.low_percentile}
    return normalise_numpy(raw, None, self.normalisation, scale_m=self.scale_m, **kw)

  def batch(self, step: int, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    a, b = rows or (0, self.global_batch)
    if self.normalisation == "minmax":
      return {"image": np.stack([self.sample(step, j) for j in range(a, b)])[..., None]}
    # one call per batch: TF eager per crop would cost more than cutting the crops
    return {
      "image": self.normalise(np.stack([self.raw(self.window(step, j)) for j in range(a, b)]))
    }

  def batches(
    self, start_step: int = 0, rows: tuple[int, int] | None = None
  ) -> Iterator[dict[str, np.ndarray]]:
    step = start_step
    while True:
      yield self.batch(step, rows)
      step += 1
