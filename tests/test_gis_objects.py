"""Object-level scores: one-to-one matching at an IoU threshold, precision/recall/F1, height
errors, and touching footprints dissolved into blocks."""

import numpy as np
import pytest
import shapely

from demmae_jax.gis import objects


def test_match_is_one_to_one_and_scores_count_misses_and_false_alarms():
  ref = [shapely.box(0, 0, 10, 10), shapely.box(20, 0, 30, 10), shapely.box(40, 0, 50, 10)]
  pred = [
    shapely.box(1, 0, 11, 10),  # IoU 9/11 with ref 0
    shapely.box(0, 0, 10, 10),  # IoU 1 with ref 0: takes it, the shifted one is left over
    shapely.box(20, 0, 30, 4),  # IoU 0.4 with ref 1: below 0.5
    shapely.box(60, 0, 70, 10),
  ]  # nothing there
  pairs = objects.match(pred, ref, 0.5)
  assert pairs == [(1, 0, 1.0)]
  s = objects.object_scores(pred, ref, 0.5)
  assert (s["matched"], s["precision"], s["recall"]) == (1, 0.25, pytest.approx(1 / 3))
  assert s["f1"] == pytest.approx(2 * 0.25 * (1 / 3) / (0.25 + 1 / 3))
  assert objects.object_scores(pred, ref, 0.3)["matched"] == 2
  assert objects.object_scores([], ref)["recall"] == 0.0


def test_height_errors():
  e = objects.height_errors([10.0, 12.0, np.nan, 5.0], [9.0, 13.0, 4.0, 5.0])
  assert e["n"] == 3 and e["bias_m"] == pytest.approx(0.0)
  assert e["mae_m"] == pytest.approx(2 / 3) and e["rmse_m"] == pytest.approx(np.sqrt(2 / 3))
  assert e["pearson_r"] == pytest.approx(np.corrcoef([10, 12, 5], [9, 13, 5])[0, 1])


def test_dissolve_merges_terraced_houses_and_keeps_attributes_of_single_ones():
  houses = [
    shapely.box(0, 0, 5, 8),
    shapely.box(5, 0, 10, 8),
    shapely.box(10, 0, 15, 8),
    shapely.box(30, 0, 40, 10),
  ]
  blocks, attrs = objects.dissolve(houses, {"h": np.array([6.0, 7.0, 8.0, 12.0])})
  assert len(blocks) == 2
  big = int(np.argmax(shapely.area(blocks)))
  assert blocks[big].area == pytest.approx(120.0, rel=1e-3) and np.isnan(attrs["h"][big])
  assert attrs["h"][1 - big] == 12.0 and blocks[1 - big].area == pytest.approx(100.0, rel=1e-3)


def test_evaluate_objects_cli_scores_a_synthetic_area(tmp_path):
  """python -m demmae_jax.gis.evaluate objects on rasters whose answer is known: two predicted
  buildings, one matching its footprint, one footprint missed; heights from the nDSM."""
  import json

  import pyogrio
  import rasterio
  import rasterio.features
  from rasterio.transform import from_origin

  from demmae_jax.gis import evaluate

  crs, transform, shape = "EPSG:28992", from_origin(85000.0, 447600.0, 1.0, 1.0), (80, 100)
  kept, missed, false = (
    shapely.box(85010, 447550, 85030, 447580),
    shapely.box(85050, 447550, 85070, 447570),
    shapely.box(85075, 447530, 85090, 447545),
  )
  grid = dict(out_shape=shape, transform=transform, fill=0, default_value=1, dtype=np.uint8)
  classes = rasterio.features.rasterize([kept.buffer(-1, join_style="mitre"), false], **grid)
  ndsm = rasterio.features.rasterize(
    [(kept, 9.0), (missed, 5.0), (false, 3.0)],
    out_shape=shape,
    transform=transform,
    fill=0.0,
    dtype=np.float32,
  )
  labels = np.full(shape, 255, np.uint8)
  labels[5:75, 5:95] = 0
  labels[rasterio.features.rasterize([kept, missed], **grid) == 1] = 1

  def tif(name, data, dtype):
    with rasterio.open(
      tmp_path / name,
      "w",
      driver="GTiff",
      width=shape[1],
      height=shape[0],
      count=1,
      dtype=dtype,
      crs=crs,
      transform=transform,
    ) as dst:
      dst.write(data.astype(dtype), 1)
    return str(tmp_path / name)

  ref = tmp_path / "ref.gpkg"
  pyogrio.raw.write(
    ref,
    geometry=np.array(shapely.to_wkb([kept, missed]), dtype=object),
    field_data=[np.array([10.0, 5.0])],
    fields=["HEIGHT"],
    crs=crs,
    layer="b",
    geometry_type="Polygon",
    driver="GPKG",
  )
  args = [
    "objects",
    "--classes",
    tif("c.tif", classes, "uint8"),
    "--labels",
    tif("l.tif", labels, "uint8"),
    "--reference",
    str(ref),
    "--reference_height",
    "HEIGHT",
    "--ndsm",
    tif("n.tif", ndsm, "float32"),
    "--heights_at_footprints",
    "--json",
    str(tmp_path / "o.json"),
    "--polygons",
    str(tmp_path / "p.gpkg"),
  ]
  assert evaluate.main(args) == 0
  out = json.loads((tmp_path / "o.json").read_text())
  s = out["iou>=0.5"]
  assert (s["predicted"], s["reference"], s["matched"]) == (2, 2, 1)
  assert s["f1"] == pytest.approx(0.5)
  assert out["heights"]["ndsm"]["n"] == 1  # too few pairs for statistics, said so
  at = out["heights"]["at_footprints"]
  assert at["footprints_found"] == 1 and at["ndsm"]["n"] == 1
  got = pyogrio.raw.read(tmp_path / "p.gpkg")
  assert len(got[2]) == 2 and "height_median_m" in list(got[0]["fields"])
