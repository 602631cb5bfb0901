"""Vector labels (GeoPackage, SQLite, Shapefile, GeoJSON via pyogrio) rasterised onto a DEM grid.

Output is uint8: 0 background, the layer's class value where its polygons are, and IGNORE (255)
outside the labelled area, so that "nobody labelled this" is never learned as "background". The
labelled area is a user-given polygon layer, or by default the convex hull of the coverage layers
(the label layers themselves unless others are named, e.g. all BGT layers of a crop).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyogrio
import rasterio
import rasterio.crs
import rasterio.features
import rasterio.warp
import shapely
import shapely.errors
import shapely.geometry

from data_pipelines.errors import DataError
from data_pipelines.raster_io import check_georeferenced, open_raster, read_band, write_band

IGNORE = 255
# Width of the eaves that roof outlines add to wall-line footprints, measured on the training
# areas (BGT / BAG footprints against AHN3's building class: demmae_jax/inference/outline.py).
EAVE_M = 1.0


@dataclasses.dataclass(frozen=True)
class LabelLayer:
  """One vector source; features kept when `field` is in `values` (all features if no field)."""

  path: str | Path
  value: int = 1
  layer: str | int | None = None
  field: str | None = None
  values: Sequence[str] | None = None
  crs: str | None = None  # only for files that carry no CRS


def read_geometries(src: LabelLayer, target_crs: rasterio.crs.CRS) -> np.ndarray:
  """The layer's (filtered) geometries as shapely objects in `target_crs`; invalid ones (self-
  intersections, ...) repaired with shapely.make_valid, saying which features were."""
  path = Path(src.path)
  columns = [src.field] if src.field else []
  if not path.exists():
    raise DataError(path, "no such file")
  try:
    if src.field:  # pyogrio skips an unknown column silently
      known = list(pyogrio.read_info(path, layer=src.layer)["fields"])
      if src.field not in known:
        raise DataError(path, f"has no field {src.field!r}; its fields are {known}")
    meta, fids, wkb, fields = pyogrio.raw.read(
      path, layer=src.layer, columns=columns, return_fids=True
    )
  except DataError:
    raise
  except Exception as e:  # pyogrio raises several DataSource/Field errors
    raise DataError(path, f"cannot read vector layer ({e})") from e
  try:
    geoms = shapely.from_wkb(wkb)
  except shapely.errors.GEOSException as e:
    raise DataError(path, f"holds an unreadable geometry ({e})") from e
  if src.field:
    if src.values is None:
      raise ValueError(f"{path}: a field filter on {src.field!r} needs a list of values")
    keep = np.isin(np.asarray(fields[0], dtype=object), list(src.values))
    if not keep.any():
      found = sorted(set(map(str, fields[0])))
      raise DataError(
        path, f"no feature has {src.field} in {list(src.values)}; values present: {found}"
      )
    geoms, fids = geoms[keep], fids[keep]
  keep = ~shapely.is_missing(geoms) & ~shapely.is_empty(geoms)
  geoms, fids = geoms[keep], fids[keep]
  layer_crs = meta["crs"] or src.crs
  if layer_crs is None:
    raise DataError(path, "layer has no CRS; give one with --crs (e.g. --crs EPSG:28992)")
  layer_crs = rasterio.crs.CRS.from_user_input(layer_crs)
  if layer_crs != target_crs:  # reproject onto the DEM's CRS
    moved = rasterio.warp.transform_geom(
      layer_crs, target_crs, [shapely.geometry.mapping(g) for g in geoms]
    )
    geoms = np.array([shapely.geometry.shape(g) for g in moved], dtype=object)
  geoms = _make_valid(path, geoms, fids)
  return geoms[~shapely.is_empty(geoms)]


def _make_valid(path: Path, geoms: np.ndarray, fids: np.ndarray) -> np.ndarray:
  """Invalid geometries repaired (shapely.make_valid, polygonal parts kept), with a note on
  stderr naming the features; a feature that cannot be repaired is an error naming it."""
  present = ~shapely.is_missing(geoms)
  bad = present & ~shapely.is_valid(geoms)
  if not bad.any():
    return geoms
  geoms = geoms.copy()
  reasons = shapely.is_valid_reason(geoms[bad])
  try:
    fixed = shapely.make_valid(geoms[bad])
  except shapely.errors.GEOSException as e:
    raise DataError(
      path, f"features {fids[bad][:10].tolist()} are invalid and could not be repaired ({e})"
    ) from e
  # keep the polygonal parts: a bow-tie becomes two triangles, a collapsed sliver a line (dropped)
  polygonal = [
    shapely.union_all(
      [p for p in shapely.get_parts(g) if p.geom_type in ("Polygon", "MultiPolygon")]
    )
    if g.geom_type == "GeometryCollection"
    else g
    for g in fixed
  ]
  geoms[bad] = polygonal
  ids = fids[bad].tolist()
  print(
    f"note: {path}: repaired {len(ids)} invalid geometr{'y' if len(ids) == 1 else 'ies'} with "
    f"make_valid: feature id(s) {ids[:10]}{' ...' if len(ids) > 10 else ''} ({reasons[0]})",
    file=sys.stderr,
  )
  return geoms


def _check_overlap(path, geoms: np.ndarray, bounds) -> None:
  if len(geoms) == 0:
    raise DataError(path, "no geometries to rasterise")
  gx0, gy0, gx1, gy1 = shapely.total_bounds(geoms)
  if gx0 >= bounds.right or gx1 <= bounds.left or gy0 >= bounds.top or gy1 <= bounds.bottom:
    raise DataError(
      path,
      f"does not overlap the DEM: layer bounds {(gx0, gy0, gx1, gy1)} vs DEM "
      f"bounds {tuple(bounds)} (same CRS after reprojection)",
    )


def rasterize_labels(
  dem_path: str | Path,
  layers: Sequence[LabelLayer],
  out_path: str | Path,
  area: str | Path | LabelLayer | None = None,
  coverage: Sequence[LabelLayer] | None = None,
  overwrite: bool = False,
  vector_crs: str | None = None,
) -> dict:
  """Rasterise `layers` onto the grid of `dem_path` (any band count: only its grid is used);
  writes a uint8 GeoTIFF; returns pixel counts. `area` (a polygon file, or a LabelLayer to pick
  some of its features) is the labelled area; `vector_crs`: of an `area` file without one."""
  with open_raster(dem_path) as dem:
    check_georeferenced(dem)
    grid = dict(out_shape=(dem.height, dem.width), transform=dem.transform)
    crs, bounds, profile = dem.crs, dem.bounds, dem.profile
  label = np.zeros(grid["out_shape"], np.uint8)
  label_geoms = []
  for layer in layers:
    geoms = read_geometries(layer, crs)
    _check_overlap(layer.path, geoms, bounds)
    label_geoms.append(geoms)
    rasterio.features.rasterize(
      geoms, fill=0, default_value=layer.value, out=label, dtype=np.uint8, **grid
    )
  if area is not None:
    area_layer = area if isinstance(area, LabelLayer) else LabelLayer(area, crs=vector_crs)
    area_geoms = read_geometries(area_layer, crs)
    _check_overlap(area_layer.path, area_geoms, bounds)
    region = shapely.union_all(area_geoms)
  else:
    cover = [read_geometries(c, crs) for c in coverage] if coverage else label_geoms
    region = shapely.union_all(np.concatenate(cover)).convex_hull
  inside = rasterio.features.rasterize([region], fill=0, default_value=1, dtype=np.uint8, **grid)
  label[inside == 0] = IGNORE
  profile.update(dtype="uint8", nodata=None, count=1, compress="deflate")
  write_band(
    out_path,
    label,
    profile,
    overwrite,
    labelled_area="given" if area else "convex hull of coverage layers",
    sources=";".join(str(Path(layer.path).name) for layer in layers),
  )
  values, counts = np.unique(label, return_counts=True)
  return {int(v): int(c) for v, c in zip(values, counts)}


def labels_from_class_raster(
  class_path: str | Path,
  out_path: str | Path,
  classes: Sequence[int] = (6,),
  valid_path: str | Path | None = None,
  overwrite: bool = False,
) -> dict:
  """A class raster (LiDAR classes, land cover) as labels: 1 where the class is in `classes`, 0
  elsewhere, IGNORE at the raster's nodata and where no return was recorded (per `valid_path`)."""
  with open_raster(class_path) as src:
    cls, profile = read_band(src, masked=True), src.profile
  label = np.isin(cls.data, list(classes)).astype(np.uint8)
  label[np.ma.getmaskarray(cls)] = IGNORE
  if valid_path is not None:
    with open_raster(valid_path) as v:
      label[read_band(v) == 0] = IGNORE
  profile.update(dtype="uint8", nodata=None, count=1, compress="deflate")
  write_band(out_path, label, profile, overwrite)
  values, counts = np.unique(label, return_counts=True)
  return {int(v): int(c) for v, c in zip(values, counts)}


def mask_label_conflicts(
  label_path: str | Path,
  class_path: str | Path,
  classes: Sequence[int] = (6,),
  min_area_m2: float = 50.0,
  open_m: float = 3.0,
) -> dict:
  """Set to IGNORE, in place, the labelled regions where footprints and an independent class
  raster (LiDAR class 6 of the highest return) disagree over a whole object: footprints missing
  from the register (Delft: a row of houses absent from BGT inside its hull) or standing where
  the survey saw none. Disagreements are opened with a `open_m` square first, so wall offsets and
  overhanging eaves (thin bands along every outline) stay labelled; then regions of at least
  `min_area_m2` go. Returns {"missing": cells, "extra": cells, "regions": n}."""
  import scipy.ndimage as ndi

  with open_raster(label_path) as src:
    label, profile, cell = read_band(src), src.profile, abs(src.transform.a)
  with open_raster(class_path) as src:
    if (src.height, src.width) != label.shape:
      raise DataError(
        class_path, f"grid {src.height} x {src.width} differs from the labels' {label.shape}"
      )
    surveyed = np.isin(read_band(src), list(classes))
  size = max(1, int(round(open_m / cell)))
  counts, regions = {}, 0
  for name, disagree in (("missing", surveyed & (label == 0)), ("extra", ~surveyed & (label == 1))):
    opened = ndi.binary_opening(disagree, structure=np.ones((size, size), bool))
    parts, n = ndi.label(opened)
    areas = ndi.sum(opened, parts, np.arange(1, n + 1)) * cell * cell
    big = np.isin(parts, np.flatnonzero(areas >= min_area_m2) + 1)
    # the whole disagreement connected to a big opened region goes, not only its opened core
    whole, _ = ndi.label(disagree)
    region = np.isin(whole, np.unique(whole[big])) & disagree if big.any() else big
    label[region] = IGNORE
    counts[name] = int(region.sum())
    regions += int((areas >= min_area_m2).sum())
  write_band(label_path, label, profile, overwrite=True)
  return {**counts, "regions": regions}


def hide_under_canopy(label_path: str | Path, canopy: str | Path) -> int:
  """Positive cells under a tree crown become unknown (255), in place: a DSM with its trees shows
  the crown, not the street or roof below it (a label there would teach "crowns are streets").
  Background under a crown stays background: a tree is background for every task. Returns how
  many cells were hidden."""
  with open_raster(label_path) as a, open_raster(canopy) as c:
    if a.shape != c.shape or a.transform != c.transform:
      raise DataError(canopy, f"grid differs from {label_path}")
    label, trees, profile = read_band(a), read_band(c, masked=True).filled(0), a.profile
  hidden = (label == 1) & (trees > 0)
  label[hidden] = IGNORE
  write_band(label_path, label, profile, overwrite=True)
  return int(hidden.sum())


def eave_cells(cell_m: float, eave_m: float = EAVE_M) -> int:
  """The eave width in whole cells (0: narrower than half a cell, nothing to do)."""
  if cell_m <= 0 or eave_m < 0:
    raise ValueError(f"cell size {cell_m} m and eave {eave_m} m must be positive")
  return int(round(eave_m / cell_m))


def disk(radius: int) -> np.ndarray:
  """A disk of `radius` cells as a boolean structuring element."""
  y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
  return x * x + y * y <= radius * radius


def unknown_eaves(label_path: str | Path, eave_m: float = EAVE_M, positive: int = 1) -> int:
  """Roof-outline labels made compatible with wall-line footprints, in place: the band of each
  labelled building within `eave_m` of its outline (where the eaves would overhang the wall)
  becomes unknown (255), so training on areas of both conventions does not teach a blend of
  them. Returns how many cells became unknown."""
  import scipy.ndimage as ndi

  with open_raster(label_path) as src:
    label, profile, cell = read_band(src), src.profile, abs(src.transform.a)
  r = eave_cells(cell, eave_m)
  if r == 0:
    return 0
  building = label == positive
  # outside the raster counts as building, so the raster's edge is not taken for an outline
  core = ndi.binary_erosion(building, structure=disk(r), border_value=1)
  band = building & ~core
  label[band] = IGNORE
  write_band(label_path, label, profile, overwrite=True)
  return int(band.sum())
