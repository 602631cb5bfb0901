"""A STAC Item per prediction: footprint in WGS84 around the raster, its grid by the projection
extension, assets with COG media types and relative paths, the classes by the classification
extension; refused when it exists."""

import json

import numpy as np
import pytest
import rasterio
import rasterio.warp
import shapely
import shapely.geometry
from rasterio.transform import from_origin

from demmae_jax.gis import stac


def test_stac_item_describes_the_prediction(tmp_path):
  transform = from_origin(84800.0, 447650.0, 0.5, 0.5)  # Delft, RD New
  out = tmp_path / "pred"
  out.mkdir()
  with rasterio.open(
    out / "classes.tif",
    "w",
    driver="GTiff",
    width=60,
    height=40,
    count=1,
    dtype="uint8",
    crs="EPSG:28992",
    transform=transform,
    nodata=255,
  ) as dst:
    dst.write(np.zeros((40, 60), np.uint8), 1)
  (out / "b.gpkg").write_bytes(b"x")
  path = stac.write_item(
    out / "item.json",
    {"classes": out / "classes.tif", "probabilities": None, "polygons": out / "b.gpkg"},
    class_names=["background", "building"],
    source="/data/dsm.tif",
    model="runs/x step 3",
    properties={"demmae:tta": True},
  )
  item = json.loads(path.read_text())
  assert item["type"] == "Feature" and item["stac_version"] == "1.0.0" and item["id"] == "item"
  footprint = shapely.geometry.shape(item["geometry"])
  (lon,), (lat,) = rasterio.warp.transform("EPSG:28992", "EPSG:4326", [84815.0], [447640.0])
  assert 4.3 < lon < 4.4 and 51.9 < lat < 52.1  # Delft
  assert footprint.contains(shapely.Point(lon, lat))  # the raster's centre
  assert footprint.area < 1e-6 and item["bbox"] == list(footprint.bounds)
  p = item["properties"]
  assert p["proj:code"] == "EPSG:28992" and p["proj:shape"] == [40, 60]
  assert p["proj:transform"] == [0.5, 0.0, 84800.0, 0.0, -0.5, 447650.0]
  assert p["demmae:model"] == "runs/x step 3" and p["demmae:tta"] is True
  assert p["datetime"].endswith("Z")
  assert set(item["assets"]) == {"classes", "polygons"}
  classes = item["assets"]["classes"]
  assert classes["href"] == "classes.tif" and "cloud-optimized" in classes["type"]
  assert classes["classification:classes"][1] == {"value": 1, "name": "building"}
  assert item["assets"]["polygons"]["type"] == "application/geopackage+sqlite3"
  assert item["links"][0] == {
    "rel": "derived_from",
    "href": "/data/dsm.tif",
    "title": "elevation input",
  }
  with pytest.raises(FileExistsError, match="item.json"):
    stac.write_item(
      out / "item.json",
      {"classes": out / "classes.tif"},
      class_names=["a", "b"],
      source="s",
      model="m",
    )
