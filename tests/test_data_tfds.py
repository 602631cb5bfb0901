"""tfds.load over a prepared tile set gives back the very tiles that were written."""

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import data_pipelines.tfds_builder  # noqa: F401  (registers dem_tiles)
from data_pipelines.synthetic import synthetic_scene, write_scene_geotiffs
from data_pipelines.tile_records import decode_tile_numpy
from data_pipelines.tile_writer import write_tiles


def test_tfds_load_returns_the_written_tiles(tmp_path):
  scene = synthetic_scene(128, 128, seed=2)
  tifs = write_scene_geotiffs(scene, tmp_path / "tif", label_value=2)
  manifest = write_tiles(
    tifs["dsm"],
    tmp_path / "tiles",
    label=tifs["label"],
    tile_size=32,
    stride=16,
    block_px=32,
    min_labelled=0,
    progress=False,
  )
  m = json.loads(manifest.read_text())
  ds = tfds.load(
    "dem_tiles",
    split="train",
    data_dir=str(tmp_path / "tfds"),
    builder_kwargs={"manifest": str(manifest)},
    download_and_prepare_kwargs={},
  )
  got = {int(ex["tile_id"]): ex for ex in tfds.as_numpy(ds)}
  assert sorted(got) == sorted(m["splits"]["train"]["tile_ids"])
  files = [str(manifest.parent / f) for f in m["splits"]["train"]["files"]]
  for record in tf.data.TFRecordDataset(files).as_numpy_iterator():
    want = decode_tile_numpy(record, ["elevation"], m["dtype"], 32)
    ex = got[want["tile_id"]]
    np.testing.assert_array_equal(ex["elevation"], want["elevation"])
    np.testing.assert_array_equal(ex["label"], want["label"])
    col, row = want["window"][:2]
    np.testing.assert_array_equal(ex["label"], scene.label[row : row + 32, col : col + 32] == 2)
  with pytest.raises(ValueError, match="needs builder_kwargs"):
    tfds.builder("dem_tiles", data_dir=str(tmp_path / "tfds2"))
