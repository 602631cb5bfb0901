"""evaluate_split reports boundary IoU beside the confusion-matrix metrics, over every batch of a
split, with the band set in metres from the tiles' cell size (synthetic tiles, a fixed-rule
model: no training)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines.synthetic import synthetic_scene, write_scene_geotiffs
from data_pipelines.tile_writer import write_tiles
from demmae_jax import metrics
from demmae_jax.inference.evaluate import evaluate_split


class HighIsPositive(nnx.Module):
  """Class 1 where the min-max normalised elevation exceeds 0.5."""

  def __init__(self):
    self.scale = nnx.Param(jnp.ones(()))

  def __call__(self, images):
    x = images[..., 0]
    return jnp.stack([0.5 - x, x - 0.5], -1) * self.scale


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
  folder = tmp_path_factory.mktemp("synthetic")
  scene = synthetic_scene(160, 160, seed=3, n_buildings=20)
  paths = write_scene_geotiffs(scene, folder / "rasters", cell_size=0.5, label_value=1)
  return write_tiles(
    paths["dsm"],
    folder / "tiles",
    label=paths["label"],
    tile_size=32,
    stride=16,
    block_px=32,
    progress=False,
  )


def test_evaluate_split_adds_boundary_iou_of_every_batch(tiles):
  spec = {
    "num_classes": 2,
    "class_names": ["background", "building"],
    "tile_size": 32,
    "cell_size": 0.5,
    "normalisation": {"mode": "minmax", "channels": 1, "scale_m": 30.0, "low_percentile": 2.0},
  }
  summary, kept = evaluate_split(
    HighIsPositive(), spec, str(tiles), "test", batch_size=4, keep=10**6
  )
  n = len(kept["pred"])
  assert n > 4 and n % 4  # several batches and a padded last one
  want = metrics.BoundaryIoU(2)  # 1 m at 0.5 m
  want.update(kept["pred"], kept["label"], kept["valid"])
  assert summary["boundary"] == {
    "iou": want.value,
    "band_px": 2,
    "band_m": 1.0,
    "edge": "unknown",
    "intersection": want.intersection,
    "union": want.union,
  }
  assert summary["boundary_iou"] == want.value and 0 < want.value < summary["iou"] < 1
  # the confusion-matrix part is unchanged
  cm = np.asarray(metrics.confusion_matrix(kept["pred"], kept["label"], 2, kept["valid"]))
  assert summary["confusion_matrix"] == cm.tolist()
