"""Cloud-Optimized GeoTIFFs, written from a streamed GeoTIFF.

The predictor writes its rasters block by block into an ordinary tiled GeoTIFF (a temporary
beside the output); `cog_output` then copies it with GDAL's COG driver, which also reads and
writes block by block and builds the internal overviews (nearest for classes, so that an overview
holds class values and the colour table still applies; average for continuous rasters). Memory
stays flat in the raster size: GDAL's block cache (`GDAL_CACHEMAX`) bounds it. The COG driver
keeps the colour table, nodata, band descriptions and tags of the source.

`validate` is rio-cogeo's validator (the same checks as GDAL's validate_cloud_optimized_geotiff.py).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import rasterio
import rasterio.shutil

from data_pipelines.atomic import atomic_file, refuse_existing, temp_prefix

BLOCK = 256
# GDAL resampling names of the COG driver's RESAMPLING/OVERVIEW_RESAMPLING option.
RESAMPLING = ("nearest", "average", "mode", "bilinear")


def cog_profile(resampling: str = "nearest", predictor: int | None = None) -> dict:
  """Creation options of GDAL's COG driver for a deflate-compressed COG with internal overviews."""
  if resampling not in RESAMPLING:
    raise ValueError(f"resampling must be one of {RESAMPLING}; got {resampling!r}")
  opts = dict(
    driver="COG",
    COMPRESS="DEFLATE",
    BLOCKSIZE=BLOCK,
    OVERVIEWS="IGNORE_EXISTING",
    RESAMPLING=resampling.upper(),
    BIGTIFF="IF_SAFER",
    NUM_THREADS="1",
  )
  if predictor:
    opts["PREDICTOR"] = predictor
  return opts


def translate(
  src: str | Path, dst: str | Path, resampling: str = "nearest", predictor: int | None = None
) -> Path:
  """Copy the GeoTIFF `src` to the COG `dst` (overwritten: callers pass a temporary)."""
  rasterio.shutil.copy(str(src), str(dst), **cog_profile(resampling, predictor))
  return Path(dst)


@contextlib.contextmanager
def cog_output(
  path: str | Path,
  overwrite: bool = False,
  resampling: str = "nearest",
  predictor: int | None = None,
) -> Iterator[Path]:
  """Yields a temporary tiled-GeoTIFF path to write (block by block) and, if the block succeeds,
  copies it into `path` as a COG, atomically (data_pipelines.atomic: nothing under the final name
  unless everything worked, an existing `path` refused unless `overwrite`)."""
  path = Path(path)
  refuse_existing(path, overwrite)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(
    prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent
  ) as scratch:
    staged = Path(scratch) / "stream.tif"
    yield staged
    with atomic_file(path, overwrite) as tmp:
      translate(staged, tmp, resampling, predictor)


def validate(path: str | Path, strict: bool = False) -> tuple[bool, list[str], list[str]]:
  """(is a valid COG, errors, warnings) by rio-cogeo's validator."""
  from rio_cogeo.cogeo import cog_validate

  return cog_validate(str(path), strict=strict, quiet=True)
