"""COPC LAZ read by bounds: the same rasters and corpus tiles as a plain LAZ of the same points,
from a fraction of the points (a real IGN LiDAR HD crop written as COPC with copclib)."""

import numpy as np
import pytest
import rasterio
import tensorflow as tf

from data_pipelines import corpus_beam as cb, lidar
from data_pipelines.errors import DataError
from data_pipelines.shared_data import shared_file
from data_pipelines.tile_records import decode_tile_numpy

copclib = pytest.importorskip("copclib")
laspy = lidar.laspy

IGN = "pretrain/test_semis_2023_0299_6802_LA93_IGN69.laz"
CROP = (299_200.0, 6_801_200.0, 299_600.0, 6_801_600.0)  # 400 m x 400 m, ~45k points
CELL, WINDOW, DTM_FILL = 1.0, 64, 20  # 7 x 7 windows of 64 + 2 x 20 cells


def write_copc(las, path, depth=3):
  """The points of `las` (point format 6-8) as a COPC octree `depth` levels deep: the first point
  (in file order) of each voxel of levels 0 .. depth-1 stays at that level, the others go to the
  leaves, so every node with points has a parent with points, as COPC readers expect."""
  h = las.header
  center = (h.mins + h.maxs) / 2
  half = float((h.maxs - h.mins).max()) / 2 + 1.0
  rel = (np.stack([las.x, las.y, las.z], 1) - (center - half)) / (2 * half)  # in [0, 1)

  def voxels(points, d):
    keys = np.minimum((rel[points] * 2**d).astype(np.int64), 2**d - 1)
    return keys, (keys[:, 0] * 2**d + keys[:, 1]) * 2**d + keys[:, 2]

  level = np.full(len(rel), depth)
  for d in range(depth):
    free = np.flatnonzero(level == depth)
    _, first = np.unique(voxels(free, d)[1], return_index=True)
    level[free[first]] = d
  wkt = next(v.string for v in h.vlrs if isinstance(v, laspy.vlrs.known.WktCoordinateSystemVlr))
  config = copclib.CopcConfigWriter(
    h.point_format.id, copclib.Vector3(*h.scales), copclib.Vector3(*h.offsets), wkt
  )
  info = config.copc_info
  info.center_x, info.center_y, info.center_z = map(float, center)
  info.halfsize, info.spacing = half, 2 * half / 128
  config.las_header.min, config.las_header.max = copclib.Vector3(*h.mins), copclib.Vector3(*h.maxs)
  writer = copclib.FileWriter(str(path), config)
  for d in range(depth + 1):
    points = np.flatnonzero(level == d)
    keys, code = voxels(points, d)
    order = np.argsort(code, kind="stable")
    points, keys, code = points[order], keys[order], code[order]
    starts = np.r_[0, np.flatnonzero(np.diff(code)) + 1, len(code)]
    for a, b in zip(starts[:-1], starts[1:]):
      key = copclib.VoxelKey(d, *map(int, keys[a]))
      writer.AddNode(key, copclib.VectorChar(las.points.array[points[a:b]].view(np.int8)))
  writer.Close()


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
  """The same real points as a plain LAZ and as COPC."""
  d = tmp_path_factory.mktemp("copc")
  las = laspy.read(shared_file(IGN))
  x0, y0, x1, y1 = CROP
  las.points = las.points[(las.x >= x0) & (las.x < x1) & (las.y >= y0) & (las.y < y1)]
  las.update_header()
  las.write(d / "crop.laz")
  write_copc(las, d / "crop.copc.laz")
  return d / "crop.laz", d / "crop.copc.laz", len(las.points)


def _rasters(path, out):
  lidar.points_read.clear()
  outputs = lidar.las_to_rasters(
    [path], out, cell_size=CELL, window_px=WINDOW, dtm_fill_px=DTM_FILL, progress=False
  )
  return {k: rasterio.open(p).read(1) for k, p in outputs.items()}, lidar.points_read[str(path)]


def test_copc_is_read_by_bounds_into_the_same_rasters(crop, tmp_path, monkeypatch):
  laz, copc, n = crop
  # the COPC info VLR decides, not the name
  (tmp_path / "named.copc.laz").write_bytes(laz.read_bytes())
  (tmp_path / "named.laz").write_bytes(copc.read_bytes())
  assert not lidar.inspect_las(tmp_path / "named.copc.laz").copc
  assert lidar.inspect_las(tmp_path / "named.laz").copc
  decoded = []  # points lazrs decompresses for COPC queries (before laspy's bounds filter)
  decompress = laspy.copc.lazrs.decompress_points_with_chunk_table

  def counting(data, vlr, out, chunk_table, *args):
    decoded.append(sum(count for count, _ in chunk_table))
    return decompress(data, vlr, out, chunk_table, *args)

  monkeypatch.setattr(laspy.copc.lazrs, "decompress_points_with_chunk_table", counting)
  plain, plain_read = _rasters(laz, tmp_path / "laz")
  by_bounds, copc_read = _rasters(copc, tmp_path / "copc")
  windows = 7 * 7
  assert plain_read == windows * n  # a LAZ is read whole for every window
  assert len(decoded) == windows and 0 < copc_read <= sum(decoded) < windows * n / 4
  for k in lidar.PRODUCTS:
    np.testing.assert_array_equal(by_bounds[k], plain[k], err_msg=k)
  assert np.isfinite(plain["dsm"]).mean() > 0.9 and (plain["class"] == 6).any()


def test_corpus_tiles_from_copc_equal_the_plain_laz_tiles(crop, tmp_path):
  tiles = {}
  for path in crop[:2]:
    opts = cb.BuildOptions(
      out_dir=str(tmp_path / path.name), cell_size=CELL, tile_size=64, window_px=200
    )  # 2 x 2 windows: the builder's DTM halo is 200 cells, so fewer windows keep the test fast
    src = cb.expand_inputs([cb.CorpusInput(str(path))])[0]
    record = cb.build_source(src, opts)
    assert "reason" not in record, record
    files = sorted((tmp_path / path.name).rglob("*.tfrecord"))
    tiles[path] = [
      decode_tile_numpy(r, record["channels"], opts.dtype, 64)
      for r in tf.data.TFRecordDataset([str(f) for f in files]).as_numpy_iterator()
    ]
  plain, by_bounds = tiles.values()
  assert len(plain) == len(by_bounds) > 10
  for a, b in zip(plain, by_bounds):
    for k in a.keys() - {"source"}:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize(
  "damage, problem",
  [
    ("hierarchy", "the COPC hierarchy has no root node"),
    ("count", "the COPC hierarchy holds [0-9]+ points, the header [0-9]+"),
    ("points", ""),
  ],
)
def test_corrupt_copc_names_the_file_and_the_problem(crop, tmp_path, damage, problem):
  data = bytearray(crop[1].read_bytes())
  with laspy.CopcReader.open(crop[1]) as reader:
    start, size = reader.copc_info.hierarchy_root_offset, reader.copc_info.hierarchy_root_size
    fill = b"\xff"  # hierarchy keys no reader can find
    if damage == "points":  # the compressed points of the first nodes (zeros fail fastest)
      start, size, fill = reader.header.offset_to_point_data + 8, 4000, b"\x00"
  if damage == "count":  # one point more in the first hierarchy entry (key, offset, size, count)
    count = int.from_bytes(data[start + 28 : start + 32], "little", signed=True)
    data[start + 28 : start + 32] = (count + 1).to_bytes(4, "little", signed=True)
  else:
    data[start : start + size] = fill * size
  (tmp_path / "bad.copc.laz").write_bytes(data)
  match = f"bad.copc.laz: failed while reading points, the file is corrupt or truncated .*{problem}"
  with pytest.raises(DataError, match=match):
    lidar.las_to_rasters(
      [tmp_path / "bad.copc.laz"], tmp_path / "r", cell_size=CELL, progress=False
    )
  assert not list((tmp_path / "r").glob("*"))
