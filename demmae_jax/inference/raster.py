"""Sliding-window prediction over a single-band elevation GeoTIFF of any size, in bounded memory.

Windows of `tile` pixels lie on one global grid (stride = tile - overlap, the last row and column
snapped to the raster's edge). The raster is processed in output blocks of `block` pixels; each
block reads only the windows that touch it (plus their halo), blends their class probabilities with
a 2-D Hann weight, and writes its classes (and optionally probabilities) by rasterio windows. A
pixel's value is the same weighted sum of the same windows as in one whole-raster pass, so the
block size changes the memory (about (block + 2 tile)^2 x classes floats), never the map.
GDAL's block cache is capped too (`gdal_cache_mb`): by default it keeps every block read.

Invalid input (the raster's nodata, NaN or inf) is documented behaviour, not an error: holes are
filled (rasterio.fill) only so that windows can be fed to the network, and their output pixels
are written as nodata (255 for classes, NaN for probabilities). Windows with no valid pixel are
skipped. A raster with no valid pixel at all is an error (DataError), and nothing is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import rasterio
import rasterio.features
import rasterio.fill
import shapely
import shapely.geometry
from rasterio.windows import Window
from tqdm.auto import tqdm

from data_pipelines.errors import DataError
from data_pipelines.raster_io import (
  check_elevation_range,
  elevation_band,
  open_raster,
  read_band,
  read_masks,
)
from demmae_jax.gis import cog, vector_io

CLASS_NODATA = 255
# (dem [B, t, t] float32 with holes filled, valid [B, t, t] bool) -> network input [B, t, t, C].
Normalise = Callable[[np.ndarray, np.ndarray], np.ndarray]
# network input [B, t, t, C] float32 -> class probabilities [B, t, t, K] float32.
ApplyFn = Callable[[np.ndarray], np.ndarray]


def below(heights: np.ndarray, min_height: float) -> np.ndarray:
  """Cells of a height-above-ground raster (masked or NaN cells never count) lower than
  `min_height`."""
  h = np.ma.filled(np.ma.asarray(heights, dtype=np.float64), np.nan)
  with np.errstate(invalid="ignore"):
    return h < min_height


def gate_classes(classes: np.ndarray, heights: np.ndarray, min_height: float, positive: int = 1):
  """A class map with its `positive` cells lower than `min_height` set to background (0): what
  `predict_raster` with `min_height` gives for a two-class model."""
  return np.where((classes == positive) & below(heights, min_height), 0, classes).astype(
    classes.dtype
  )


def window_offsets(size: int, tile: int, stride: int) -> list[int]:
  """Window starts covering [0, size): every `stride`, the last snapped to size - tile."""
  if size <= tile:
    return [0]
  offsets = list(range(0, size - tile + 1, stride))
  if offsets[-1] != size - tile:
    offsets.append(size - tile)
  return offsets


def hann_weights(tile: int) -> np.ndarray:
  """[tile, tile] separable Hann window sampled at pixel centres: high in the middle, small but
  non-zero at the edges (so pixels on the raster's border, seen by one window only, keep a
  weight), which hides the seams of overlapping windows."""
  w = np.sin(np.pi * (np.arange(tile) + 0.5) / tile) ** 2
  return np.outer(w, w).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PredictOptions:
  tile: int
  overlap: int
  batch_size: int = 8
  block: int = 1024  # output block side; memory ~ (block + 2 tile)^2 x classes floats
  band: int | None = None  # None: the raster must have exactly one band
  class_names: tuple[str, ...] = ("background", "foreground")
  positive: int = 1  # the class polygonised
  # input cells lower than this (the input must be height above ground, in metres) are never the
  # positive class (segmenter.min_height_m); None: the network's map as it is
  min_height: float | None = None
  # GDAL's block cache defaults to 5 % of RAM and keeps every block read: capped, memory stays flat.
  gdal_cache_mb: int = 64

  def __post_init__(self):
    if not 0 <= self.overlap < self.tile:
      raise ValueError(f"overlap must be in [0, tile={self.tile}); got {self.overlap}")
    if self.block < 1 or self.batch_size < 1:
      raise ValueError(
        f"block and batch_size must be positive; got {self.block}, {self.batch_size}"
      )


def open_elevation(path: str | Path, band: int | None = None, crs=None):
  """(dataset, band) of a GeoTIFF for prediction, refusing what would give a silently wrong map:
  a missing or unreadable file, a multi-band raster without an explicit band (the one band rule
  of data_pipelines.raster_io), a missing band, no CRS (unless `crs` is given)."""
  src = open_raster(path)
  with contextlib.ExitStack() as stack:
    stack.callback(src.close)
    band = elevation_band(src, band)
    if src.crs is None and crs is None:
      raise DataError(
        path,
        "has no CRS, so the output could not be georeferenced; pass --crs "
        "(e.g. EPSG:28992) if you know it",
      )
    if src.transform.is_identity:
      raise DataError(path, "has no geotransform (identity); the output could not be placed")
    stack.pop_all()
  return src, band


def _blocks(height: int, width: int, block: int) -> Iterator[Window]:
  for r in range(0, height, block):
    for c in range(0, width, block):
      yield Window(c, r, min(block, width - c), min(block, height - r))


def _touching(offsets: list[int], lo: int, hi: int, tile: int) -> list[int]:
  return [o for o in offsets if o < hi and o + tile > lo]


def _fill_holes(dem: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Interpolate holes from the valid pixels (inverse distance, reaching across the window)."""
  if valid.all():
    return dem
  return rasterio.fill.fillnodata(
    np.where(valid, dem, 0).astype(np.float32),
    mask=valid.astype(np.uint8),
    max_search_distance=sum(dem.shape),
  )


def _read_region(src, band: int, rows: tuple[int, int], cols: tuple[int, int], tile: int):
  """DEM and validity for [rows) x [cols), padded (invalid) up to one tile when the raster is
  smaller than a tile."""
  win = Window(
    cols[0], rows[0], min(cols[1], src.width) - cols[0], min(rows[1], src.height) - rows[0]
  )
  dem = read_band(src, window=win, band=band, out_dtype=np.float32)
  valid = (read_masks(src, band, window=win) > 0) & np.isfinite(dem)
  if src.nodata is not None and not np.isnan(src.nodata):
    valid &= dem != np.float32(src.nodata)
  check_elevation_range(dem, valid, src.name, f" in rows {rows[0]}.., columns {cols[0]}..")
  ph, pw = rows[1] - rows[0] - dem.shape[0], cols[1] - cols[0] - dem.shape[1]
  if ph or pw:
    dem = np.pad(dem, ((0, ph), (0, pw)), mode="edge")
    valid = np.pad(valid, ((0, ph), (0, pw)), constant_values=False)
  return dem, valid


def predict_block(
  src,
  band: int,
  win: Window,
  apply: ApplyFn,
  normalise: Normalise,
  opts: PredictOptions,
  offsets: tuple[list[int], list[int]],
  num_classes: int,
  progress=None,
):
  """Blended probabilities [h, w, K] (NaN where no valid window reached) and the input's validity
  [h, w] for one output block."""
  t, weights = opts.tile, hann_weights(opts.tile)
  r0, c0, h, w = win.row_off, win.col_off, win.height, win.width
  rows = _touching(offsets[0], r0, r0 + h, t)
  cols = _touching(offsets[1], c0, c0 + w, t)
  top, left = rows[0], cols[0]
  dem, valid = _read_region(src, band, (top, rows[-1] + t), (left, cols[-1] + t), t)
  acc = np.zeros(dem.shape + (num_classes,), np.float32)
  wsum = np.zeros(dem.shape, np.float32)

  def flush(batch, places):
    pad = [batch[-1]] * (opts.batch_size - len(batch))  # a fixed shape: one compile
    dems, valids = (np.stack([b[i] for b in batch + pad]) for i in (0, 1))
    probs = np.asarray(apply(normalise(dems, valids).astype(np.float32)))[: len(batch)]
    for (y, x0), p in zip(places, probs):
      acc[y : y + t, x0 : x0 + t] += p * weights[..., None]
      wsum[y : y + t, x0 : x0 + t] += weights
    if progress is not None:
      progress.update(len(batch))

  batch, places = [], []
  for oy in rows:
    for ox in cols:
      y, x0 = oy - top, ox - left
      v = valid[y : y + t, x0 : x0 + t]
      if not v.any():
        if progress is not None:
          progress.update(1)
        continue
      batch.append((_fill_holes(dem[y : y + t, x0 : x0 + t], v), v))
      places.append((y, x0))
      if len(batch) == opts.batch_size:
        flush(batch, places)
        batch, places = [], []
  if batch:
    flush(batch, places)
  y, x0 = r0 - top, c0 - left
  acc, wsum, valid = (
    acc[y : y + h, x0 : x0 + w],
    wsum[y : y + h, x0 : x0 + w],
    valid[y : y + h, x0 : x0 + w],
  )
  with np.errstate(invalid="ignore", divide="ignore"):
    probs = acc / wsum[..., None]
  probs[~valid | (wsum == 0)] = np.nan
  return probs, valid & (wsum > 0)


def count_windows(height, width, opts: PredictOptions) -> int:
  offsets = [window_offsets(n, opts.tile, opts.tile - opts.overlap) for n in (height, width)]
  total = 0
  for win in _blocks(height, width, opts.block):
    total += len(_touching(offsets[0], win.row_off, win.row_off + win.height, opts.tile)) * len(
      _touching(offsets[1], win.col_off, win.col_off + win.width, opts.tile)
    )
  return total


def predict_raster(
  src_path: str | Path,
  dst_path: str | Path,
  apply: ApplyFn,
  normalise: Normalise,
  opts: PredictOptions,
  *,
  probabilities_path=None,
  polygons_path=None,
  crs=None,
  overwrite: bool = False,
  progress: bool = True,
) -> dict:
  """Classes (uint8, nodata 255, colour table) to `dst_path`, optionally probabilities (float32, one band per
  class, nodata NaN) and positive-class polygons (GeoJSON or GeoPackage by extension). Same CRS,
  transform and size as the input; rasters are Cloud-Optimized GeoTIFFs with internal overviews
  (gis/cog.py); every output written atomically; existing outputs refused
  unless `overwrite`. Returns a summary (pixels per class, windows, paths)."""
  outputs = [Path(p) for p in (dst_path, probabilities_path, polygons_path) if p is not None]
  for p in outputs:  # refuse before any work is done
    if p.exists() and not overwrite:
      raise FileExistsError(f"{p} already exists; pass --overwrite to replace it")
  if polygons_path is not None and Path(polygons_path).suffix.lower() not in POLYGON_DRIVERS:
    raise ValueError(f"{polygons_path}: polygons are written as {sorted(POLYGON_DRIVERS)}")
  num_classes = len(opts.class_names)
  with contextlib.ExitStack() as stack:
    stack.enter_context(rasterio.Env(GDAL_CACHEMAX=opts.gdal_cache_mb))
    src, band = open_elevation(src_path, opts.band, crs)
    stack.enter_context(src)
    out_crs = src.crs if src.crs is not None else rasterio.crs.CRS.from_user_input(crs)
    profile = dict(
      driver="GTiff",
      width=src.width,
      height=src.height,
      crs=out_crs,
      transform=src.transform,
      tiled=True,
      blockxsize=256,
      blockysize=256,
      compress="deflate",
      BIGTIFF="IF_SAFER",
    )
    # streamed into a tiled GeoTIFF, copied into a Cloud-Optimized GeoTIFF when all went well
    tmp = stack.enter_context(cog.cog_output(dst_path, overwrite, "nearest"))
    dst = stack.enter_context(
      rasterio.open(tmp, "w", **profile, count=1, dtype="uint8", nodata=CLASS_NODATA)
    )
    dst.write_colormap(1, _colormap(num_classes))
    prob = None
    if probabilities_path is not None:
      ptmp = stack.enter_context(
        cog.cog_output(probabilities_path, overwrite, "average", predictor=3)
      )
      prob = stack.enter_context(
        rasterio.open(
          ptmp, "w", **profile, count=num_classes, dtype="float32", nodata=float("nan"), predictor=3
        )
      )
      for i, name in enumerate(opts.class_names):
        prob.set_band_description(i + 1, f"p({name})")
    polygons = _Polygons(src.transform, src.width, src.height) if polygons_path else None
    offsets = (
      window_offsets(src.height, opts.tile, opts.tile - opts.overlap),
      window_offsets(src.width, opts.tile, opts.tile - opts.overlap),
    )
    windows = count_windows(src.height, src.width, opts)
    bar = stack.enter_context(
      tqdm(total=windows, unit="win", disable=not progress, desc=f"predict {Path(src_path).name}")
    )  # closed on errors too
    counts = np.zeros(num_classes, np.int64)
    nodata_pixels = 0
    for win in _blocks(src.height, src.width, opts.block):
      probs, ok = predict_block(
        src, band, win, apply, _checked(normalise, src_path), opts, offsets, num_classes, bar
      )
      if opts.min_height is not None:
        low = below(src.read(band, window=win, masked=True), opts.min_height)
        probs[low, 0] += probs[low, opts.positive]  # the mass moves to the background class
        probs[low, opts.positive] = 0.0
      classes = np.where(ok, np.nan_to_num(probs).argmax(-1), CLASS_NODATA).astype(np.uint8)
      dst.write(classes, 1, window=win)
      if prob is not None:
        prob.write(np.moveaxis(probs, -1, 0), window=win)
      if polygons is not None:
        polygons.add(classes == opts.positive, win)
      counts += np.bincount(classes[ok].ravel(), minlength=num_classes)[:num_classes]
      nodata_pixels += int((~ok).sum())
    bar.close()
    if not counts.sum():  # raised before the outputs are committed: nothing is written
      raise DataError(
        src_path,
        "has no valid pixel (every pixel is nodata, NaN or inf): there is "
        "nothing to predict, so no output was written",
      )
    if polygons is not None:
      polygons.write(polygons_path, out_crs, opts.class_names[opts.positive], overwrite)
  return {
    "classes": str(dst_path),
    "probabilities": str(probabilities_path) if prob else None,
    "polygons": str(polygons_path) if polygons_path else None,
    "pixels_per_class": dict(zip(opts.class_names, counts.tolist())),
    "nodata_pixels": nodata_pixels,
    "windows": windows,
  }


def _checked(normalise: Normalise, path) -> Normalise:
  def run(dem, valid):
    x = normalise(dem, valid)
    if x.shape[:3] != dem.shape or x.ndim != 4:
      raise ValueError(f"normalise gave shape {x.shape} for windows {dem.shape}; want [B, t, t, C]")
    if not np.isfinite(x).all():
      raise DataError(path, "normalisation gave non-finite values; the elevation is unusable")
    return x

  return run


def _colormap(num_classes: int) -> dict:
  palette = [(0, 0, 0, 255), (230, 25, 75, 255), (60, 180, 75, 255), (0, 130, 200, 255)]
  return {i: palette[i % len(palette)] for i in range(num_classes)}


POLYGON_DRIVERS = vector_io.DRIVERS


class _Polygons:
  """Polygons of one class, vectorised block by block (rasterio.features.shapes); the pieces that
  touch an inner block edge are merged across blocks (shapely union) before writing."""

  def __init__(self, transform, width, height):
    self.transform, self.width, self.height = transform, width, height
    self.done, self.edge = [], []

  def add(self, mask: np.ndarray, win: Window):
    if not mask.any():
      return
    t = rasterio.windows.transform(win, self.transform)
    inner = (
      win.row_off > 0,
      win.col_off > 0,
      win.row_off + win.height < self.height,
      win.col_off + win.width < self.width,
    )
    for geom, _ in rasterio.features.shapes(mask.astype(np.uint8), mask=mask, transform=t):
      ys, xs = _pixel_bounds(geom, t)
      touches = (
        (inner[0] and ys[0] <= 0)
        or (inner[1] and xs[0] <= 0)
        or (inner[2] and ys[1] >= win.height)
        or (inner[3] and xs[1] >= win.width)
      )
      (self.edge if touches else self.done).append(shapely.geometry.shape(geom))

  def geometries(self) -> list:
    """The polygons: those inside blocks, and the union of the pieces on inner block edges."""
    merged = shapely.unary_union(self.edge) if self.edge else None
    return self.done + ([] if merged is None else list(shapely.get_parts(merged)))

  def write(self, path, crs, name: str, overwrite: bool):
    geoms = self.geometries()
    vector_io.write_polygons(
      path,
      geoms,
      {"class": [name] * len(geoms), "area": [g.area for g in geoms]},
      crs,
      name,
      overwrite,
    )


def _pixel_bounds(geom, transform):
  """(row min, row max), (col min, col max) of a GeoJSON polygon in the window's pixel grid."""
  xy = np.asarray(geom["coordinates"][0])
  cols, rows = ~transform @ (xy[:, 0], xy[:, 1])
  return (math.floor(np.min(rows) + 1e-6), math.ceil(np.max(rows) - 1e-6)), (
    math.floor(np.min(cols) + 1e-6),
    math.ceil(np.max(cols) - 1e-6),
  )


# An nDSM holds the ground at ~0 m: over a city block or a field at least a few per cent of the
# cells are ground. A DSM or DTM in absolute heights (tens to hundreds of metres above the datum)
# fed to an nDSM model makes everything "tall": refused instead of mapped.
NDSM_GROUND_SHARE = 0.02
NDSM_GROUND_M = 1.0


def check_height_above_ground(
  path: str | Path, band: int | None = None, sample_px: int = 1024
) -> None:
  """Refuse a raster that cannot be height above ground: its lowest `NDSM_GROUND_SHARE` of cells
  (read decimated to at most `sample_px` a side) lie above `NDSM_GROUND_M` or far below 0."""
  with open_raster(path) as src:
    band = elevation_band(src, band)
    scale = max(1, int(np.ceil(max(src.height, src.width) / sample_px)))
    shape = (max(1, src.height // scale), max(1, src.width // scale))
    data = src.read(band, out_shape=shape, masked=True).astype(np.float64)
  values = data.compressed()
  values = values[np.isfinite(values)]
  if values.size == 0:
    return
  low = float(np.quantile(values, NDSM_GROUND_SHARE))
  if low > NDSM_GROUND_M or low < -NDSM_GROUND_M:
    raise DataError(
      path,
      f"is not height above ground: {NDSM_GROUND_SHARE:.0%} of its cells are "
      f"{'above' if low > 0 else 'below'} {low:.1f} m, while an nDSM has its ground at "
      f"0 m. This model reads an nDSM: pass --dtm (terrain on the same grid, the nDSM "
      f"is DSM - DTM), a LiDAR .las/.laz, or an nDSM raster",
    )
