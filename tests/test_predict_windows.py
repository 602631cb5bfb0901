"""The sliding-window predictor library (demmae_jax.inference.raster) with a per-pixel "model"
whose answer is known exactly: blending any overlapping windows of a per-pixel function must
give the function back, so stitching, georeferencing, nodata and block-independence are checked
without training."""

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin

from data_pipelines.errors import DataError
from demmae_jax.inference import raster

CRS = "EPSG:28992"
TRANSFORM = from_origin(84800.0, 447650.0, 0.5, 0.5)


def write_tif(path, data, crs=CRS, nodata=None, transform=TRANSFORM):
  data = np.asarray(data, np.float32)
  data = data[None] if data.ndim == 2 else data
  with rasterio.open(
    path,
    "w",
    driver="GTiff",
    width=data.shape[2],
    height=data.shape[1],
    count=data.shape[0],
    dtype="float32",
    crs=crs,
    transform=transform,
    nodata=nodata,
  ) as dst:
    dst.write(data)
  return path


def threshold_apply(x):
  """p(foreground) = sigmoid(4 (h - 5)): a per-pixel 'model' (buildings are above 5 m)."""
  p = 1.0 / (1.0 + np.exp(-4.0 * (x[..., 0] - 5.0)))
  return np.stack([1 - p, p], axis=-1).astype(np.float32)


def identity(dem, valid):
  return dem[..., None]


def blocks_dem(height=70, width=90, seed=0):
  """Flat ground with box 'buildings' 10 m high, one spanning several output blocks."""
  rng = np.random.default_rng(seed)
  dem = rng.normal(0.0, 0.3, (height, width)).astype(np.float32)
  boxes = [(3, 3, 12, 15), (20, 30, 45, 60), (50, 5, 66, 20), (5, 70, 25, 88)]
  for r0, c0, r1, c1 in boxes:
    dem[r0:r1, c0:c1] += 10.0
  return dem, boxes


def read(path, band=1):
  with rasterio.open(path) as src:
    return src.read(band), src.profile, src.crs, src.transform


def test_window_offsets_cover_raster_with_snapped_last_window():
  assert raster.window_offsets(100, 32, 24) == [0, 24, 48, 68]
  assert raster.window_offsets(32, 32, 24) == [0]
  assert raster.window_offsets(20, 32, 24) == [0]
  w = raster.hann_weights(16)
  assert w.min() > 0 and w[7:9, 7:9].min() == w.max()  # nowhere zero, peak in the centre


def test_predict_keeps_crs_transform_and_recovers_a_per_pixel_model(tmp_path):
  dem, _ = blocks_dem()
  src = write_tif(tmp_path / "dem.tif", dem)
  opts = raster.PredictOptions(tile=16, overlap=6, batch_size=4, block=32)
  summary = raster.predict_raster(
    src,
    tmp_path / "cls.tif",
    threshold_apply,
    identity,
    opts,
    probabilities_path=tmp_path / "p.tif",
    progress=False,
  )
  classes, profile, crs, transform = read(tmp_path / "cls.tif")
  assert crs == rasterio.crs.CRS.from_string(CRS) and transform == TRANSFORM
  assert classes.shape == dem.shape and profile["nodata"] == 255
  assert profile["tiled"] and profile["compress"] == "deflate"
  np.testing.assert_array_equal(classes, (dem > 5.0).astype(np.uint8))
  probs, _, _, _ = read(tmp_path / "p.tif", 2)
  np.testing.assert_allclose(probs, threshold_apply(dem[..., None])[..., 1], atol=1e-5)
  assert summary["pixels_per_class"]["foreground"] == int((dem > 5).sum())


def test_output_does_not_depend_on_block_size(tmp_path):
  dem, _ = blocks_dem()
  src = write_tif(tmp_path / "dem.tif", dem)

  def smooth_apply(x):  # not per-pixel: each window's answer depends on the window's mean
    p = 1.0 / (1.0 + np.exp(-(x[..., 0] - x.mean(axis=(1, 2, 3), keepdims=True)[..., 0])))
    return np.stack([1 - p, p], -1).astype(np.float32)

  outs = []
  for block in (16, 40, 4096):
    opts = raster.PredictOptions(tile=16, overlap=8, batch_size=3, block=block)
    raster.predict_raster(
      src,
      tmp_path / f"p{block}.tif",
      smooth_apply,
      identity,
      opts,
      probabilities_path=tmp_path / f"prob{block}.tif",
      progress=False,
    )
    outs.append(read(tmp_path / f"prob{block}.tif", 2)[0])
  np.testing.assert_array_equal(outs[0], outs[2])
  np.testing.assert_array_equal(outs[1], outs[2])


def test_nodata_and_nan_pixels_become_output_nodata(tmp_path):
  dem, _ = blocks_dem()
  dem[30:40, 0:90] = -9999.0  # a nodata stripe across the raster
  dem[5, 5] = np.nan
  dem[60:70, 70:90] = -9999.0
  src = write_tif(tmp_path / "dem.tif", dem, nodata=-9999.0)
  opts = raster.PredictOptions(tile=16, overlap=4, batch_size=8, block=24)
  summary = raster.predict_raster(
    src, tmp_path / "cls.tif", threshold_apply, identity, opts, progress=False
  )
  classes = read(tmp_path / "cls.tif")[0]
  invalid = (dem == -9999.0) | np.isnan(dem)
  assert (classes[invalid] == 255).all()
  np.testing.assert_array_equal(classes[~invalid], (dem[~invalid] > 5).astype(np.uint8))
  assert summary["nodata_pixels"] == int(invalid.sum())


def test_three_band_raster_needs_an_explicit_band(tmp_path):
  dem, _ = blocks_dem(40, 40)
  src = write_tif(tmp_path / "rgb.tif", np.stack([dem + 100, dem, dem - 100]))
  opts = raster.PredictOptions(tile=16, overlap=4)
  with pytest.raises(DataError, match=r"rgb.tif: has 3 bands .* --band"):
    raster.predict_raster(
      src, tmp_path / "out.tif", threshold_apply, identity, opts, progress=False
    )
  assert not (tmp_path / "out.tif").exists()
  opts = raster.PredictOptions(tile=16, overlap=4, band=2)
  raster.predict_raster(src, tmp_path / "out.tif", threshold_apply, identity, opts, progress=False)
  np.testing.assert_array_equal(read(tmp_path / "out.tif")[0], (dem > 5).astype(np.uint8))


def test_raster_without_crs_is_refused_unless_a_crs_is_given(tmp_path):
  dem, _ = blocks_dem(40, 40)
  src = write_tif(tmp_path / "nocrs.tif", dem, crs=None)
  opts = raster.PredictOptions(tile=16, overlap=4)
  with pytest.raises(DataError, match="nocrs.tif: has no CRS"):
    raster.predict_raster(
      src, tmp_path / "out.tif", threshold_apply, identity, opts, progress=False
    )
  raster.predict_raster(
    src, tmp_path / "out.tif", threshold_apply, identity, opts, crs=CRS, progress=False
  )
  assert read(tmp_path / "out.tif")[2] == rasterio.crs.CRS.from_string(CRS)


def test_existing_output_is_never_overwritten_without_overwrite(tmp_path):
  dem, _ = blocks_dem(40, 40)
  src = write_tif(tmp_path / "dem.tif", dem)
  out = tmp_path / "out.tif"
  out.write_bytes(b"an earlier result")
  opts = raster.PredictOptions(tile=16, overlap=4)
  with pytest.raises(FileExistsError, match="out.tif already exists"):
    raster.predict_raster(src, out, threshold_apply, identity, opts, progress=False)
  assert out.read_bytes() == b"an earlier result"
  raster.predict_raster(src, out, threshold_apply, identity, opts, overwrite=True, progress=False)
  assert read(out)[0].shape == (40, 40)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["dem.tif", "out.tif"]  # no temp left


def test_failure_midway_leaves_no_partial_output(tmp_path):
  dem, _ = blocks_dem()
  src = write_tif(tmp_path / "dem.tif", dem)
  calls = []

  def failing_apply(x):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError("device lost")
    return threshold_apply(x)

  opts = raster.PredictOptions(tile=16, overlap=4, batch_size=2, block=32)
  with pytest.raises(RuntimeError, match="device lost"):
    raster.predict_raster(src, tmp_path / "out.tif", failing_apply, identity, opts, progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["dem.tif"]


def test_raster_smaller_than_a_tile_is_padded_not_refused(tmp_path):
  dem, _ = blocks_dem(10, 13)
  src = write_tif(tmp_path / "small.tif", dem)
  opts = raster.PredictOptions(tile=16, overlap=4)
  raster.predict_raster(src, tmp_path / "out.tif", threshold_apply, identity, opts, progress=False)
  np.testing.assert_array_equal(read(tmp_path / "out.tif")[0], (dem > 5).astype(np.uint8))


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson"])
def test_polygons_are_merged_across_blocks(tmp_path, suffix):
  dem, boxes = blocks_dem()
  src = write_tif(tmp_path / "dem.tif", dem)
  opts = raster.PredictOptions(tile=16, overlap=4, block=16)  # every box spans blocks
  raster.predict_raster(
    src,
    tmp_path / "cls.tif",
    threshold_apply,
    identity,
    opts,
    polygons_path=tmp_path / f"b{suffix}",
    progress=False,
  )
  info = pyogrio.read_info(tmp_path / f"b{suffix}")
  assert info["features"] == len(boxes)
  assert rasterio.crs.CRS.from_user_input(info["crs"]) == rasterio.crs.CRS.from_string(CRS)
  _, _, geometry, _ = pyogrio.raw.read(tmp_path / f"b{suffix}")
  areas = sorted(shapely.area(shapely.from_wkb(geometry)))
  assert areas == sorted((r1 - r0) * (c1 - c0) * 0.25 for r0, c0, r1, c1 in boxes)


def test_height_above_ground_check_refuses_absolute_heights(tmp_path):
  from data_pipelines.errors import DataError
  from demmae_jax.inference.raster import check_height_above_ground

  ndsm, _ = blocks_dem()  # ground ~0 m, 10 m blocks
  write_tif(tmp_path / "ndsm.tif", ndsm)
  check_height_above_ground(tmp_path / "ndsm.tif")
  for name, offset in (("dsm.tif", 35.0), ("below.tif", -8.0)):
    write_tif(tmp_path / name, ndsm + offset)
    with pytest.raises(DataError, match=f"{name}.*not height above ground"):
      check_height_above_ground(tmp_path / name)


def test_min_height_overrules_the_positive_class_on_low_cells_only(tmp_path):
  """A 'model' that calls everything above 0.5 m a building: with min_height 2 m the low boxes
  and the ground become background, the tall ones stay; probabilities still sum to one; nodata
  stays nodata; gate_classes on the ungated map gives the same classes."""
  dem, boxes = blocks_dem()
  dem[3:12, 3:15] = 1.2  # the first box only 1.2 m tall
  dem[60:64, 40:50] = -9999.0
  src = write_tif(tmp_path / "dem.tif", dem, nodata=-9999.0)

  def low_apply(x):
    p = 1.0 / (1.0 + np.exp(-20.0 * (x[..., 0] - 0.5)))
    return np.stack([1 - p, p], axis=-1).astype(np.float32)

  maps = {}
  for h in (None, 2.0):
    opts = raster.PredictOptions(tile=16, overlap=4, batch_size=4, block=32, min_height=h)
    raster.predict_raster(
      src, tmp_path / f"c{h}.tif", low_apply, identity, opts,
      probabilities_path=tmp_path / f"p{h}.tif", progress=False,
    )  # fmt: skip
    maps[h] = read(tmp_path / f"c{h}.tif")[0]
  nodata = dem == -9999.0
  assert (maps[None][3:12, 3:15] == 1).all()  # the ungated map calls the low box a building
  expected = np.where(nodata, 255, dem >= 2.0).astype(np.uint8)
  np.testing.assert_array_equal(maps[2.0], expected)
  with rasterio.open(tmp_path / "p2.0.tif") as f:
    probs = f.read()
  np.testing.assert_allclose(probs.sum(0)[~nodata], 1.0, atol=1e-5)
  assert (probs[1][~nodata & (dem < 2.0)] == 0).all()
  masked = np.ma.masked_array(dem, nodata)
  np.testing.assert_array_equal(raster.gate_classes(maps[None], masked, 2.0), maps[2.0])


def test_only_building_models_on_height_above_ground_get_the_height_gate():
  from demmae_jax.inference.segmenter import MIN_BUILDING_HEIGHT_M, min_height_m

  def spec(mode, positive):
    return {"normalisation": {"mode": mode}, "class_names": ["background", positive]}

  assert min_height_m(spec("ndsm", "building")) == MIN_BUILDING_HEIGHT_M
  assert min_height_m(spec("ndsm", "road")) is None  # roads lie on the ground
  assert min_height_m(spec("minmax", "building")) is None  # a DSM's heights are not above ground
