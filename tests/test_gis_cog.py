"""Prediction rasters are Cloud-Optimized GeoTIFFs: valid by rio-cogeo's validator, with the input's
CRS and transform, internal overviews, a colour table on the classes and class values (not blends)
in the classes' overviews."""

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from demmae_jax.gis import cog
from demmae_jax.inference import raster as predict

CRS = "EPSG:28992"
TRANSFORM = from_origin(84800.0, 447650.0, 1.0, 1.0)


def threshold_apply(x):
  p = 1.0 / (1.0 + np.exp(-4.0 * (x[..., 0] - 5.0)))
  return np.stack([1 - p, p], axis=-1).astype(np.float32)


def identity(dem, valid):
  return dem[..., None]


@pytest.fixture
def dem_path(tmp_path):
  rng = np.random.default_rng(0)
  dem = rng.normal(0.0, 0.3, (600, 700)).astype(np.float32)
  for r in range(10, 590, 40):  # a grid of 10 m 'buildings'
    for c in range(10, 690, 50):
      dem[r : r + 25, c : c + 30] += 10.0
  dem[:50, :60] = np.nan  # a nodata corner
  path = tmp_path / "dem.tif"
  with rasterio.open(
    path,
    "w",
    driver="GTiff",
    width=700,
    height=600,
    count=1,
    dtype="float32",
    crs=CRS,
    transform=TRANSFORM,
    nodata=np.nan,
  ) as dst:
    dst.write(dem, 1)
  return path, dem


def test_prediction_rasters_are_valid_cogs_with_overviews_and_colour_table(tmp_path, dem_path):
  src, dem = dem_path
  opts = predict.PredictOptions(tile=32, overlap=8, batch_size=8, block=200)
  predict.predict_raster(
    src,
    tmp_path / "cls.tif",
    threshold_apply,
    identity,
    opts,
    probabilities_path=tmp_path / "p.tif",
    progress=False,
  )
  for name in ("cls.tif", "p.tif"):
    ok, errors, warnings = cog.validate(tmp_path / name, strict=True)
    assert ok and not errors and not warnings, (name, errors, warnings)
  with rasterio.open(tmp_path / "cls.tif") as c:
    assert c.crs == rasterio.crs.CRS.from_string(CRS) and c.transform == TRANSFORM
    assert c.overviews(1) == [2, 4], "overviews until the raster fits one 256 px block"
    assert c.block_shapes[0] == (256, 256) and c.compression.name == "deflate"
    assert c.nodata == 255 and c.colormap(1)[1] == (230, 25, 75, 255)
    classes = c.read(1)
    overview = c.read(1, out_shape=(300, 350))  # served from the overview
  valid = np.isfinite(dem)
  np.testing.assert_array_equal(classes, np.where(valid, dem > 5, 255).astype(np.uint8))
  assert set(np.unique(overview)) == {0, 1, 255}  # nearest: class values, never blends
  np.testing.assert_array_equal(overview, classes[::2, ::2])
  with rasterio.open(tmp_path / "p.tif") as p:
    assert p.count == 2 and p.descriptions == ("p(background)", "p(foreground)")
    assert p.overviews(2) == [2, 4] and np.isnan(p.nodata)
    np.testing.assert_allclose(
      p.read(2)[valid], threshold_apply(dem[valid][:, None])[:, 1], atol=1e-5
    )


def test_cog_output_writes_nothing_when_the_block_fails_and_refuses_existing(tmp_path):
  out = tmp_path / "x.tif"
  with pytest.raises(RuntimeError):
    with cog.cog_output(out) as staged:
      with rasterio.open(
        staged,
        "w",
        driver="GTiff",
        width=8,
        height=8,
        count=1,
        dtype="uint8",
        crs=CRS,
        transform=TRANSFORM,
      ) as dst:
        dst.write(np.zeros((8, 8), np.uint8), 1)
      raise RuntimeError("midway")
  assert list(tmp_path.iterdir()) == []
  out.write_bytes(b"earlier")
  with pytest.raises(FileExistsError, match="x.tif"):
    with cog.cog_output(out):
      pass
  assert out.read_bytes() == b"earlier"


def test_a_plain_geotiff_is_not_a_valid_cog(tmp_path):
  path = tmp_path / "plain.tif"  # striped, no overviews: the validator must say so
  with rasterio.open(
    path,
    "w",
    driver="GTiff",
    width=1024,
    height=1024,
    count=1,
    dtype="uint8",
    crs=CRS,
    transform=TRANSFORM,
  ) as dst:
    dst.write(np.zeros((1024, 1024), np.uint8), 1)
  ok, errors, _ = cog.validate(path)
  assert not ok and errors
