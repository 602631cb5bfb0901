"""Real data: the shared Delft AHN3 LiDAR + BGT set (delft/*.laz, delft/bgt_*.sqlite) and IGN
LiDAR HD (pretrain/*.laz) through the pipeline."""

import json

import numpy as np
import pytest
import rasterio

from data_pipelines.prepare import prepare_delft
from data_pipelines.reader import make_dataset
from data_pipelines.shared_data import shared_file

pytestmark = [pytest.mark.realdata, pytest.mark.slow]
ONE_HOST = dict(process_index=0, process_count=1)


@pytest.fixture(scope="module")
def delft(tmp_path_factory):
  """Reads delft/ahn3_cropped_{1,2}.laz, delft/bgt_pand.sqlite, delft/bgt_wegdeel.sqlite."""
  root = tmp_path_factory.mktemp("delft")
  return {task: prepare_delft(root / task, task, progress=False) for task in ("buildings", "roads")}


def _raster(manifest, rel):
  with rasterio.open(manifest.parent.parent / rel) as src:
    return src.read(1)


def test_delft_rasters_cover_the_lidar_block_in_rd_new(delft):
  with rasterio.open(delft["buildings"].parent.parent / "rasters" / "dsm.tif") as dsm:
    assert dsm.crs.to_epsg() == 28992 and dsm.res == (0.5, 0.5)
    assert (dsm.width, dsm.height) == (529, 458)  # 264 x 228 m at 0.5 m, snapped outward
    assert dsm.bounds.left <= 84808.3 and dsm.bounds.right >= 85072.3
    assert dsm.bounds.bottom <= 447412.8 and dsm.bounds.top >= 447641.3
  valid = _raster(delft["buildings"], "rasters/valid.tif")
  # ~14.6 points/m2 = ~3.6 per 0.5 m cell (Poisson: 97 % of cells hit); water and scan-line
  # gaps take more (measured 88.5 %), and those cells must be marked, not silently filled
  assert 0.85 < valid.mean() < 0.975


def test_bgt_buildings_agree_with_lidar_class_6(delft):
  bgt = _raster(delft["buildings"], "labels/buildings.tif")
  cls = _raster(delft["buildings"], "rasters/class.tif")
  inside = bgt != 255
  lidar, mapped = (cls == 6) & inside, bgt == 1
  recall = (lidar & mapped).sum() / mapped.sum()  # of BGT building cells, LiDAR calls building
  assert recall > 0.95  # data README: ~0.99
  # the crop maps only some of the buildings inside its hull: judge precision on those it maps
  import scipy.ndimage as ndi

  parts, n = ndi.label(lidar)
  mapped_parts = np.nonzero(ndi.maximum(mapped, parts, np.arange(1, n + 1)))[0] + 1
  lidar_mapped = np.isin(parts, mapped_parts)
  precision = (lidar_mapped & mapped).sum() / lidar_mapped.sum()
  assert precision > 0.85  # data README: ~0.86


def test_road_and_building_heights_match_the_data_readme(delft):
  dsm = _raster(delft["roads"], "rasters/dsm.tif")
  roads = _raster(delft["roads"], "labels/roads.tif")
  buildings = _raster(delft["buildings"], "labels/buildings.tif")
  assert np.nanmedian(dsm[roads == 1]) == pytest.approx(0.54, abs=0.1)
  assert np.nanmedian(dsm[buildings == 1]) == pytest.approx(8.47, abs=0.3)
  inside = roads != 255
  assert 0.5 < inside.mean() < 0.6  # the BGT crop covers ~56 % of the LiDAR block
  # the building labels' unknown cells: outside the crop, and the houses BGT lacks (LiDAR class 6)
  conflicts = json.loads(delft["buildings"].read_text())["preset"]["label_conflicts_ignored"]
  assert not (~inside & (buildings != 255)).any()
  assert (inside & (buildings == 255)).sum() == conflicts["missing"] + conflicts["extra"] > 0


def test_delft_tile_sets_read_back_for_training(delft):
  for task, manifest in delft.items():
    m = json.loads(manifest.read_text())
    assert all(m["splits"][s]["count"] > 0 for s in ("train", "val", "test")), task
    assert m["channels"] == ["elevation", "dtm", "ndsm"] and m["dtype"] == "float16"
    for name, rel in m["sources"].items():  # relative to the tile folder, valid after the rename
      assert (manifest.parent / rel).is_file(), (name, rel)
    freq = m["splits"]["train"]["classes"]["frequencies"]["1"]
    assert 0.1 < freq < 0.4, (task, freq)
    batch = next(make_dataset(str(manifest), "train", global_batch_size=8, **ONE_HOST))
    assert batch["image"].shape == (8, 64, 64, 1)
    assert set(np.unique(batch["label"])) <= {0, 1, 255}


def test_ign_lidar_hd_keeps_its_own_crs(tmp_path):
  from data_pipelines.lidar import las_to_rasters

  laz = shared_file("pretrain/test_semis_2023_0299_6802_LA93_IGN69.laz")
  out = las_to_rasters([laz], tmp_path / "ign", cell_size=2.0, progress=False)
  with rasterio.open(out["dsm"]) as dsm:
    assert dsm.crs.to_epsg() == 2154 and (dsm.width, dsm.height) == (501, 501)
    assert dsm.bounds.left == 299000 and dsm.bounds.top == 6802000
  valid = rasterio.open(out["valid"]).read(1)
  assert 0.55 < valid.mean() < 0.7  # ~0.25 points/m2 -> ~1 per 4 m2 cell: Poisson 1 - 1/e = 63 %
