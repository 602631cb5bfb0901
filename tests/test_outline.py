"""Building outline conventions (demmae_jax/inference/outline.py): wall-line maps to roof outlines."""

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from demmae_jax.inference import outline


def _house(shape=(40, 50), box=(10, 30, 15, 35)):
  classes = np.zeros(shape, np.uint8)
  r0, r1, c0, c1 = box
  classes[r0:r1, c0:c1] = 1
  return classes


def test_roof_outline_grows_walls_by_the_eave_in_cells_and_keeps_nodata():
  walls = _house()
  walls[:, 45:] = 255  # no prediction
  walls[5:35, 35] = 255  # a nodata line along the east wall
  at_1m = outline.to_roof_outline(walls, 1.0, 1.0)
  assert (at_1m == 1).sum() == 20 * 20 + 3 * 20  # one cell on three sides; none into nodata
  assert (at_1m[:, 45:] == 255).all() and (at_1m[5:35, 35] == 255).all()
  assert at_1m[9, 20] == 1 and at_1m[8, 20] == 0  # one cell, not two
  assert at_1m[9, 14] == 0  # a disk: corners are not squared off
  at_half = outline.to_roof_outline(walls, 0.5, 1.0)
  assert at_half[8, 20] == 1 and at_half[7, 20] == 0  # 1 m = two 0.5 m cells
  np.testing.assert_array_equal(outline.to_roof_outline(walls, 4.0, 1.0), walls)  # < half a cell
  with pytest.raises(ValueError, match="positive"):
    outline.eave_cells(0.0)


def test_convert_raster_in_blocks_equals_the_whole_raster(tmp_path):
  rng = np.random.default_rng(0)
  classes = (rng.random((130, 170)) > 0.97).astype(np.uint8)
  classes[rng.random(classes.shape) > 0.98] = 255
  profile = dict(
    driver="GTiff",
    width=170,
    height=130,
    count=1,
    dtype="uint8",
    nodata=255,
    crs="EPSG:28992",
    transform=from_origin(85000, 446000, 0.5, 0.5),
  )
  src = tmp_path / "classes.tif"
  with rasterio.open(src, "w", **profile) as dst:
    dst.write(classes, 1)
    dst.write_colormap(1, {0: (0, 0, 0, 0), 1: (200, 30, 30, 255)})
  counts = outline.convert_raster(src, tmp_path / "roofs.tif", block=32)
  with rasterio.open(tmp_path / "roofs.tif") as r:
    converted, tags = r.read(1), r.tags()
    assert r.crs.to_epsg() == 28992 and r.transform == profile["transform"]
    assert r.colormap(1)[1] == (200, 30, 30, 255) and r.nodata == 255
  from demmae_jax.gis import cog

  assert cog.validate(tmp_path / "roofs.tif")[0]
  np.testing.assert_array_equal(converted, outline.to_roof_outline(classes, 0.5))
  assert "roof" in tags["outline"]
  np.testing.assert_array_equal(counts[[0, 1, 255]], [(converted == v).sum() for v in (0, 1, 255)])
  outline.convert_raster(src, src, block=64)  # in place
  with rasterio.open(src) as r:
    np.testing.assert_array_equal(r.read(1), converted)
  assert (converted == 1).sum() > (classes == 1).sum()


def test_eave_agreement_finds_the_width_that_matches_roofs():
  walls = _house()
  roofs = outline.to_roof_outline(walls, 1.0, 1.0) == 1  # roofs overhang every wall by a cell
  got = outline.eave_agreement(walls, roofs, 1.0, (0.0, 1.0, 2.0))
  assert got["iou"][1.0] == 1.0 and got["iou"][0.0] < 1.0 and got["iou"][2.0] < 1.0
  assert got["outside_share"] == 1.0
  flush = outline.eave_agreement(walls, walls == 1, 1.0)
  assert flush["iou"][0.0] == 1.0 and flush["outside_share"] == 0.0


def test_unknown_eaves_hides_the_band_inside_each_outline_but_not_at_the_raster_edge(tmp_path):
  from data_pipelines.labels import unknown_eaves

  label = _house()
  label[0:8, 0:10] = 1  # a building cut by the raster's edge
  path = tmp_path / "labels.tif"
  with rasterio.open(
    path,
    "w",
    driver="GTiff",
    width=50,
    height=40,
    count=1,
    dtype="uint8",
    nodata=255,
    crs="EPSG:3007",
    transform=from_origin(0, 40, 1, 1),
  ) as dst:
    dst.write(label, 1)
  assert unknown_eaves(path, 1.0) == 2 * 20 + 2 * 18 + 8 + 10 - 1
  with rasterio.open(path) as src:
    got = src.read(1)
  assert (got[10, 15:35] == 255).all() and (got[11:29, 16:34] == 1).all()  # band, then core
  assert (got[0, 0:9] == 1).all() and (got[0:7, 0] == 1).all()  # the raster edge is no outline
  assert (got[label == 0] == 0).all()  # background untouched


@pytest.mark.realdata
def test_gothenburg_trained_beside_wall_lines_loses_its_eave_band(tmp_path):
  from data_pipelines.areas import prepare_area
  from data_pipelines.reader import read_manifest

  plain = read_manifest(
    str(prepare_area("gothenburg", tmp_path / "roof", "buildings", progress=False))
  )
  walls = read_manifest(
    str(prepare_area("gothenburg", tmp_path / "wall", "buildings", wall_lines=True, progress=False))
  )
  assert plain["preset"]["eaves_unknown"]["cells"] == 0 and plain["preset"]["outline"] == "roof"
  cells = walls["preset"]["eaves_unknown"]["cells"]
  with (
    rasterio.open(tmp_path / "roof" / "labels" / "buildings.tif") as a,
    rasterio.open(tmp_path / "wall" / "labels" / "buildings.tif") as b,
  ):
    roof, wall = a.read(1), b.read(1)
  assert cells == ((wall == 255) & (roof == 1)).sum() > 1000
  assert ((wall != roof) <= (roof == 1)).all()  # only building cells changed
