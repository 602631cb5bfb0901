"""A raster onto another cell size over the same extent (rasterio.warp), so that areas with
different native resolutions can share one grid spacing (the leave-one-area-out protocol).

Elevation: bilinear when refining, average when coarsening (bilinear would sample 4 of the
many cells a coarse cell covers). Labels: nearest when refining, mode when coarsening (a class
value must stay a class value). Nodata stays nodata: NaN for elevation, the source's value
(or IGNORE) for labels.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import rasterio
import rasterio.transform
import rasterio.warp
from rasterio.enums import Resampling

from data_pipelines.errors import DataError
from data_pipelines.labels import IGNORE
from data_pipelines.raster_io import write_band

KINDS = ("elevation", "label")


def resample_raster(
  src_path: str | Path,
  out_path: str | Path,
  cell_size: float,
  kind: str = "elevation",
  overwrite: bool = False,
) -> Path:
  """Band 1 of `src_path` at `cell_size` (CRS units) over the same top-left corner and extent
  (rounded up to whole cells); float32 with NaN nodata for elevation, uint8 for labels."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if not cell_size > 0:
    raise ValueError(f"cell_size must be positive, got {cell_size}")
  with rasterio.open(src_path) as src:
    if src.crs is None:
      raise DataError(src_path, "raster has no CRS")
    if abs(src.res[0] - src.res[1]) > 1e-9 * src.res[0] or src.transform.b or src.transform.d:
      raise DataError(
        src_path, f"needs square north-up cells, got {src.res} {tuple(src.transform)[:6]}"
      )
    b = src.bounds
    width = math.ceil(round((b.right - b.left) / cell_size, 6))
    height = math.ceil(round((b.top - b.bottom) / cell_size, 6))
    transform = rasterio.transform.from_origin(b.left, b.top, cell_size, cell_size)
    finer = cell_size < src.res[0]
    if kind == "elevation":
      how = Resampling.bilinear if finer else Resampling.average
      dtype, nodata = np.float32, np.nan
    else:
      how = Resampling.nearest if finer else Resampling.mode
      dtype, nodata = np.uint8, IGNORE if src.nodata is None else src.nodata
    out = np.full((height, width), nodata, dtype)
    rasterio.warp.reproject(
      rasterio.band(src, 1),
      out,
      dst_transform=transform,
      dst_crs=src.crs,
      dst_nodata=nodata,
      resampling=how,
    )
    profile = src.profile
  profile.update(
    width=width,
    height=height,
    transform=transform,
    dtype=out.dtype.name,
    nodata=nodata,
    count=1,
    compress="deflate",
    tiled=False,
  )
  for key in ("blockxsize", "blockysize"):
    profile.pop(key, None)
  return write_band(
    out_path,
    out,
    profile,
    overwrite,
    resampled_from=Path(src_path).name,
    resampling=how.name,
    cell_size=str(cell_size),
  )
