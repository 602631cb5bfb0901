"""Real GeoTIFF inputs: Alexandria DSM/DTM + footprints (alexandria/*), SRTM with voids
(pretrain/N46E008.tif), through labels and tiles."""

import json

import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.features
import rasterio.warp
import shapely
import shapely.geometry
import tensorflow as tf

from data_pipelines.prepare import prepare_alexandria
from data_pipelines.shared_data import shared_file
from data_pipelines.tile_records import decode_tile_numpy
from data_pipelines.tile_writer import write_tiles

pytestmark = pytest.mark.realdata


def _records(manifest, split="train"):
  m = json.loads(manifest.read_text())
  files = [str(manifest.parent / f) for f in m["splits"][split]["files"]]
  return m, [
    decode_tile_numpy(r, m["channels"], m["dtype"], m["tile_size"])
    for r in tf.data.TFRecordDataset(files).as_numpy_iterator()
  ]


def test_alexandria_footprints_land_on_their_buildings(tmp_path):
  """Reads alexandria/dsm.tif, dtm.tif, buildings.geojson (EPSG:4326 onto EPSG:26918)."""
  manifest = prepare_alexandria(tmp_path / "alex", progress=False)
  root = manifest.parent.parent
  ndsm = rasterio.open(root / "rasters" / "ndsm.tif").read(1)
  with rasterio.open(shared_file("alexandria/dsm.tif")) as dsm:
    grid = dict(out_shape=dsm.shape, transform=dsm.transform)
    crs = dsm.crs
  meta, _, wkb, fields = pyogrio.raw.read(
    shared_file("alexandria/buildings.geojson"), columns=["HEIGHT"]
  )
  medians, heights = [], []
  for g, h in zip(shapely.from_wkb(wkb), fields[0]):
    g = rasterio.warp.transform_geom(meta["crs"], crs, shapely.geometry.mapping(g))
    inside = rasterio.features.rasterize([g], fill=0, default_value=1, dtype=np.uint8, **grid) > 0
    if inside.sum() >= 4:
      medians.append(np.nanmedian(ndsm[inside]))
      heights.append(h)
  medians, heights = np.array(medians), np.array(heights, dtype=float)
  known = np.isfinite(heights) & np.isfinite(medians)
  r = np.corrcoef(medians[known], heights[known])[0, 1]
  assert known.sum() > 70 and r > 0.95  # data README: r = 0.969; a misplaced reprojection breaks it
  label = rasterio.open(root / "labels" / "buildings.tif").read(1)
  assert 0.05 < (label != 255).mean() < 0.9  # central subset labelled, the rest unknown
  m, recs = _records(manifest)
  assert m["splits"]["train"]["count"] > 0 and m["channels"] == ["elevation", "dtm", "ndsm"]
  assert m["stats"]["ndsm"]["max"] > 10


def test_srtm_voids_become_invalid_and_float16_keeps_alpine_relief(tmp_path):
  """Reads pretrain/N46E008.tif (Swiss Alps, nodata -32767 in ~7 % of cells)."""
  src = shared_file("pretrain/N46E008.tif")
  # EPSG:4326: the cell size in metres must be stated (3 arc-seconds ~ 90 m at 46 N north-south)
  manifest = write_tiles(
    src,
    tmp_path / "t",
    tile_size=224,
    stride=224,
    min_valid=0.0,
    dtype="float16",
    fractions={"train": 1.0, "val": 0.0, "test": 0.0},
    progress=False,
    cell_size_m=90.0,
  )
  m, recs = _records(manifest)
  dem = rasterio.open(src).read(1).astype(np.float32)
  assert len(recs) == 36  # 6 x 6: the last row and column shifted to the edge
  assert m["cell_size"] == pytest.approx(90.0)
  n_void = 0
  for r in recs:
    col, row, w, h = r["window"]
    truth = dem[row : row + h, col : col + w]
    void = truth == -32767
    n_void += void.sum()
    np.testing.assert_array_equal(r["valid"] == 0, void)
    ok = ~void
    if ok.any():
      relief = np.ptp(truth[ok])
      # float16 holds height above the tile's lowest valid cell: error <= half an ulp of the relief
      half_ulp = np.spacing(np.float16(relief)).astype(np.float32) / 2
      assert np.abs(r["elevation"][ok] - truth[ok]).max() <= half_ulp
      assert r["elevation"].min() >= truth[ok].min()  # voids filled with a real height, not -32767
  assert n_void > 50_000
  assert m["stats"]["elevation"]["min"] > 0 and m["stats"]["elevation"]["max"] == 4173
