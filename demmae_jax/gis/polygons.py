"""Building and road polygons a GIS user wants, from a prediction's class raster.

1. Vectorised block by block (rasterio.features.shapes; the pieces on inner block edges merged
   with shapely), so the class raster is never read whole; holes (courtyards) are kept.
2. Optionally simplified (Douglas-Peucker, `simplify_m`, topology kept) and regularised to right
   angles (`regularise`): each ring is rotated onto the polygon's dominant direction (the longest
   side of its minimum rotated rectangle), simplified, every edge snapped to the nearer axis,
   consecutive edges on one axis merged into one line at their length-weighted mean position, and
   the lines intersected in turn. A polygon whose regularised form is invalid or changes the area
   by more than `max_area_change` keeps its simplified form (counted in `regularised`).
3. Attributes: area_m2, perimeter_m, height_median_m and height_max_m (height above ground in the
   polygon: from an nDSM raster, or DSM - DTM, or estimated from the DSM alone as its height above
   a grey opening, the rule baseline's `baselines.height_above_opening`, with a window wider
   than the polygon), prob_mean (mean probability of the polygon's class), source, model.

Heights and probabilities are read per polygon over its bounding box only (memory flat in the
raster size).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import rasterio
import rasterio.features
import shapely
import shapely.affinity
from rasterio.windows import Window

from data_pipelines.errors import DataError
from data_pipelines.raster_io import open_raster

HEIGHT_SOURCES = ("ndsm", "dtm", "dsm")


@dataclasses.dataclass(frozen=True)
class PolygonOptions:
  simplify_m: float = 0.0  # Douglas-Peucker tolerance in metres; 0: the pixel outline
  regularise: bool = False  # right angles (simplifies with at least one cell first)
  min_area_m2: float = 0.0  # smaller polygons dropped
  max_area_change: float = 0.25  # a regularised polygon differing more keeps its simplified form
  opening_m: float = 25.0  # smallest opening window for heights estimated from a DSM alone
  block: int = 1024

  def __post_init__(self):
    if self.simplify_m < 0 or self.min_area_m2 < 0 or not 0 < self.max_area_change < 1:
      raise ValueError(f"bad polygon options {self}")


# ------------------------------------------------------------------------------ vectorise
def vectorise(classes: str | Path, value: int, block: int = 1024) -> tuple[list, rasterio.crs.CRS]:
  """Polygons of the cells equal to `value` in a class raster, block by block; (geoms, crs)."""
  from demmae_jax.inference.raster import _Polygons

  with open_raster(classes) as src:
    pieces = _Polygons(src.transform, src.width, src.height)
    for r in range(0, src.height, block):
      for c in range(0, src.width, block):
        win = Window(c, r, min(block, src.width - c), min(block, src.height - r))
        pieces.add(src.read(1, window=win) == value, win)
    return pieces.geometries(), src.crs


# ------------------------------------------------------------------------------ shape
def _dominant_angle(poly) -> float:
  """Degrees of the longest side of the minimum rotated rectangle."""
  rect = np.asarray(shapely.minimum_rotated_rectangle(poly).exterior.coords)
  sides = np.diff(rect, axis=0)
  dx, dy = sides[np.argmax(np.hypot(sides[:, 0], sides[:, 1]))]
  return math.degrees(math.atan2(dy, dx))


def orthogonal_ring(coords: np.ndarray) -> np.ndarray | None:
  """A closed ring (axis-aligned frame) with every edge horizontal or vertical; None when fewer
  than 4 sides remain."""
  pts = np.asarray(coords, np.float64)[:-1]
  n = len(pts)
  if n < 4:
    return None
  d = np.roll(pts, -1, axis=0) - pts
  length = np.hypot(d[:, 0], d[:, 1])
  horizontal = np.abs(d[:, 0]) >= np.abs(d[:, 1])
  if horizontal.all() or not horizontal.any():
    return None
  start = int(np.argmax(horizontal != np.roll(horizontal, 1)))  # an edge after an axis change
  order = np.roll(np.arange(n), -start)
  groups = []  # (horizontal, position)
  for i in order:
    mid = (pts[i] + pts[(i + 1) % n]) / 2
    pos, w = (mid[1] if horizontal[i] else mid[0]), max(length[i], 1e-9)
    if groups and groups[-1][0] == horizontal[i]:
      groups[-1][1] += pos * w
      groups[-1][2] += w
    else:
      groups.append([horizontal[i], pos * w, w])
  if len(groups) < 4:
    return None
  lines = [(h, s / w) for h, s, w in groups]
  out = []
  for k, (h, v) in enumerate(lines):  # corner between line k - 1 and line k
    _, prev = lines[k - 1]
    out.append((v, prev) if not h else (prev, v))
  out.append(out[0])
  return np.asarray(out)


def regularise(poly, tolerance: float, max_area_change: float = 0.25):
  """Right-angled `poly` (holes kept, see the module doc), or None when it cannot be."""
  angle = _dominant_angle(poly)
  centre = poly.centroid
  flat = shapely.affinity.rotate(poly, -angle, origin=centre)
  flat = flat.simplify(tolerance, preserve_topology=True)
  if flat.is_empty or flat.geom_type != "Polygon":
    return None
  shell = orthogonal_ring(np.asarray(flat.exterior.coords))
  if shell is None:
    return None
  holes = [
    h for h in (orthogonal_ring(np.asarray(r.coords)) for r in flat.interiors) if h is not None
  ]
  out = shapely.Polygon(shell, holes)
  if not out.is_valid or abs(out.area - poly.area) > max_area_change * poly.area:
    return None
  return shapely.affinity.rotate(out, angle, origin=centre)


def shape_polygons(geoms, opts: PolygonOptions, cell: float) -> tuple[list, int]:
  """Simplified / regularised polygons (see the module doc); (polygons, how many regularised)."""
  out, done = [], 0
  for g in geoms:
    if g.area < opts.min_area_m2:
      continue
    shaped = g
    if opts.regularise:
      reg = regularise(g, max(opts.simplify_m, cell), opts.max_area_change)
      done += reg is not None
      shaped = (
        reg if reg is not None else g.simplify(max(opts.simplify_m, cell), preserve_topology=True)
      )
    elif opts.simplify_m > 0:
      shaped = g.simplify(opts.simplify_m, preserve_topology=True)
    out.append(shaped if shaped.is_valid and not shaped.is_empty else g)
  return out, done


# ------------------------------------------------------------------------------ attributes
class HeightSource:
  """Height above ground under polygons: `ndsm` (an nDSM raster), `dtm` (DSM - DTM) or `dsm` (the
  DSM above its grey opening, estimated). Rasters are read per polygon window."""

  def __init__(
    self,
    dsm: str | Path | None = None,
    dtm: str | Path | None = None,
    ndsm: str | Path | None = None,
    opening_m: float = 25.0,
  ):
    if ndsm is not None:
      self.kind, paths = "ndsm", [ndsm]
    elif dsm is not None and dtm is not None:
      self.kind, paths = "dtm", [dsm, dtm]
    elif dsm is not None:
      self.kind, paths = "dsm", [dsm]
    else:
      raise ValueError("heights need an nDSM, a DSM and DTM, or a DSM")
    self.srcs = [open_raster(p) for p in paths]
    ref = self.srcs[0]
    for p, s in zip(paths[1:], self.srcs[1:]):
      if s.crs != ref.crs or s.transform != ref.transform or s.shape != ref.shape:
        raise DataError(p, f"grid or CRS differs from {paths[0]}")
    self.opening_m, self.paths = opening_m, [str(p) for p in paths]
    self.transform, self.shape, self.crs = ref.transform, ref.shape, ref.crs
    self.cell = abs(ref.transform.a)

  def close(self):
    for s in self.srcs:
      s.close()

  def _read(self, src, win):
    a = src.read(1, window=win, masked=True, boundless=True, fill_value=np.nan).astype(np.float32)
    return a.filled(np.nan)

  def heights(self, poly) -> np.ndarray:
    """The height above ground of the cells whose centres lie in `poly` (NaN: unknown)."""
    pad = 0
    if self.kind == "dsm":
      x0, y0, x1, y1 = poly.bounds
      size = int(math.ceil(max(self.opening_m, 1.5 * min(x1 - x0, y1 - y0)) / self.cell)) | 1
      pad = size
    win, mask = _window_mask(poly, self.transform, pad)
    if self.kind == "ndsm":
      h = self._read(self.srcs[0], win)
    elif self.kind == "dtm":
      h = self._read(self.srcs[0], win) - self._read(self.srcs[1], win)
    else:
      from demmae_jax.baselines import fill_invalid, height_above_opening

      dsm = self._read(self.srcs[0], win)
      ok = np.isfinite(dsm)
      if not ok.any():
        return np.array([], np.float32)
      h = np.where(ok, height_above_opening(fill_invalid(dsm, ok), size), np.nan)
    return h[mask]


def _window_mask(poly, transform, pad: int = 0):
  """(window over the polygon's bounding box + `pad` cells, cells whose centre is inside)."""
  win = rasterio.windows.from_bounds(*poly.bounds, transform=transform)
  win = Window(
    math.floor(win.col_off) - pad,
    math.floor(win.row_off) - pad,
    math.ceil(win.width) + 1 + 2 * pad,
    math.ceil(win.height) + 1 + 2 * pad,
  )
  mask = rasterio.features.geometry_mask(
    [poly],
    (int(win.height), int(win.width)),
    rasterio.windows.transform(win, transform),
    invert=True,
  )
  return win, mask


def _nan_stat(fn, a):
  a = a[np.isfinite(a)]
  return float(fn(a)) if a.size else float("nan")


def polygon_attributes(
  polys,
  *,
  heights: HeightSource | None = None,
  probabilities=None,
  band: int | None = None,
  source: str = "",
  model: str = "",
) -> dict:
  """{field: values} for `polys` (see the module doc); probabilities: a probability raster and
  the (1-based) band of the polygons' class."""
  fields = {"area_m2": [p.area for p in polys], "perimeter_m": [p.length for p in polys]}
  if heights is not None:
    hs = [heights.heights(p) for p in polys]
    fields["height_median_m"] = [_nan_stat(np.median, h) for h in hs]
    fields["height_max_m"] = [_nan_stat(np.max, h) for h in hs]
    fields["height_from"] = [heights.kind] * len(polys)
  if probabilities is not None:
    with open_raster(probabilities) as src:
      means = []
      for p in polys:
        win, mask = _window_mask(p, src.transform)
        v = src.read(band, window=win, boundless=True, fill_value=np.nan).astype(np.float32)
        means.append(_nan_stat(np.mean, v[mask]))
    fields["prob_mean"] = means
  fields["source"] = [source] * len(polys)
  fields["model"] = [model] * len(polys)
  return fields


def write_class_polygons(
  classes: str | Path,
  out: str | Path,
  *,
  value: int,
  name: str,
  opts: PolygonOptions = PolygonOptions(),
  probabilities=None,
  heights: HeightSource | None = None,
  source: str = "",
  model: str = "",
  overwrite: bool = False,
) -> dict:
  """Polygons of class `value` of a class raster with their attributes into `out` (.gpkg or
  .geojson); returns a summary."""
  from demmae_jax.gis.vector_io import check_vector_path, write_polygons

  check_vector_path(out)
  geoms, crs = vectorise(classes, value, opts.block)
  with open_raster(classes) as src:
    cell = abs(src.transform.a)
  polys, regular = shape_polygons(geoms, opts, cell)
  fields = {"class": [name] * len(polys)}
  fields.update(
    polygon_attributes(
      polys,
      heights=heights,
      probabilities=probabilities,
      band=value + 1,
      source=source,
      model=model,
    )
  )
  write_polygons(out, polys, fields, crs, name, overwrite, geometry_type="Polygon")
  return {"polygons": len(polys), "regularised": regular, "path": str(out)}
