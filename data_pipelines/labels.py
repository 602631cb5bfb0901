"""Vector labels (GeoPackage, SQLite, Shapefile, GeoJSON via pyogrio) rasterised onto a DEM grid.

Output is uint8: 0 background, the layer's class value where its polygons are, and IGNORE (255)
outside the labelled area, so that "nobody labelled this" is never learned as "background". The
labelled area is a user-given polygon layer, or by default the convex hull of the coverage layers
(the label layers themselves unless others are named, e.g. all BGT layers of a crop).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import pyogrio
import rasterio
import rasterio.crs
import rasterio.features
import rasterio.warp
import shapely
import shapely.geometry

from data_pipelines.atomic import atomic_file
from data_pipelines.errors import DataError
from data_pipelines.raster_io import read_band

IGNORE = 255


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
  """The layer's (filtered) geometries as shapely objects in `target_crs`."""
  path = Path(src.path)
  columns = [src.field] if src.field else []
  try:
    meta, _, wkb, fields = pyogrio.raw.read(path, layer=src.layer, columns=columns)
  except Exception as e:  # pyogrio raises several DataSource/Field errors
    raise DataError(path, f"cannot read vector layer ({e})") from e
  geoms = shapely.from_wkb(wkb)
  if src.field:
    if src.values is None:
      raise ValueError(f"{path}: a field filter on {src.field!r} needs a list of values")
    keep = np.isin(np.asarray(fields[0], dtype=object), list(src.values))
    if not keep.any():
      found = sorted(set(map(str, fields[0])))
      raise DataError(path, f"no feature has {src.field} in {list(src.values)}; values present: {found}")
    geoms = geoms[keep]
  geoms = geoms[~shapely.is_missing(geoms) & ~shapely.is_empty(geoms)]
  layer_crs = meta["crs"] or src.crs
  if layer_crs is None:
    raise DataError(path, "layer has no CRS; give one")
  layer_crs = rasterio.crs.CRS.from_user_input(layer_crs)
  if layer_crs != target_crs:  # reproject onto the DEM's CRS
    moved = rasterio.warp.transform_geom(layer_crs, target_crs, [shapely.geometry.mapping(g) for g in geoms])
    geoms = np.array([shapely.geometry.shape(g) for g in moved], dtype=object)
  return geoms


def _check_overlap(path, geoms: np.ndarray, bounds) -> None:
  if len(geoms) == 0:
    raise DataError(path, "no geometries to rasterise")
  gx0, gy0, gx1, gy1 = shapely.total_bounds(geoms)
  if gx0 >= bounds.right or gx1 <= bounds.left or gy0 >= bounds.top or gy1 <= bounds.bottom:
    raise DataError(path, f"does not overlap the DEM: layer bounds {(gx0, gy0, gx1, gy1)} vs DEM "
                    f"bounds {tuple(bounds)} (same CRS after reprojection)")


def rasterize_labels(dem_path: str | Path, layers: Sequence[LabelLayer], out_path: str | Path,
                     area: str | Path | LabelLayer | None = None,
                     coverage: Sequence[LabelLayer] | None = None, overwrite: bool = False) -> dict:
  """Rasterise `layers` onto the grid of `dem_path`; writes a uint8 GeoTIFF; returns pixel counts.
  `area` (a polygon file, or a LabelLayer to pick some of its features) is the labelled area."""
  with rasterio.open(dem_path) as dem:
    grid = dict(out_shape=(dem.height, dem.width), transform=dem.transform)
    crs, bounds, profile = dem.crs, dem.bounds, dem.profile
  if crs is None:
    raise DataError(dem_path, "DEM has no CRS")
  label = np.zeros(grid["out_shape"], np.uint8)
  label_geoms = []
  for layer in layers:
    geoms = read_geometries(layer, crs)
    _check_overlap(layer.path, geoms, bounds)
    label_geoms.append(geoms)
    rasterio.features.rasterize(geoms, fill=0, default_value=layer.value, out=label, dtype=np.uint8, **grid)
  if area is not None:
    area_layer = area if isinstance(area, LabelLayer) else LabelLayer(area)
    area_geoms = read_geometries(area_layer, crs)
    _check_overlap(area_layer.path, area_geoms, bounds)
    region = shapely.union_all(area_geoms)
  else:
    cover = [read_geometries(c, crs) for c in coverage] if coverage else label_geoms
    region = shapely.union_all(np.concatenate(cover)).convex_hull
  inside = rasterio.features.rasterize([region], fill=0, default_value=1, dtype=np.uint8, **grid)
  label[inside == 0] = IGNORE
  profile.update(dtype="uint8", nodata=None, count=1, compress="deflate")
  with atomic_file(out_path, overwrite) as tmp:
    with rasterio.open(tmp, "w", **profile) as sink:
      sink.write(label, 1)
      sink.update_tags(labelled_area="given" if area else "convex hull of coverage layers",
                       sources=";".join(str(Path(l.path).name) for l in layers))
  values, counts = np.unique(label, return_counts=True)
  return {int(v): int(c) for v, c in zip(values, counts)}


def labels_from_class_raster(class_path: str | Path, out_path: str | Path, classes: Sequence[int] = (6,),
                             valid_path: str | Path | None = None, overwrite: bool = False) -> dict:
  """A class raster (LiDAR classes, land cover) as labels: 1 where the class is in `classes`, 0
  elsewhere, IGNORE at the raster's nodata and where no return was recorded (per `valid_path`)."""
  with rasterio.open(class_path) as src:
    cls, profile = read_band(src, masked=True), src.profile
  label = np.isin(cls.data, list(classes)).astype(np.uint8)
  label[np.ma.getmaskarray(cls)] = IGNORE
  if valid_path is not None:
    with rasterio.open(valid_path) as v:
      label[read_band(v) == 0] = IGNORE
  profile.update(dtype="uint8", nodata=None, count=1, compress="deflate")
  with atomic_file(out_path, overwrite) as tmp:
    with rasterio.open(tmp, "w", **profile) as sink:
      sink.write(label, 1)
  values, counts = np.unique(label, return_counts=True)
  return {int(v): int(c) for v, c in zip(values, counts)}
