"""Opening and reading input rasters so that every problem is a DataError naming the file:
missing or unreadable files (GDAL's own message is often "Read failed. See previous exception for
details."), and the rules every entry point applies to elevation rasters:

- one band rule: a raster with one band is used as is; with several, the band must be chosen
  (`--band N`), never silently band 1;
- plausibility: valid elevations lie within PLAUSIBLE_ELEVATION (in metres or feet alike); a
  value beyond is an undeclared nodata value (-9999, -3.4e38) or corrupt data, never terrain;
- units: cell sizes are compared and stored in metres. A projected CRS in feet is converted; a
  geographic CRS (degrees) is refused unless the caller states the cell size in metres, since
  0.5 degrees is not 0.5 m and the cells are not even square on the ground.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import rasterio.crs
import rasterio.errors

from data_pipelines.errors import DataError

# The Dead Sea shore (-430 m, -1,411 ft) to above Everest (8,849 m; 29,032 ft is still below).
PLAUSIBLE_ELEVATION = (-1500.0, 10000.0)


def check_elevation_range(values: np.ndarray, valid: np.ndarray, path, where: str = "") -> None:
  """DataError if a valid elevation is outside PLAUSIBLE_ELEVATION (see the module doc)."""
  if not valid.any():
    return
  v = values[valid]
  lo, hi = float(v.min()), float(v.max())
  if lo < PLAUSIBLE_ELEVATION[0] or hi > PLAUSIBLE_ELEVATION[1]:
    raise DataError(
      path,
      f"holds elevations from {lo:g} to {hi:g}{where}, outside any terrain "
      f"({PLAUSIBLE_ELEVATION[0]:g}..{PLAUSIBLE_ELEVATION[1]:g}): an undeclared nodata "
      f"value (declare it: gdal_edit.py -a_nodata VALUE file.tif) or corrupt data",
    )


def open_raster(path: str | Path) -> rasterio.DatasetReader:
  """rasterio.open for reading, with a DataError for a missing or unreadable file."""
  if not Path(path).exists() and "://" not in str(path):
    raise DataError(path, "no such file")
  if Path(path).is_dir():
    raise DataError(path, "is a folder, not a raster file")
  try:
    return rasterio.open(path)
  except rasterio.errors.RasterioIOError as e:
    raise DataError(
      path, f"not a readable raster: corrupt, truncated or not a raster format ({e})"
    ) from e


def _cause(e: BaseException) -> str:
  """GDAL's useful message ("TIFFFillTile: Read error ...") is the innermost cause; rasterio's
  own is "Read failed. See previous exception for details."."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  return " ".join(str(e).split())[:300]


def read_band(
  src: rasterio.DatasetReader, window=None, masked: bool = False, band: int = 1, **kwargs
) -> np.ndarray:
  try:
    return src.read(band, window=window, masked=masked, **kwargs)
  except rasterio.errors.RasterioIOError as e:
    raise DataError(
      src.name, f"corrupt or truncated raster, reading {window or 'the band'} failed ({_cause(e)})"
    ) from e


def read_masks(src: rasterio.DatasetReader, band: int = 1, window=None) -> np.ndarray:
  try:
    return src.read_masks(band, window=window)
  except rasterio.errors.RasterioIOError as e:
    raise DataError(
      src.name, f"corrupt or truncated raster, reading {window or 'the band'} failed ({_cause(e)})"
    ) from e


def elevation_band(
  src: rasterio.DatasetReader, band: int | None, flag: str | None = "--band"
) -> int:
  """The band to read as elevation: `band`, or 1 for a single-band raster (the one band rule;
  `flag`: the caller's option to choose a band, if it has one)."""
  if band is None:
    if src.count != 1:
      raise DataError(
        src.name,
        f"has {src.count} bands but elevation is one band; "
        + (f"choose it with {flag} N (1..{src.count}), or " if flag else "")
        + "extract it (gdal_translate -b N in.tif out.tif)",
      )
    return 1
  if not 1 <= band <= src.count:
    raise DataError(src.name, f"has {src.count} band(s); band {band} does not exist")
  return band


def check_georeferenced(src: rasterio.DatasetReader) -> None:
  """A raster must say where it is: a CRS and a geotransform (GDAL gives the identity without)."""
  if src.crs is None:
    raise DataError(
      src.name, "has no CRS; assign the right one (gdal_edit.py -a_srs EPSG:XXXX file.tif)"
    )
  if src.transform.is_identity:
    raise DataError(
      src.name,
      "has no geotransform (GDAL reads it as the identity), so its cells "
      "have no place or size; fix its georeferencing (gdal_edit.py -a_ullr / -a_srs)",
    )


def single_band(src: rasterio.DatasetReader, role: str) -> None:
  """Auxiliary rasters (labels, validity, extra channels) must have exactly one band."""
  if src.count != 1:
    raise DataError(
      src.name,
      f"has {src.count} bands but a {role} raster has one; extract the band "
      f"you mean (gdal_translate -b N in.tif out.tif)",
    )


def metres_per_unit(crs, path: str | Path, flag: str | None = "--cell-size-m") -> float:
  """Metres per horizontal CRS unit (1 for metres, 0.3048... for feet, 1 without a CRS); a
  geographic CRS (degrees) is an error saying what to do (`flag`: the option that states the
  cell size in metres instead, if the caller has one)."""
  if crs is None:
    return 1.0
  crs = rasterio.crs.CRS.from_user_input(crs)
  if crs.is_geographic:
    raise DataError(
      path,
      f"is in a geographic CRS ({crs.to_string()}) whose unit is the degree, "
      f"not the metre. Reproject it to a projected CRS in metres (rasters: gdalwarp "
      f"-t_srs EPSG:<UTM zone> -tr 0.5 0.5 -r bilinear in.tif out.tif; point clouds: "
      f"pdal translate with filters.reprojection)"
      + (f", or pass {flag} with the cell size in metres if you know it" if flag else ""),
    )
  try:
    return float(crs.linear_units_factor[1])
  except rasterio.errors.CRSError:  # no linear unit known: engineering / local CRSs
    return 1.0


def cell_size_m(
  src: rasterio.DatasetReader, crs=None, given_m: float | None = None, flag: str = "--cell-size-m"
) -> float:
  """The raster's cell size in metres (square cells required).

  `given_m` (the user's statement of the cell size in metres) is used as is. Otherwise the
  CRS's linear unit converts the size in CRS units (feet too); a geographic CRS is an error
  saying what to do; a raster without CRS (and no `crs`) is taken to be in metres."""
  if given_m is not None:
    if not given_m > 0:
      raise DataError(src.name, f"{flag} must be positive, got {given_m}")
    return float(given_m)
  xres, yres = src.res
  factor = metres_per_unit(src.crs if src.crs is not None else crs, src.name, flag)
  if abs(xres - yres) > 1e-3 * max(xres, yres):
    raise DataError(
      src.name,
      f"has non-square cells ({xres:g} x {yres:g}); resample it to square "
      f"cells (gdalwarp -tr S S in.tif out.tif)",
    )
  return float(xres * factor)


def write_band(
  path: str | Path, array: np.ndarray, profile: dict, overwrite: bool = False, **tags: str
) -> Path:
  """`array` as the single band of a GeoTIFF at `path` with `profile` (its dtype, nodata and
  compression as the caller set them) and optional tags, written atomically."""
  from data_pipelines.atomic import atomic_file

  with atomic_file(path, overwrite) as tmp:
    with rasterio.open(tmp, "w", **{**profile, "count": 1}) as sink:
      sink.write(array, 1)
      if tags:
        sink.update_tags(**tags)
  return Path(path)
