"""The Beam corpus builder (data_pipelines/corpus_beam.py) on tiny synthetic LAZ and GeoTIFFs:
tiles hold the rasteriser's raw heights with their metadata, the filters and the held-out rule
drop what they should, bad sources are quarantined without stopping the build, 1 and 2 workers
write byte-identical output, and a rerun completes an interrupted build."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.transform
import tensorflow as tf

from data_pipelines import corpus_beam as cb
from data_pipelines.lidar import las_to_rasters
from data_pipelines.synthetic import synthetic_scene, write_las
from data_pipelines.tile_records import decode_tile_numpy

CRS = "EPSG:32631"
X0, Y0 = 500_000.0, 5_000_000.0
TILE = 16


def _cloud(x0, y0, size=48, seed=0):
  """Ground everywhere (class 2) and a 6 m block building (class 6) per 16 m cell, on a slope."""
  rng = np.random.default_rng(seed)
  xs, ys = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
  xs, ys = xs.ravel(), ys.ravel()
  ground = 1.0 + 0.05 * xs + rng.uniform(0, 0.05, xs.size)
  roof = ((xs % 16) > 4) & ((xs % 16) < 10) & ((ys % 16) > 4) & ((ys % 16) < 10)
  pts = [np.c_[x0 + xs, y0 + ys, ground]]
  cls = [np.full(xs.size, 2)]
  pts.append(np.c_[x0 + xs[roof] + 0.2, y0 + ys[roof] + 0.2, ground[roof] + 6.0])
  cls.append(np.full(roof.sum(), 6))
  return np.concatenate(pts), np.concatenate(cls)


def _geotiff(path, array, crs=CRS, origin=(X0 + 1000, Y0 + 1000), cell=2.0):
  with rasterio.open(
    path,
    "w",
    driver="GTiff",
    width=array.shape[1],
    height=array.shape[0],
    count=1,
    dtype="float32",
    crs=crs,
    nodata=np.nan,
    transform=rasterio.transform.from_origin(*origin, cell, cell),
  ) as dst:
    dst.write(array.astype(np.float32), 1)
  return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  d = tmp_path_factory.mktemp("inputs")
  write_las(d / "a.laz", *_cloud(X0, Y0), crs=CRS)
  write_las(d / "b.laz", *_cloud(X0 + 48, Y0, seed=1), crs=CRS)
  write_las(d / "nocrs.laz", *_cloud(X0, Y0 + 48, seed=2))  # header without CRS
  (d / "corrupt.laz").write_bytes(b"LASF" + b"\x00 not a point cloud" * 40)
  dem = synthetic_scene(64, 64, seed=3).dsm.astype(np.float32) + 100
  dem[:16, :16] = np.nan  # tile (0, 0): no data
  dem[:16, 16:32] = 50.0  # tile (0, 1): flat
  _geotiff(d / "dem.tif", dem)
  return d


def _opts(out, **kw):
  return cb.BuildOptions(out_dir=str(out), tile_size=TILE, tiles_per_shard=4, **kw)


def _all_inputs(d):
  return [cb.CorpusInput(str(d / "*.laz")), cb.CorpusInput(str(d / "dem.tif"))]


def _digest(folder: Path) -> dict[str, str]:
  return {
    str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(folder.rglob("*"))
    if p.is_file()
  }


def _records(folder: Path, source: dict) -> list[dict]:
  """The decoded tiles of one source, from the shards the manifest lists for it."""
  m = json.loads((folder / cb.MANIFEST).read_text())
  files = [str(folder / s["file"]) for s in m["shards"] if s["source"] == source["id"]]
  return [
    decode_tile_numpy(r, source["channels"], "float16", TILE)
    for r in tf.data.TFRecordDataset(files).as_numpy_iterator()
  ]


def test_bad_sources_are_quarantined_and_good_tiles_hold_raw_heights(inputs, tmp_path):
  out = tmp_path / "corpus"
  m = cb.build_corpus_beam(_all_inputs(inputs), _opts(out))
  reasons = {Path(q["path"]).name: q["reason"] for q in m["quarantined"]}
  assert set(reasons) == {"corrupt.laz", "nocrs.laz"}
  assert "corrupt.laz: not a readable LAS/LAZ file" in reasons["corrupt.laz"]
  assert "nocrs.laz: header has no CRS" in reasons["nocrs.laz"]
  assert sorted(
    json.loads(p.read_text())["path"] for p in (out / "quarantine").glob("*.json")
  ) == sorted(q["path"] for q in m["quarantined"])
  by_name = {Path(s["path"]).name: s for s in m["sources"]}
  assert set(by_name) == {"a.laz", "b.laz", "dem.tif"}
  assert (
    m["totals"]["tiles"]
    == sum(s["tiles"] for s in m["sources"])
    == sum(s["count"] for s in m["shards"])
  )

  # a LiDAR tile is the rasteriser's DSM / nDSM at its window (float16 after a per-tile offset)
  a = by_name["a.laz"]
  assert a["channels"] == ["elevation", "ndsm"] and a["crs"] == CRS and a["cell_size"] == 1.0
  ref = las_to_rasters([inputs / "a.laz"], tmp_path / "ref", cell_size=1.0, progress=False)
  with rasterio.open(ref["dsm"]) as dsm, rasterio.open(ref["ndsm"]) as ndsm:
    dsm_a, ndsm_a, transform = dsm.read(1), ndsm.read(1), dsm.transform
  tiles = _records(out, a)
  assert len(tiles) == a["tiles"] > 0
  for t in tiles:
    col, row, w, h = t["window"]
    np.testing.assert_allclose(t["elevation"], dsm_a[row : row + h, col : col + w], atol=0.01)
    np.testing.assert_allclose(t["ndsm"], ndsm_a[row : row + h, col : col + w], atol=0.01)
    x0, y1 = transform @ (col, row)
    np.testing.assert_allclose(t["bounds"], [x0, y1 - h, x0 + w, y1])
    assert t["source"] == a["id"] and t["cell_size"] == 1.0 and "UTM zone 31N" in t["crs_wkt"]
    lo, hi, mean = t["stats"][:3]
    assert (
      lo == pytest.approx(dsm_a[row : row + h, col : col + w].min(), abs=1e-4) and hi - lo >= 1.0
    )
    assert lo <= mean <= hi and 0 < t["stats"][4] <= 1


def test_filters_and_held_out_blocks_drop_tiles(inputs, tmp_path):
  # a held-out rectangle (given in another CRS: reprojected) over the DEM's tile at row 2, col 3
  from rasterio.warp import transform_bounds

  tl = (X0 + 1000 + 3 * TILE * 2.0, Y0 + 1000 - 2 * TILE * 2.0)
  rect = (tl[0] + 4, tl[1] - 10, tl[0] + 10, tl[1] - 4)  # inside tile (2, 3), away from its edges
  rect_ll = transform_bounds(CRS, "EPSG:4326", *rect)
  held = ({"key": "t", "crs": "EPSG:4326", "rects": [list(rect_ll)]},)
  m = cb.build_corpus_beam(
    [cb.CorpusInput(str(inputs / "dem.tif"))], _opts(tmp_path / "c", held_out=held)
  )
  (src,) = m["sources"]
  assert src["candidates"] == 16 and src["cell_size"] == 2.0
  assert src["skipped"] == {"nodata": 1, "relief": 1, "held_out": 1}
  assert src["tiles"] == 13
  windows = {tuple(t["window"][:2]) for t in _records(tmp_path / "c", src)}
  assert (3 * TILE, 2 * TILE) not in windows and (0, 0) not in windows and (TILE, 0) not in windows


def test_one_and_two_workers_write_byte_identical_output(inputs, tmp_path):
  one = tmp_path / "one"
  two = tmp_path / "two"
  cb.build_corpus_beam(_all_inputs(inputs), _opts(one))
  cb.build_corpus_beam(
    _all_inputs(inputs),
    _opts(two),
    ["--direct_num_workers=2", "--direct_running_mode=multi_processing"],
  )
  d1, d2 = _digest(one), _digest(two)
  assert any(k.endswith(".tfrecord") for k in d1)
  assert d1 == d2


def test_rerun_completes_an_interrupted_build_and_skips_finished_sources(inputs, tmp_path):
  full, cut = tmp_path / "full", tmp_path / "cut"
  cb.build_corpus_beam(_all_inputs(inputs), _opts(full))
  cb.build_corpus_beam(_all_inputs(inputs), _opts(cut))
  # as kill -9 leaves it: one source's folder still a temporary (a half-written shard in it),
  # another's not started, no manifest
  sources = sorted((cut / "sources").iterdir())
  victim, kept = sources[0], sources[1]
  stale = cut / "sources" / f".{victim.name}.{cb_host()}-{2**22 + 12345}.abc.tmp"
  victim.rename(stale)
  (stale / "tiles-00000.tfrecord").write_bytes(b"half")
  (cut / cb.MANIFEST).unlink()
  kept_mtime = os.stat(kept / cb.SOURCE_JSON).st_mtime_ns
  m = cb.build_corpus_beam(_all_inputs(inputs), _opts(cut))
  assert not stale.exists()
  assert os.stat(kept / cb.SOURCE_JSON).st_mtime_ns == kept_mtime  # skipped, not rebuilt
  assert _digest(cut) == _digest(full)
  assert m == json.loads((full / cb.MANIFEST).read_text())
  # another build's options in the same folder: refused, nothing changed
  with pytest.raises(ValueError, match="built with other options.*tile_size"):
    cb.build_corpus_beam(_all_inputs(inputs), cb.BuildOptions(out_dir=str(cut), tile_size=32))
  assert _digest(cut) == _digest(full)


def cb_host():
  from data_pipelines.atomic import HOST

  return HOST


def test_cli_builds_with_per_source_crs_and_beam_flags(inputs, tmp_path, capsys):
  from script_support import load_script

  prepare_data = load_script("prepare_data")
  out = tmp_path / "cli"
  code = prepare_data.main(
    [
      "corpus-beam",
      str(inputs / "a.laz"),
      "--source",
      str(inputs / "nocrs.laz"),
      CRS,
      "--out",
      str(out),
      "--tile-size",
      str(TILE),
      "--held-out",
      "none",
      "--direct_num_workers=1",
    ]
  )
  assert code == 0
  m = json.loads((out / cb.MANIFEST).read_text())
  assert m["totals"]["quarantined"] == 0 and m["totals"]["sources"] == 2
  assert "tiles from 2 sources" in capsys.readouterr().out
  assert (
    prepare_data.main(
      [
        "corpus-beam",
        str(tmp_path / "nothing*.laz"),
        "--out",
        str(tmp_path / "x"),
        "--held-out",
        "none",
      ]
    )
    == 2
  )
  assert "nothing*.laz: matches no file" in capsys.readouterr().err
