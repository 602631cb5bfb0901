"""Vector labels rasterised onto a DEM grid, with an attribute filter, reprojection and ignore."""

import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.warp
import shapely
import shapely.geometry

from data_pipelines.errors import DataError
from data_pipelines.labels import IGNORE, LabelLayer, rasterize_labels
from data_pipelines.synthetic import synthetic_scene, write_scene_geotiffs

X0, Y0 = 500_000.0, 5_000_000.0  # UTM 31N, 1 m cells, 64 x 64


def _write_vector(path, geoms, crs, kinds=None):
  fields = [np.array(kinds, dtype=object)] if kinds is not None else None
  pyogrio.raw.write(
    path,
    shapely.to_wkb(np.array(geoms, dtype=object)),
    field_data=fields,
    fields=["kind"] if kinds is not None else None,
    crs=crs,
    geometry_type="Polygon",
    driver="GeoJSON" if str(path).endswith("json") else "GPKG",
  )


@pytest.fixture
def dem(tmp_path):
  scene = synthetic_scene(64, 64, seed=0)
  return write_scene_geotiffs(scene, tmp_path / "dem", crs="EPSG:32631", origin=(X0, Y0))["dsm"]


def test_filtered_polygons_burn_exact_cells_and_outside_area_is_ignore(tmp_path, dem):
  road = shapely.box(X0 + 10, Y0 - 20, X0 + 30, Y0 - 10)  # cols 10..29, rows 10..19
  path = shapely.box(X0 + 40, Y0 - 50, X0 + 45, Y0 - 10)
  _write_vector(tmp_path / "roads.gpkg", [road, path], "EPSG:32631", kinds=["road", "footpath"])
  area = shapely.box(X0, Y0 - 32, X0 + 64, Y0)  # the top half is labelled
  _write_vector(tmp_path / "area.geojson", [area], "EPSG:32631")
  counts = rasterize_labels(
    dem,
    [LabelLayer(tmp_path / "roads.gpkg", field="kind", values=["road"])],
    tmp_path / "label.tif",
    area=tmp_path / "area.geojson",
  )
  label = rasterio.open(tmp_path / "label.tif").read(1)
  expected = np.zeros((64, 64), np.uint8)
  expected[10:20, 10:30] = 1
  expected[32:] = IGNORE
  np.testing.assert_array_equal(label, expected)  # the footpath was filtered out
  assert counts == {0: 64 * 32 - 200, 1: 200, IGNORE: 64 * 32}


def test_labelled_area_can_be_some_features_of_a_layer(tmp_path, dem):
  """Amsterdam's AHN3 labelled area: only some survey units of the index layer."""
  units = [
    shapely.box(X0, Y0 - 32, X0 + 32, Y0),
    shapely.box(X0 + 32, Y0 - 32, X0 + 64, Y0),
    shapely.box(X0, Y0 - 64, X0 + 64, Y0 - 32),
  ]
  _write_vector(tmp_path / "units.gpkg", units, "EPSG:32631", kinds=["ahn3", "ahn2", "ahn3"])
  _write_vector(tmp_path / "b.gpkg", [shapely.box(X0 + 8, Y0 - 56, X0 + 56, Y0 - 8)], "EPSG:32631")
  rasterize_labels(
    dem,
    [LabelLayer(tmp_path / "b.gpkg")],
    tmp_path / "l.tif",
    area=LabelLayer(tmp_path / "units.gpkg", field="kind", values=["ahn3"]),
  )
  label = rasterio.open(tmp_path / "l.tif").read(1)
  assert (label[:32, 32:] == IGNORE).all() and (label[:32, :32] != IGNORE).all()
  assert (label[32:] != IGNORE).all() and (label == 1).sum() == 48 * 48 - 24 * 24


def test_labels_in_another_crs_are_reprojected(tmp_path, dem):
  box = shapely.box(X0 + 8, Y0 - 40, X0 + 40, Y0 - 8)
  lonlat = shapely.geometry.shape(
    rasterio.warp.transform_geom("EPSG:32631", "EPSG:4326", shapely.geometry.mapping(box))
  )
  _write_vector(tmp_path / "b4326.geojson", [lonlat], "EPSG:4326")
  _write_vector(tmp_path / "b.geojson", [box], "EPSG:32631")
  rasterize_labels(
    dem, [LabelLayer(tmp_path / "b4326.geojson")], tmp_path / "l1.tif", area=tmp_path / "b.geojson"
  )
  rasterize_labels(
    dem, [LabelLayer(tmp_path / "b.geojson")], tmp_path / "l2.tif", area=tmp_path / "b.geojson"
  )
  a, b = (rasterio.open(tmp_path / f).read(1) for f in ("l1.tif", "l2.tif"))
  assert (a == 1).sum() == 32 * 32
  np.testing.assert_array_equal(a, b)


def test_default_labelled_area_is_the_hull_of_the_coverage_layers(tmp_path, dem):
  a, b = (
    shapely.box(X0 + 2, Y0 - 12, X0 + 12, Y0 - 2),
    shapely.box(X0 + 30, Y0 - 40, X0 + 40, Y0 - 30),
  )
  _write_vector(tmp_path / "two.gpkg", [a, b], "EPSG:32631")
  rasterize_labels(dem, [LabelLayer(tmp_path / "two.gpkg")], tmp_path / "l.tif")
  label = rasterio.open(tmp_path / "l.tif").read(1)
  assert label[5, 5] == 1 and label[35, 35] == 1
  assert label[20, 20] == 0  # between the two, inside their hull: background
  assert label[60, 2] == IGNORE and label[2, 60] == IGNORE  # outside the hull: unknown


def test_layer_outside_the_dem_or_without_matches_is_an_error(tmp_path, dem):
  far = shapely.box(X0 + 10_000, Y0, X0 + 10_010, Y0 + 10)
  _write_vector(tmp_path / "far.gpkg", [far], "EPSG:32631", kinds=["road"])
  with pytest.raises(DataError, match="far.gpkg: does not overlap the DEM"):
    rasterize_labels(dem, [LabelLayer(tmp_path / "far.gpkg")], tmp_path / "l.tif")
  with pytest.raises(
    DataError, match="far.gpkg: no feature has kind in \\['lane'\\]; values present: \\['road'\\]"
  ):
    rasterize_labels(
      dem, [LabelLayer(tmp_path / "far.gpkg", field="kind", values=["lane"])], tmp_path / "l.tif"
    )
  assert not (tmp_path / "l.tif").exists()


def test_vector_without_crs_needs_one_given(tmp_path, dem):
  box = shapely.box(X0 + 8, Y0 - 40, X0 + 40, Y0 - 8)
  with pytest.warns(UserWarning, match="'crs' was not provided"):  # exactly the case under test
    pyogrio.raw.write(
      tmp_path / "nocrs.shp",
      shapely.to_wkb(np.array([box])),
      field_data=None,
      fields=None,
      crs=None,
      geometry_type="Polygon",
      driver="ESRI Shapefile",
    )
  with pytest.raises(DataError, match="nocrs.shp: layer has no CRS"):
    rasterize_labels(dem, [LabelLayer(tmp_path / "nocrs.shp")], tmp_path / "l.tif")
  rasterize_labels(
    dem,
    [LabelLayer(tmp_path / "nocrs.shp", crs="EPSG:32631")],
    tmp_path / "l.tif",
    coverage=[LabelLayer(tmp_path / "nocrs.shp", crs="EPSG:32631")],
  )
  assert (rasterio.open(tmp_path / "l.tif").read(1) == 1).sum() == 32 * 32


def test_lidar_class_raster_as_labels_ignores_cells_without_returns(tmp_path, dem):
  from data_pipelines.labels import labels_from_class_raster

  profile = rasterio.open(dem).profile
  profile.update(dtype="uint8", nodata=None)
  cls = np.full((64, 64), 2, np.uint8)
  cls[10:20, 10:20] = 6
  valid = np.ones((64, 64), np.uint8)
  valid[0, :] = 0
  for name, a in (("class.tif", cls), ("valid.tif", valid)):
    with rasterio.open(tmp_path / name, "w", **profile) as d:
      d.write(a, 1)
  counts = labels_from_class_raster(
    tmp_path / "class.tif", tmp_path / "l.tif", classes=(6,), valid_path=tmp_path / "valid.tif"
  )
  label = rasterio.open(tmp_path / "l.tif").read(1)
  assert (label[10:20, 10:20] == 1).all() and (label[0] == IGNORE).all()
  assert counts == {0: 64 * 63 - 100, 1: 100, IGNORE: 64}


def test_land_cover_nodata_becomes_ignore(tmp_path, dem):
  """Gothenburg's landcover.tif: float32 classes with nodata -9999."""
  from data_pipelines.labels import labels_from_class_raster

  profile = rasterio.open(dem).profile
  profile.update(dtype="float32", nodata=-9999)
  cover = np.full((64, 64), 5, np.float32)
  cover[:8] = 1  # paved
  cover[8:20, :10] = 2  # building
  cover[-1, :] = -9999
  with rasterio.open(tmp_path / "cover.tif", "w", **profile) as d:
    d.write(cover, 1)
  counts = labels_from_class_raster(tmp_path / "cover.tif", tmp_path / "l.tif", classes=(1,))
  label = rasterio.open(tmp_path / "l.tif").read(1)
  assert (label[:8] == 1).all() and (label[-1] == IGNORE).all()
  assert counts == {0: 64 * 55, 1: 64 * 8, IGNORE: 64}


def _raster(path, array):
  profile = dict(
    driver="GTiff",
    width=array.shape[1],
    height=array.shape[0],
    count=1,
    dtype="uint8",
    crs="EPSG:32631",
    transform=rasterio.transform.from_origin(X0, Y0, 1.0, 1.0),
  )
  with rasterio.open(path, "w", **profile) as sink:
    sink.write(array, 1)
  return path


def test_label_conflicts_mask_whole_missing_or_extra_buildings_not_outline_offsets(tmp_path):
  from data_pipelines.labels import mask_label_conflicts

  label = np.zeros((64, 64), np.uint8)
  cls = np.full((64, 64), 2, np.uint8)  # ground
  label[5:25, 5:25] = 1  # a footprint ...
  cls[6:26, 5:25] = 6  # ... the survey's roof one cell south of it (an offset band, 20 m2)
  cls[40:50, 5:15] = 6  # a house of 100 m2 missing from the register
  cls[40:44, 30:34] = 6  # a 16 m2 shed missing from it: too small to call the register wrong
  label[40:50, 45:55] = 1  # a footprint the survey did not see as building (100 m2)
  label[:, 60:] = IGNORE
  cls[:, 60:] = 6  # outside the labelled area nothing changes
  before = label.copy()
  counts = mask_label_conflicts(
    _raster(tmp_path / "l.tif", label), _raster(tmp_path / "c.tif", cls), min_area_m2=50, open_m=3
  )
  after = rasterio.open(tmp_path / "l.tif").read(1)
  expected = before.copy()
  expected[40:50, 5:15] = IGNORE
  expected[40:50, 45:55] = IGNORE
  np.testing.assert_array_equal(after, expected)
  assert counts == {"missing": 100, "extra": 100, "regions": 2}
  with pytest.raises(DataError, match="c2.tif"):
    mask_label_conflicts(tmp_path / "l.tif", _raster(tmp_path / "c2.tif", cls[:32]))
