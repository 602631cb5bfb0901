"""Change between two surveys on a synthetic block: the vertical offset is measured on ground and
removed, then new, demolished, raised and unchanged buildings are told apart; footprints built
between the surveys are checked against the new/raised polygons."""

import json

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin

from data_pipelines.errors import DataError
from demmae_jax.gis import change, cog

CRS = "EPSG:28992"
TRANSFORM = from_origin(120000.0, 486000.0, 1.0, 1.0)
SHAPE = (120, 140)
BOXES = {
  "kept": (10, 10, 30, 40),
  "new": (50, 10, 70, 30),
  "gone": (10, 60, 30, 80),
  "raised": (50, 60, 75, 90),
}  # rows r0, c0, r1, c1 (cells)


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
  return str(path)


def survey(tmp_path, name, buildings: dict, offset: float, seed: int):
  rng = np.random.default_rng(seed)
  ground = 1.0 + 0.01 * np.arange(SHAPE[1])[None, :] + np.zeros(SHAPE)
  dsm = ground + offset + rng.normal(0, 0.03, SHAPE)
  classes = np.zeros(SHAPE, np.uint8)
  for key, height in buildings.items():
    r0, c0, r1, c1 = BOXES[key]
    dsm[r0:r1, c0:c1] = ground[r0:r1, c0:c1] + offset + height
    classes[r0:r1, c0:c1] = 1
  lidar = np.where(classes == 1, 6, 2)
  dsm[:, -5:] = np.nan  # an edge without returns: nodata, never a change
  classes[:, -5:] = 255
  return change.Survey(
    write(tmp_path / f"{name}_dsm.tif", dsm, "float32", np.nan),
    write(tmp_path / f"{name}_dtm.tif", ground + offset, "float32", np.nan),
    write(tmp_path / f"{name}_cls.tif", classes, "uint8", 255),
    write(tmp_path / f"{name}_lidar.tif", lidar, "uint8"),
  )


def box(key):
  r0, c0, r1, c1 = BOXES[key]
  x0, y0 = TRANSFORM @ (c0, r1)
  x1, y1 = TRANSFORM @ (c1, r0)
  return shapely.box(x0, y0, x1, y1)


def test_change_between_two_surveys(tmp_path):
  a = survey(tmp_path, "a", {"kept": 9.0, "gone": 12.0, "raised": 6.0}, offset=0.0, seed=0)
  b = survey(tmp_path, "b", {"kept": 9.0, "new": 7.0, "raised": 10.0}, offset=0.15, seed=1)
  off = change.vertical_offset(a, b)
  assert off["median_m"] == pytest.approx(0.15, abs=0.015) and off["ground_from"].startswith(
    "lidar"
  )
  fp = tmp_path / "bag.gpkg"
  pyogrio.raw.write(
    fp,
    geometry=np.array(shapely.to_wkb([box(k) for k in BOXES]), dtype=object),
    field_data=[np.array([1990.0, 2012.0, 1950.0, 2013.0])],
    fields=["bouwjaar"],
    crs=CRS,
    layer="pand",
    geometry_type="Polygon",
    driver="GPKG",
  )
  out = tmp_path / "change"
  assert (
    change.main(
      [
        "--earlier",
        *a.__dict__.values(),
        "--later",
        *b.__dict__.values(),
        "--out",
        str(out),
        "--footprints",
        str(fp),
        "--built_after",
        "2010",
        "--built_before",
        "2014",
        "--png",
        str(tmp_path / "map.png"),
      ]
    )
    == 0
  )
  result = json.loads((out / "change.json").read_text())
  assert {k: v["polygons"] for k, v in result["changes"].items()} == {
    "new": 1,
    "demolished": 1,
    "raised": 1,
    "lowered": 0,
  }
  assert result["changes"]["raised"]["area_m2"] == pytest.approx(box("raised").area, rel=0.15)
  check = result["footprints"]
  assert (check["built_between_count"], check["built_between_found"]) == (2, 2)
  assert (check["older_count"], check["older_flagged"]) == (2, 0)
  meta, _, wkb, fields = pyogrio.raw.read(out / "change.gpkg")
  got = dict(zip(meta["fields"], fields))
  i = list(got["change"]).index("raised")
  assert got["dh_median_m"][i] == pytest.approx(4.0, abs=0.05)
  assert got["height_before_m"][i] == pytest.approx(6.0, abs=0.05)
  assert got["height_after_m"][i] == pytest.approx(10.0, abs=0.05)
  j = list(got["change"]).index("demolished")
  assert shapely.from_wkb(wkb[j]).intersection(box("gone")).area > 0.8 * box("gone").area
  assert cog.validate(out / "change.tif")[0] and cog.validate(out / "dh.tif")[0]
  with rasterio.open(out / "change.tif") as src:
    codes = src.read(1)
    assert src.colormap(1)[change.NEW][:3] == change.COLOURS[change.NEW][:3]
  assert (codes[:, -5:] == change.NODATA).all()
  assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(FileExistsError):
    change.write_change(a, b, out)


def test_surveys_on_other_grids_are_refused(tmp_path):
  a = survey(tmp_path, "a", {"kept": 9.0}, 0.0, 0)
  other = tmp_path / "moved.tif"
  with rasterio.open(
    other,
    "w",
    driver="GTiff",
    width=SHAPE[1],
    height=SHAPE[0],
    count=1,
    dtype="float32",
    crs=CRS,
    transform=from_origin(120001.0, 486000.0, 1, 1),
  ) as d:
    d.write(np.zeros(SHAPE, np.float32), 1)
  with pytest.raises(DataError, match="moved.tif"):
    change.vertical_offset(a, change.Survey(str(other), a.dtm, a.classes))


def test_change_cli_names_a_missing_file_in_one_line(tmp_path, capsys):
  a = survey(tmp_path, "a", {"kept": 9.0}, 0.0, 0)
  missing = str(tmp_path / "nosuch_dsm.tif")
  rc = change.main(
    [
      "--earlier",
      *a.__dict__.values(),
      "--later",
      missing,
      a.dtm,
      a.classes,
      "--out",
      str(tmp_path / "c"),
    ]
  )
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.startswith("change: error: ") and "nosuch_dsm.tif" in err
  assert len(err.splitlines()) == 1 and not (tmp_path / "c").exists()


def test_rough_new_objects_are_dropped_as_vegetation(tmp_path):
  a = survey(tmp_path, "a", {"kept": 9.0}, 0.0, 0)
  b = survey(tmp_path, "b", {"kept": 9.0, "new": 7.0}, 0.0, 1)
  with rasterio.open(b.dsm, "r+") as dsm, rasterio.open(b.classes, "r+") as cls:
    z, c = dsm.read(1), cls.read(1)
    crown = np.s_[85:110, 30:50]  # a tree the model took for a building: bumpy, ~8 m
    z[crown] += 8.0 + np.random.default_rng(2).uniform(-2.0, 2.0, z[crown].shape)
    c[crown] = 1
    dsm.write(z, 1)
    cls.write(c, 1)
  plain = change.write_change(a, b, tmp_path / "plain")
  filtered = change.write_change(
    a, b, tmp_path / "filtered", change.ChangeOptions(max_roughness_m=0.2)
  )
  assert plain["changes"]["new"]["polygons"] == 2
  assert filtered["changes"]["new"] == {
    "polygons": 1,
    "area_m2": pytest.approx(box("new").area, rel=0.15),
    "dropped_rough": 1,
  }
  meta, _, _, fields = pyogrio.raw.read(tmp_path / "plain" / "change.gpkg")
  rough = dict(zip(meta["fields"], fields))["roughness_after_m"]
  assert sorted(rough)[0] < 0.1 < 0.5 < sorted(rough)[1]  # a roof is smooth, the crown is not


def test_cells_near_a_survey_edge_are_not_compared(tmp_path):
  a = survey(tmp_path, "a", {"kept": 9.0}, 0.0, 0)
  b = survey(tmp_path, "b", {"kept": 9.0}, 0.0, 1)
  with rasterio.open(b.classes, "r+") as cls, rasterio.open(b.dsm, "r+") as dsm:
    c, z = cls.read(1), dsm.read(1)  # something 6 m high along the later survey's edge
    c[40:70, 127:135] = 1
    z[40:70, 127:135] += 6.0
    cls.write(c, 1)
    dsm.write(z, 1)
  near = change.write_change(a, b, tmp_path / "near")
  far = change.write_change(a, b, tmp_path / "far", change.ChangeOptions(edge_m=6))
  assert near["changes"]["new"]["polygons"] == 1 and far["changes"]["new"]["polygons"] == 0
  with rasterio.open(tmp_path / "far" / "change.tif") as src:
    codes = src.read(1)
  assert (codes[:, 129:] == change.NODATA).all() and (codes[6:-6, 6:120] != change.NODATA).all()
  assert (codes[:6] == change.NODATA).all()  # the raster's border is an edge too


def test_a_class_change_without_a_height_change_is_not_a_new_building(tmp_path):
  a = survey(tmp_path, "a", {"kept": 9.0, "new": 7.0}, 0.0, 0)  # there already, 7 m high ...
  b = survey(tmp_path, "b", {"kept": 9.0, "new": 7.0}, 0.0, 1)
  with rasterio.open(a.classes, "r+") as cls:  # ... but the model missed it in the first survey
    c = cls.read(1)
    r0, c0, r1, c1 = BOXES["new"]
    c[r0:r1, c0:c1] = 0
    cls.write(c, 1)
  got = change.write_change(a, b, tmp_path / "c")
  assert all(v["polygons"] == 0 for v in got["changes"].values())
