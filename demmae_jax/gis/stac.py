"""A STAC Item (JSON, STAC 1.0.0) describing one prediction: where it is (footprint in WGS84 and,
by the projection extension, the grid in its own CRS), what was written (assets: classes,
probabilities, uncertainty COGs with their roles and media types, the classes' values by the
classification extension, polygons, preview), which model and which source. Opens in QGIS's STAC
browser or any STAC tool; asset paths are relative to the Item's folder when they lie below it.

`datetime` is when the prediction was made (the source's acquisition time is not known here);
`created` says the same.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from pathlib import Path

import rasterio
import rasterio.warp
import shapely
import shapely.geometry

from data_pipelines.atomic import atomic_file
from data_pipelines.raster_io import open_raster

STAC_VERSION = "1.0.0"
EXTENSIONS = [
  "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
  "https://stac-extensions.github.io/classification/v2.0.0/schema.json",
  "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
]
COG = "image/tiff; application=geotiff; profile=cloud-optimized"
MEDIA = {
  ".tif": COG,
  ".gpkg": "application/geopackage+sqlite3",
  ".geojson": "application/geo+json",
  ".json": "application/geo+json",
  ".png": "image/png",
}
ROLES = {
  "classes": ["data"],
  "probabilities": ["data"],
  "uncertainty": ["data", "quality"],
  "polygons": ["data"],
  "png": ["overview"],
}


def _href(path: Path, item_dir: Path) -> str:
  path, item_dir = Path(os.path.abspath(path)), Path(os.path.abspath(item_dir))
  try:
    return path.relative_to(item_dir).as_posix()
  except ValueError:
    return path.as_posix()


def prediction_item(
  item_path: str | Path,
  assets: Mapping[str, str | Path | None],
  *,
  class_names,
  source: str,
  model: str,
  item_id: str | None = None,
  properties: Mapping | None = None,
) -> dict:
  """The Item for the rasters and files in `assets` (name -> path; None skipped); the grid is
  read from assets['classes']."""
  item_path = Path(item_path)
  with open_raster(assets["classes"]) as src:
    crs, transform, shape, bounds = src.crs, src.transform, src.shape, src.bounds
  box = shapely.box(*bounds)
  geometry = rasterio.warp.transform_geom(crs, "EPSG:4326", shapely.geometry.mapping(box))
  now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
  code = f"EPSG:{crs.to_epsg()}" if crs.to_epsg() else None
  props = {
    "datetime": now,
    "created": now,
    "proj:code": code,
    "proj:shape": list(shape),
    "proj:transform": list(transform)[:6],
    "proj:bbox": list(bounds),
    "demmae:model": model,
    "demmae:source": source,
  }
  if code is None:
    props["proj:wkt2"] = crs.to_wkt()
  props.update(properties or {})
  out_assets = {}
  for name, path in assets.items():
    if path is None:
      continue
    path = Path(path)
    asset = {
      "href": _href(path, item_path.parent),
      "type": MEDIA.get(path.suffix.lower(), "application/octet-stream"),
      "roles": ROLES.get(name, ["data"]),
      "title": name,
    }
    if name == "classes":
      asset["classification:classes"] = [{"value": i, "name": n} for i, n in enumerate(class_names)]
      asset["raster:bands"] = [{"nodata": 255, "data_type": "uint8"}]
    out_assets[name] = asset
  shape_geo = shapely.geometry.shape(geometry)
  return {
    "type": "Feature",
    "stac_version": STAC_VERSION,
    "stac_extensions": EXTENSIONS,
    "id": item_id or item_path.name.removesuffix(".json"),
    "geometry": geometry,
    "bbox": list(shape_geo.bounds),
    "properties": props,
    "assets": out_assets,
    "links": [{"rel": "derived_from", "href": source, "title": "elevation input"}],
  }


def write_item(
  item_path: str | Path,
  assets: Mapping[str, str | Path | None],
  *,
  class_names,
  source: str,
  model: str,
  overwrite: bool = False,
  **kw,
) -> Path:
  """`prediction_item` written atomically (an existing file refused unless `overwrite`)."""
  item = prediction_item(
    item_path, assets, class_names=class_names, source=source, model=model, **kw
  )
  with atomic_file(item_path, overwrite) as tmp:
    Path(tmp).write_text(json.dumps(item, indent=1) + "\n")
  return Path(item_path)
