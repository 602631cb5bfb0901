"""Building polygons from a class raster: vectorised across blocks with holes kept, regularised to
right angles, with heights (nDSM, DSM - DTM, or estimated from the DSM alone), mean probability,
source and model, written to a GeoPackage."""

import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.features
import shapely
import shapely.affinity
from rasterio.transform import from_origin

from demmae_jax.gis import polygons

CRS = "EPSG:28992"
CELL = 0.5
TRANSFORM = from_origin(1000.0, 2000.0, CELL, CELL)
SHAPE = (200, 220)


def write(path, data, dtype, nodata=None):
  with rasterio.open(
    path,
    "w",
    driver="GTiff",
    width=SHAPE[1],
    height=SHAPE[0],
    count=1,
    dtype=dtype,
    crs=CRS,
    transform=TRANSFORM,
    nodata=nodata,
  ) as dst:
    dst.write(np.asarray(data).astype(dtype), 1)
  return path


def scene():
  """A 30 degree rotated L-shaped building with a courtyard, and a rectangle across blocks."""
  ell = shapely.Polygon(
    [(0, 0), (30, 0), (30, 12), (12, 12), (12, 28), (0, 28)], [[(3, 3), (8, 3), (8, 8), (3, 8)]]
  )
  ell = shapely.affinity.rotate(ell, 30, origin=(0, 0))
  ell = shapely.affinity.translate(ell, 1030, 1925)
  rect = shapely.box(1070, 1905, 1100, 1930)  # crosses the 64 px block edges
  return ell, rect


def test_polygons_are_right_angled_with_holes_heights_and_probability(tmp_path):
  ell, rect = scene()
  grid = dict(out_shape=SHAPE, transform=TRANSFORM)
  buildings = rasterio.features.rasterize(
    [ell, rect], fill=0, default_value=1, dtype=np.uint8, **grid
  )
  classes = write(tmp_path / "classes.tif", buildings, "uint8", 255)
  rows, cols = np.mgrid[: SHAPE[0], : SHAPE[1]]
  ground = 5.0 + 0.05 * cols  # a sloping street
  roof = np.where(
    rasterio.features.rasterize([ell], fill=0, default_value=1, dtype=np.uint8, **grid), 12.0, 0.0
  ) + np.where(
    rasterio.features.rasterize([rect], fill=0, default_value=1, dtype=np.uint8, **grid), 6.0, 0.0
  )
  dsm = write(tmp_path / "dsm.tif", ground + roof, "float32", np.nan)
  dtm = write(tmp_path / "dtm.tif", ground, "float32", np.nan)
  probs = np.stack([1 - 0.8 * buildings, 0.8 * buildings + 0.1 * (1 - buildings)])
  with rasterio.open(
    tmp_path / "p.tif",
    "w",
    driver="GTiff",
    width=SHAPE[1],
    height=SHAPE[0],
    count=2,
    dtype="float32",
    crs=CRS,
    transform=TRANSFORM,
  ) as dst:
    dst.write(probs.astype(np.float32))
  opts = polygons.PolygonOptions(regularise=True, block=64, min_area_m2=10)
  for kind, source in [("dtm", dict(dsm=dsm, dtm=dtm)), ("dsm", dict(dsm=dsm))]:
    heights = polygons.HeightSource(**source)
    out = tmp_path / f"b_{kind}.gpkg"
    summary = polygons.write_class_polygons(
      classes,
      out,
      value=1,
      name="building",
      opts=opts,
      probabilities=tmp_path / "p.tif",
      heights=heights,
      source="dsm.tif",
      model="runs/x",
    )
    heights.close()
    assert summary["polygons"] == 2 and summary["regularised"] == 2
    meta, _, wkb, fields = pyogrio.raw.read(out)
    got = dict(zip(meta["fields"], fields))
    assert rasterio.crs.CRS.from_user_input(meta["crs"]) == rasterio.crs.CRS.from_string(CRS)
    geoms = shapely.from_wkb(wkb)
    i_ell = int(np.argmax([g.intersection(ell).area for g in geoms]))
    shaped = geoms[i_ell]
    assert len(shaped.interiors) == 1, "the courtyard is kept"
    assert len(shaped.exterior.coords) == 7, "an L has six corners"
    ring = np.asarray(shaped.exterior.coords)[:-1]
    a, b = np.roll(ring, -1, 0) - ring, ring - np.roll(ring, 1, 0)
    cos = np.abs((a * b).sum(1)) / np.hypot(*a.T) / np.hypot(*b.T)
    assert cos.max() < 1e-6, "every corner is a right angle"
    assert shapely.Polygon(shaped).symmetric_difference(ell).area < 0.08 * ell.area
    assert got["area_m2"][i_ell] == pytest.approx(shaped.area)
    assert got["perimeter_m"][i_ell] == pytest.approx(shaped.length)
    assert got["height_median_m"][i_ell] == pytest.approx(12.0, abs=0.01)
    assert got["height_median_m"][1 - i_ell] == pytest.approx(6.0, abs=0.01)
    assert got["height_max_m"][i_ell] == pytest.approx(12.0, abs=0.01)
    assert list(got["height_from"]) == [kind] * 2
    assert 0.75 < got["prob_mean"][i_ell] <= 0.8  # edge cells of the shaped polygon may be outside
    assert list(got["source"]) == ["dsm.tif"] * 2 and list(got["model"]) == ["runs/x"] * 2
  with pytest.raises(FileExistsError, match="b_dsm.gpkg"):
    polygons.write_class_polygons(classes, out, value=1, name="building", opts=opts)


def test_vectorise_merges_across_blocks_and_plain_outline_keeps_area(tmp_path):
  _, rect = scene()
  mask = rasterio.features.rasterize([rect], out_shape=SHAPE, transform=TRANSFORM, dtype=np.uint8)
  classes = write(tmp_path / "c.tif", mask, "uint8", 255)
  geoms, crs = polygons.vectorise(classes, 1, block=32)
  assert len(geoms) == 1 and geoms[0].area == pytest.approx(rect.area)
  shaped, n = polygons.shape_polygons(geoms, polygons.PolygonOptions(simplify_m=1.0), CELL)
  assert n == 0 and shaped[0].area == pytest.approx(rect.area)


def test_orthogonal_ring_refuses_what_is_not_a_polygon_with_sides():
  assert polygons.orthogonal_ring(np.array([(0, 0), (1, 0), (2, 0), (0, 0)])) is None
  square = polygons.orthogonal_ring(np.array([(0, 0), (10, 0.4), (10.2, 10), (0, 9.8), (0, 0)]))
  assert len(square) == 5 and shapely.Polygon(square).area == pytest.approx(100, rel=0.03)
