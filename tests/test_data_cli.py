"""scripts/prepare_data.py: lidar -> labels -> tiles -> check on synthetic inputs, clean errors."""

import json

import numpy as np
import pyogrio
import shapely

from data_pipelines.synthetic import write_las
from script_support import load_script

prepare_data = load_script("prepare_data")

X0, Y0 = 500_000.0, 5_000_000.0


def test_cli_chain_produces_a_readable_tile_set(tmp_path, capsys):
  rng = np.random.default_rng(0)
  xy = rng.uniform([X0, Y0], [X0 + 80, Y0 + 80], (40_000, 2))
  roof = (xy[:, 0] > X0 + 20) & (xy[:, 0] < X0 + 40) & (xy[:, 1] > Y0 + 20) & (xy[:, 1] < Y0 + 40)
  z = np.where(roof, 12.0, 1.0) + rng.normal(0, 0.02, len(xy))
  write_las(tmp_path / "a.laz", np.c_[xy, z], np.where(roof, 6, 2))
  pyogrio.raw.write(
    tmp_path / "b.geojson",
    shapely.to_wkb(np.array([shapely.box(X0 + 20, Y0 + 20, X0 + 40, Y0 + 40)])),
    field_data=None,
    fields=None,
    crs="EPSG:32631",
    geometry_type="Polygon",
    driver="GeoJSON",
  )
  run = prepare_data.main
  assert (
    run(["lidar", str(tmp_path / "a.laz"), "--out", str(tmp_path / "r"), "--cell-size", "1"]) == 2
  )
  assert "a.laz: header has no CRS" in capsys.readouterr().err
  assert (
    run(
      [
        "lidar",
        str(tmp_path / "a.laz"),
        "--out",
        str(tmp_path / "r"),
        "--cell-size",
        "1",
        "--crs",
        "EPSG:32631",
      ]
    )
    == 0
  )
  assert (
    run(
      [
        "labels",
        "--dem",
        str(tmp_path / "r/dsm.tif"),
        "--vector",
        str(tmp_path / "b.geojson"),
        "--area",
        str(tmp_path / "b.geojson"),
        "--out",
        str(tmp_path / "l.tif"),
      ]
    )
    == 0
  )
  # the only labelled area is the building itself: keep tiles regardless of the labelled share
  assert (
    run(
      [
        "tiles",
        "--dem",
        str(tmp_path / "r/dsm.tif"),
        "--label",
        str(tmp_path / "l.tif"),
        "--valid",
        str(tmp_path / "r/valid.tif"),
        "--extra",
        f"ndsm={tmp_path / 'r/ndsm.tif'}",
        "--tile-size",
        "16",
        "--stride",
        "8",
        "--min-labelled",
        "0",
        "--block-px",
        "16",
        "--out",
        str(tmp_path / "t"),
      ]
    )
    == 0
  )
  m = json.loads((tmp_path / "t/manifest.json").read_text())
  assert m["channels"] == ["elevation", "ndsm"] and m["splits"]["train"]["count"] > 0
  assert m["stats"]["ndsm"]["max"] > 10
  assert run(["check", str(tmp_path / "t/manifest.json")]) == 0
  assert run(["tiles", "--dem", str(tmp_path / "r/dsm.tif"), "--out", str(tmp_path / "t")]) == 2
  assert "already exists" in capsys.readouterr().err
