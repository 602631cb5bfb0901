"""LAS/LAZ point clouds into georeferenced rasters: DSM, DTM, nDSM, class raster, validity mask.

Several files form one mosaic on a grid snapped to multiples of the cell size. The grid is
processed in output windows (plus a halo so that interpolation sees across window edges); each
window streams the points of the files that overlap it with laspy's chunk_iterator, so memory is
bounded by the window size and the chunk size, not by the size of the point cloud. COPC files
(found by their COPC info VLR) are read by bounds instead: each window decompresses only the octree
nodes that overlap it, with laspy's CopcReader.

Per cell: DSM = highest return, class = class of that highest return, DTM = mean height of ground
points (ASPRS class 2), with gaps (under buildings, water) interpolated by rasterio.fill.fillnodata;
nDSM = max(DSM - DTM, 0). `valid` = 1 where the cell held at least one return; DSM holes that were
filled are 0 there, so every interpolated value is recorded.

`max_density` thins a denser survey to that many points per m2 first. The highest of ~15 returns
per cell draws a tree crown smooth, of ~3 pitted, so a model that learnt crowns from sparse
surveys may read dense ones as roofs (docs/results_product.md). Which points are kept
depends on each point's own coordinates only (a hash), so every window, halo, chunk size and
reading path (LAZ or COPC) keeps the same ones.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import laspy
import numpy as np
import rasterio
import rasterio.crs
import rasterio.errors
import rasterio.fill
import rasterio.transform
import rasterio.windows
from tqdm import tqdm

from data_pipelines.atomic import atomic_file, refuse_existing
from data_pipelines.errors import DataError
from data_pipelines.raster_io import metres_per_unit

GROUND = 2
PRODUCTS = ("dsm", "dtm", "ndsm", "class", "valid")


@dataclasses.dataclass(frozen=True)
class LidarFile:
  path: Path
  bounds: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax
  crs: rasterio.crs.CRS
  point_count: int
  copc: bool = False  # a COPC info VLR in the header: read by bounds


# points handed to the window accumulators per file path, for tests and benchmarks: a LAZ is read
# whole for every window it overlaps, a COPC file only around each window
points_read: collections.Counter[str] = collections.Counter()


def inspect_las(path: str | Path, crs: str | None = None) -> LidarFile:
  """Header bounds and CRS; the user's `crs` fills in a missing one and must match a present one."""
  path = Path(path)
  _check_las_header(path)
  try:
    with laspy.open(path) as reader:
      header = reader.header
  except (laspy.errors.LaspyException, OSError, ValueError) as e:
    raise DataError(path, f"not a readable LAS/LAZ file ({e})") from e
  if header.point_count == 0:
    raise DataError(path, "holds no points")
  file_crs = _header_crs(path, header)
  user_crs = rasterio.crs.CRS.from_user_input(crs) if crs else None
  if file_crs is not None and user_crs is not None and file_crs != user_crs:
    raise DataError(path, f"header CRS {file_crs.to_string()} differs from the given {crs}")
  final = file_crs or user_crs
  if final is None:
    raise DataError(path, "header has no CRS; give one (e.g. --crs EPSG:28992)")
  mins, maxs = header.mins, header.maxs
  return LidarFile(
    path,
    (float(mins[0]), float(mins[1]), float(maxs[0]), float(maxs[1])),
    final,
    int(header.point_count),
    any(isinstance(v, laspy.copc.CopcInfoVlr) for v in header.vlrs),
  )


def _check_las_header(path: Path) -> None:
  """The public header block's sizes against the file's: laspy trusts them, and a corrupt
  header (e.g. 2e9 VLRs) makes it loop and allocate without end instead of failing."""
  try:
    with open(path, "rb") as f:
      head = f.read(105)
    size = path.stat().st_size
  except OSError as e:
    raise DataError(path, f"cannot be read ({e})") from e
  if len(head) < 105 or head[:4] != b"LASF":
    return  # laspy's own error says it is not a LAS/LAZ file
  header_size, point_offset, n_vlrs = struct.unpack_from("<HII", head, 94)
  if not (227 <= header_size <= point_offset <= size) or n_vlrs * 54 > point_offset - header_size:
    raise DataError(
      path,
      f"not a readable LAS/LAZ file (corrupt header: header size {header_size}, point data "
      f"at {point_offset}, {n_vlrs} VLRs, file size {size})",
    )


def _header_crs(path: Path, header: laspy.LasHeader) -> rasterio.crs.CRS | None:
  """CRS from the WKT or GeoTIFF-keys VLR, read with GDAL (laspy's parse_crs needs pyproj). LAS 1.4
  may keep the WKT in an extended VLR (copclib writes it there)."""
  vlrs = [*header.vlrs, *(header.evlrs or [])]
  for vlr in vlrs:
    if isinstance(vlr, laspy.vlrs.known.WktCoordinateSystemVlr) and vlr.string.strip("\x00 "):
      try:
        return rasterio.crs.CRS.from_wkt(vlr.string.strip("\x00 "))
      except rasterio.errors.CRSError as e:
        raise DataError(path, f"unreadable WKT CRS in the header ({e})") from e
  for vlr in vlrs:
    if isinstance(vlr, laspy.vlrs.known.GeoKeyDirectoryVlr):
      keys = {k.id: k.value_offset for k in vlr.geo_keys}
      code = keys.get(3072) or keys.get(2048)  # ProjectedCSTypeGeoKey, GeographicTypeGeoKey
      if code and code != 32767:  # 32767 = user-defined, not an EPSG code
        return rasterio.crs.CRS.from_epsg(code)
  return None


@dataclasses.dataclass(frozen=True)
class Grid:
  transform: rasterio.Affine
  width: int
  height: int
  crs: rasterio.crs.CRS

  @property
  def cell_size(self) -> float:
    return self.transform.a


def mosaic_grid(
  files: Sequence[LidarFile],
  cell_size: float,
  bounds: tuple[float, float, float, float] | None = None,
) -> Grid:
  """The grid covering all files (or the given xmin, ymin, xmax, ymax: several surveys of one
  place then share one grid), its corners snapped to multiples of the cell size."""
  crss = {f.crs for f in files}
  if len(crss) > 1:
    raise DataError(
      files[0].path,
      "input files disagree on CRS: "
      + ", ".join(f"{f.path.name}={f.crs.to_string()}" for f in files),
    )
  x0, y0, x1, y1 = bounds or (
    min(f.bounds[0] for f in files),
    min(f.bounds[1] for f in files),
    max(f.bounds[2] for f in files),
    max(f.bounds[3] for f in files),
  )
  if bounds is not None and not (x1 > x0 and y1 > y0):
    raise ValueError(f"empty bounds {(x0, y0, x1, y1)}: need xmin < xmax and ymin < ymax")
  xmin = math.floor(x0 / cell_size) * cell_size
  ymax = math.ceil(y1 / cell_size) * cell_size
  # cells are half-open [x, x + cell); +1 so that points on the far edges still fall inside
  width = int((x1 - xmin) // cell_size) + 1
  height = int((ymax - y0) // cell_size) + 1
  return Grid(
    rasterio.transform.from_origin(xmin, ymax, cell_size, cell_size), width, height, files[0].crs
  )


class _WindowAccumulator:
  """Highest return, its class, and ground sums for the cells of one (haloed) window."""

  def __init__(self, window: rasterio.windows.Window, transform: rasterio.Affine):
    self.window = window
    self.x0 = transform.c + window.col_off * transform.a  # north-up grid: no rotation terms
    self.y0 = transform.f + window.row_off * transform.e
    self.cell = transform.a
    self.shape = (int(window.height), int(window.width))
    n = self.shape[0] * self.shape[1]
    self.top = np.full(n, -np.inf, np.float32)
    self.cls = np.zeros(n, np.uint8)
    self.ground_sum = np.zeros(n, np.float64)
    self.ground_count = np.zeros(n, np.int32)

  def bounds(self):
    h, w = self.shape
    return self.x0, self.y0 - h * self.cell, self.x0 + w * self.cell, self.y0

  def add(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, cls: np.ndarray) -> None:
    col = np.floor((x - self.x0) / self.cell).astype(np.int64)
    row = np.floor((self.y0 - y) / self.cell).astype(np.int64)
    h, w = self.shape
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    if not inside.any():
      return
    cell = row[inside] * w + col[inside]
    z, cls = z[inside].astype(np.float32), cls[inside]
    # the last point of each cell after sorting by (cell, z) is that cell's highest return
    order = np.lexsort((z, cell))
    cell_sorted = cell[order]
    last = np.r_[cell_sorted[1:] != cell_sorted[:-1], True]
    top_cell, top_z, top_cls = cell_sorted[last], z[order][last], cls[order][last]
    higher = top_z > self.top[top_cell]
    self.top[top_cell[higher]] = top_z[higher]
    self.cls[top_cell[higher]] = top_cls[higher]
    ground = cls == GROUND
    n = self.top.size
    self.ground_sum += np.bincount(cell[ground], weights=z[ground], minlength=n)
    self.ground_count += np.bincount(cell[ground], minlength=n).astype(np.int32)


def keep_fraction(lf: LidarFile, max_density: float | None) -> float:
  """The share of `lf`'s points to keep so that it holds at most `max_density` points per m2 of
  its header's extent (1: all)."""
  if max_density is None:
    return 1.0
  if not max_density > 0:
    raise ValueError(f"max_density must be a positive number of points per m2, got {max_density}")
  x0, y0, x1, y1 = lf.bounds
  m2 = max((x1 - x0) * (y1 - y0), 1e-9) * metres_per_unit(lf.crs, lf.path, flag=None) ** 2
  return min(1.0, max_density * m2 / lf.point_count)


def thinned(points, fraction: float):
  """The points whose coordinate hash falls below `fraction` (all of them at 1)."""
  if fraction >= 1.0:
    return points
  key = (
    np.asarray(points.X, np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    ^ np.asarray(points.Y, np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
    ^ np.asarray(points.Z, np.int64).astype(np.uint64) * np.uint64(0x165667B19E3779F9)
  )
  key ^= key >> np.uint64(31)  # splitmix64's finaliser: every input bit reaches the top bits
  key *= np.uint64(0xBF58476D1CE4E5B9)
  key ^= key >> np.uint64(27)
  key *= np.uint64(0x94D049BB133111EB)
  key ^= key >> np.uint64(31)
  return points[(key >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction]


def _stream_points(
  lf: LidarFile, acc: _WindowAccumulator, chunk_size: int, fraction: float = 1.0
) -> None:
  bx0, by0, bx1, by1 = acc.bounds()
  fx0, fy0, fx1, fy1 = lf.bounds
  if fx0 > bx1 or fx1 < bx0 or fy0 > by1 or fy1 < by0:
    return
  try:
    for points in _copc_points(lf, acc) if lf.copc else _laz_chunks(lf, chunk_size):
      points_read[str(lf.path)] += len(points)
      points = thinned(points, fraction)
      acc.add(
        np.asarray(points.x),
        np.asarray(points.y),
        np.asarray(points.z),
        np.asarray(points.classification, dtype=np.uint8),
      )
  except (
    laspy.errors.LaspyException,
    OSError,
    ValueError,
    RuntimeError,  # lazrs.LazrsError among them
    struct.error,  # a corrupt COPC hierarchy page
  ) as e:
    raise DataError(
      lf.path, f"failed while reading points, the file is corrupt or truncated ({e})"
    ) from e


def _laz_chunks(lf: LidarFile, chunk_size: int):
  with laspy.open(lf.path) as reader:
    yield from reader.chunk_iterator(chunk_size)


def _copc_points(lf: LidarFile, acc: _WindowAccumulator):
  """The points of the COPC nodes around the window. The query is one cell wider than the window
  (laspy rounds its bounds to the integer grid) and takes every representable Z (the LAZ path does
  not trust the header's z range either); the accumulator drops what falls outside exactly as for
  a LAZ, so both give the same rasters."""
  bx0, by0, bx1, by1 = acc.bounds()
  with laspy.CopcReader.open(lf.path) as reader:
    _check_copc_hierarchy(lf.path, reader)
    scale, offset = reader.header.scales[2], reader.header.offsets[2]
    z0, z1 = offset + scale * (-(2**31) + 1), offset + scale * (2**31 - 1)
    yield reader.query(
      bounds=laspy.Bounds(
        mins=np.array([bx0 - acc.cell, by0 - acc.cell, z0]),
        maxs=np.array([bx1 + acc.cell, by1 + acc.cell, z1]),
      )
    )


def _check_copc_hierarchy(path: Path, reader: laspy.CopcReader) -> None:
  """laspy skips hierarchy entries it cannot find: a corrupt hierarchy would read as no points."""
  entries = reader.root_page.entries
  root = laspy.copc.VoxelKey()
  root.level = 0
  size = path.stat().st_size
  if root not in entries:
    raise ValueError("the COPC hierarchy has no root node")
  for key, e in entries.items():
    if e.point_count < -1 or e.offset < 0 or e.byte_size < 0 or e.offset + e.byte_size > size:
      raise ValueError(f"COPC hierarchy entry {key} points outside the file ({e})")
  if all(e.point_count >= 0 for e in entries.values()):  # one page: it counts every point
    total = sum(e.point_count for e in entries.values())
    if total != reader.header.point_count:
      raise ValueError(
        f"the COPC hierarchy holds {total} points, the header {reader.header.point_count}"
      )


def _fill(values: np.ndarray, known: np.ndarray, distance: float) -> np.ndarray:
  """Interpolate unknown cells from known ones within `distance` cells; NaN beyond it."""
  if known.all() or not known.any():
    return np.where(known, values, np.nan).astype(np.float32)
  filled = rasterio.fill.fillnodata(
    np.where(known, values, 0).astype(np.float32),
    mask=known.astype(np.uint8),
    max_search_distance=distance,
  )
  reached = (
    rasterio.fill.fillnodata(
      known.astype(np.float32), mask=known.astype(np.uint8), max_search_distance=distance
    )
    > 0
  )
  return np.where(known | reached, filled, np.nan).astype(np.float32)


def las_to_rasters(
  paths: Sequence[str | Path],
  out_dir: str | Path,
  cell_size: float = 0.5,
  crs: str | None = None,
  window_px: int = 2048,
  chunk_size: int = 1_000_000,
  dsm_fill_px: float = 4,
  dtm_fill_px: float = 200,
  overwrite: bool = False,
  progress: bool = True,
  bounds: tuple[float, float, float, float] | None = None,
  max_density: float | None = None,
) -> dict[str, Path]:
  """Rasterise a mosaic of LAS/LAZ files; returns {product: GeoTIFF path} (see module doc).

  `bounds` (xmin, ymin, xmax, ymax in the CRS) fixes the grid's extent instead of the files'
  union; points outside it are dropped. `max_density` (points per m2) thins denser files to it
  (module doc); the rasters' `max_density` tag records it.

  `dsm_fill_px` bounds which DSM holes get interpolated (beyond it: NaN, invalid); `dtm_fill_px`
  must exceed half the widest building in cells, since the DTM is interpolated under roofs.
  """
  if not paths:
    raise ValueError("no LAS/LAZ files given")
  out_dir = Path(out_dir)
  outputs = {p: out_dir / f"{p}.tif" for p in PRODUCTS}
  for path in outputs.values():
    refuse_existing(path, overwrite)
  files = [inspect_las(p, crs) for p in paths]
  metres_per_unit(files[0].crs, files[0].path, flag=None)  # --cell-size in degrees: refused
  fractions = [keep_fraction(f, max_density) for f in files]
  grid = mosaic_grid(files, cell_size, bounds)
  halo = int(math.ceil(dtm_fill_px))
  profile = dict(
    driver="GTiff",
    width=grid.width,
    height=grid.height,
    count=1,
    crs=grid.crs,
    transform=grid.transform,
    tiled=True,
    blockxsize=256,
    blockysize=256,
    compress="deflate",
  )
  dtypes = {
    "dsm": "float32",
    "dtm": "float32",
    "ndsm": "float32",
    "class": "uint8",
    "valid": "uint8",
  }
  nodata = {"dsm": np.nan, "dtm": np.nan, "ndsm": np.nan, "class": None, "valid": None}
  windows = [
    rasterio.windows.Window(c, r, min(window_px, grid.width - c), min(window_px, grid.height - r))
    for r in range(0, grid.height, window_px)
    for c in range(0, grid.width, window_px)
  ]
  with contextlib.ExitStack() as stack:  # atomic_file makes out_dir, and removes it on failure
    tmps = {p: stack.enter_context(atomic_file(outputs[p], overwrite)) for p in PRODUCTS}
    sinks = {
      p: stack.enter_context(
        rasterio.open(tmps[p], "w", dtype=dtypes[p], nodata=nodata[p], **profile)
      )
      for p in PRODUCTS
    }
    for window in tqdm(windows, desc="lidar windows", disable=not progress):
      haloed = rasterio.windows.Window(
        window.col_off - halo,
        window.row_off - halo,
        window.width + 2 * halo,
        window.height + 2 * halo,
      )
      acc = _WindowAccumulator(haloed, grid.transform)
      for lf, fraction in zip(files, fractions):
        _stream_points(lf, acc, chunk_size, fraction)
      h, w = acc.shape
      hit = np.isfinite(acc.top).reshape(h, w)
      dsm = _fill(acc.top.reshape(h, w), hit, dsm_fill_px)
      ground = acc.ground_count.reshape(h, w) > 0
      dtm = _fill(
        (acc.ground_sum / np.maximum(acc.ground_count, 1)).reshape(h, w), ground, dtm_fill_px
      )
      ndsm = np.maximum(
        dsm - dtm, 0, where=np.isfinite(dsm) & np.isfinite(dtm), out=np.full_like(dsm, np.nan)
      )
      crop = np.s_[halo : halo + int(window.height), halo : halo + int(window.width)]
      arrays = {
        "dsm": dsm,
        "dtm": dtm,
        "ndsm": ndsm,
        "class": acc.cls.reshape(h, w),
        "valid": hit.astype(np.uint8),
      }
      for p in PRODUCTS:
        sinks[p].write(arrays[p][crop], 1, window=window)
    for p in PRODUCTS:
      sinks[p].update_tags(
        source=";".join(f.path.name for f in files),
        cell_size=str(cell_size),
        max_density=str(max_density),
      )
      sinks[p].close()
  return outputs
