"""Polygons to GeoPackage/GeoJSON, atomically (pyogrio): a temporary beside the target (named like
data_pipelines.atomic's, so a killed run's is swept by the next write), renamed on success; an
existing file is refused unless `overwrite`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import shapely

from data_pipelines.atomic import refuse_existing, sweep_stale, temp_prefix

DRIVERS = {".geojson": "GeoJSON", ".json": "GeoJSON", ".gpkg": "GPKG"}


def check_vector_path(path: str | Path) -> None:
  if Path(path).suffix.lower() not in DRIVERS:
    raise ValueError(f"{path}: polygons are written as {sorted(DRIVERS)}")


def layer_name(name: str) -> str:
  return "".join(ch if ch.isalnum() else "_" for ch in name) or "polygons"


def write_polygons(
  path: str | Path,
  geoms: Sequence,
  fields: Mapping[str, Sequence],
  crs,
  layer: str,
  overwrite: bool = False,
  geometry_type: str = "Polygon",
) -> Path:
  """`geoms` (shapely) with one attribute column per `fields` entry, in `crs` (a rasterio CRS)."""
  import pyogrio.raw

  path = Path(path)
  check_vector_path(path)
  refuse_existing(path, overwrite)
  # OGR drivers want their own extension, so the temporary keeps it (atomic_file's would not).
  path.parent.mkdir(parents=True, exist_ok=True)
  sweep_stale(path.parent)
  tmp = path.with_name(f"{temp_prefix(path.name)}{os.urandom(4).hex()}.tmp{path.suffix}")
  columns = [
    np.asarray(v, dtype=object if not len(v) or isinstance(v[0], str) else None)
    for v in fields.values()
  ]
  try:
    pyogrio.raw.write(
      tmp,
      geometry=np.array(shapely.to_wkb(list(geoms)), dtype=object),
      field_data=columns,
      fields=list(fields),
      crs=crs.to_wkt(),
      layer=layer_name(layer),
      geometry_type=geometry_type,
      driver=DRIVERS[path.suffix.lower()],
    )
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return path


def read_polygons(path: str | Path, target_crs, layer=None, fields: Sequence[str] = ()):
  """(shapely geometries in `target_crs`, {field: values}) of a vector layer, aligned feature by
  feature; invalid geometries repaired (shapely.make_valid), empty ones dropped. A missing file, an
  unreadable layer, a missing field or a layer without CRS is a DataError naming the file."""
  import pyogrio
  import rasterio.crs
  import rasterio.warp

  from data_pipelines.errors import DataError

  path = Path(path)
  if not path.exists():
    raise DataError(path, "no such file")
  try:
    known = list(pyogrio.read_info(path, layer=layer)["fields"])
    missing = [f for f in fields if f not in known]
    if missing:
      raise DataError(path, f"has no field(s) {missing}; its fields are {known}")
    meta, _, wkb, values = pyogrio.raw.read(path, layer=layer, columns=list(fields))
  except DataError:
    raise
  except Exception as e:  # pyogrio raises several DataSource/Field errors
    raise DataError(path, f"cannot read vector layer ({e})") from e
  if meta["crs"] is None:
    raise DataError(path, "layer has no CRS")
  geoms = shapely.from_wkb(wkb)
  src = rasterio.crs.CRS.from_user_input(meta["crs"])
  if src != target_crs:
    moved = rasterio.warp.transform_geom(
      src, target_crs, [shapely.geometry.mapping(g) for g in geoms]
    )
    geoms = np.array([shapely.geometry.shape(g) for g in moved], dtype=object)
  geoms = shapely.make_valid(geoms)
  keep = ~shapely.is_empty(geoms)
  return geoms[keep], {f: np.asarray(v)[keep] for f, v in zip(fields, values)}
