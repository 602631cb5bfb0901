"""The tf.data reader: batch contract, augmentation on DEM and label together, determinism and
resumption, per-process sharding, and clear errors on corrupt shards."""

import json

import numpy as np
import pytest

from data_pipelines.errors import DataError
from data_pipelines.reader import make_dataset, make_tf_dataset
from data_pipelines.synthetic import synthetic_scene, write_scene_geotiffs
from data_pipelines.tile_writer import write_tiles

BASE = 100.0
ONE_HOST = dict(process_index=0, process_count=1)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
  # flat terrain (0.5 m relief) so that "building" <=> elevation > BASE + 2 m, checkable after augmentation
  scene = synthetic_scene(192, 192, seed=5, relief_m=0.5, base_m=BASE, n_buildings=20)
  folder = tmp_path_factory.mktemp("reader")
  tifs = write_scene_geotiffs(scene, folder / "tif", label_value=1)
  return str(
    write_tiles(
      tifs["dsm"],
      folder / "tiles",
      label=tifs["label"],
      tile_size=32,
      stride=16,
      block_px=64,
      min_labelled=0,
      dtype="float16",
      tiles_per_shard=8,
      progress=False,
    )
  )


def _elevation(batch, manifest):
  stats = json.load(open(manifest))["stats"]["elevation"]
  return batch["image"][..., 0] * stats["std"] + stats["mean"]


def test_batches_have_the_documented_contract(manifest):
  batch = next(make_dataset(manifest, "train", global_batch_size=8, channels=3, **ONE_HOST))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (8, 32, 32) and batch["label"].dtype == np.int32
  assert batch["valid"].shape == (8, 32, 32) and batch["valid"].dtype == np.float32
  assert set(np.unique(batch["label"])) <= {0, 1}
  assert 0 <= batch["image"].min() and batch["image"].max() <= 1
  # without process arguments the share comes from jax (one process here: the whole batch)
  assert next(make_dataset(manifest, "val", global_batch_size=4))["image"].shape[0] == 4


def test_augmentation_moves_dem_and_label_together(manifest):
  kw = dict(global_batch_size=8, normalisation="zscore", deterministic=True, seed=3, **ONE_HOST)
  plain = make_dataset(manifest, "train", augment=False, **kw)
  augmented = make_dataset(manifest, "train", augment=True, **kw)
  changed = 0
  for _ in range(6):
    a, b = next(plain), next(augmented)
    elev = _elevation(b, manifest)
    np.testing.assert_array_equal(elev > BASE + 2, b["label"] == 1)
    for i in range(8):  # each augmented tile is one of the 8 flips/rotations of the plain tile
      variants = [np.rot90(t, k) for t in (a["label"][i], a["label"][i].T) for k in range(4)]
      assert any(np.array_equal(v, b["label"][i]) for v in variants)
      changed += not np.array_equal(a["label"][i], b["label"][i])
  assert changed > 10


def test_deterministic_stream_repeats_and_resumes_at_batch_k(manifest):
  kw = dict(global_batch_size=4, deterministic=True, seed=7, **ONE_HOST)
  first = [next(it) for it in [make_dataset(manifest, "train", **kw)] for _ in range(12)]
  again = make_dataset(manifest, "train", **kw)
  for a in first[:5]:
    b = next(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)
  resumed = make_dataset(manifest, "train", skip_batches=9, **kw)
  for a in first[9:]:
    b = next(resumed)
    assert all(np.array_equal(a[k], b[k]) for k in a)
  other_seed = next(make_dataset(manifest, "train", **{**kw, "seed": 8}))
  assert not np.array_equal(other_seed["image"], first[0]["image"])
  with pytest.raises(ValueError, match="skip_batches needs deterministic=True"):
    make_dataset(manifest, "train", global_batch_size=4, skip_batches=2, **ONE_HOST)


def test_processes_read_disjoint_shares_of_an_eval_split(manifest):
  m = json.load(open(manifest))
  # 2 processes over train's 7 shards: whole files each; 4 over val's 3 shards: every 4th record
  assert len(m["splits"]["train"]["files"]) >= 2 > 0 and len(m["splits"]["val"]["files"]) < 4
  for split, n, shuffle in (("train", 2, True), ("val", 4, False), ("val", 4, True)):
    ids = []
    for p in range(n):  # shuffled without a seed: each process draws its own order
      ds = make_tf_dataset(
        manifest,
        split,
        global_batch_size=2 * n,
        augment=False,
        shuffle=shuffle,
        repeat=False,
        with_meta=True,
        process_index=p,
        process_count=n,
      )
      ids.append([int(t) for b in ds.as_numpy_iterator() for t in b["tile_id"]])
      assert all(len(b["tile_id"]) <= 2 for b in ds.as_numpy_iterator())  # per-host share
    assert all(ids), split
    assert sorted(sum(ids, [])) == sorted(m["splits"][split]["tile_ids"]), split  # each once


def test_file_globs_read_the_same_tiles_as_the_split(manifest):
  from pathlib import Path

  pattern = str(Path(manifest).parent / "val-*.tfrecord")
  kw = dict(global_batch_size=4, with_meta=True, **ONE_HOST)
  by_glob = [
    int(t)
    for b in make_tf_dataset(manifest, "val", files=[pattern], **kw).as_numpy_iterator()
    for t in b["tile_id"]
  ]
  by_split = [
    int(t) for b in make_tf_dataset(manifest, "val", **kw).as_numpy_iterator() for t in b["tile_id"]
  ]
  assert sorted(by_glob) == sorted(by_split) and by_glob
  with pytest.raises(DataError, match="no TFRecord files"):
    make_dataset(manifest, "val", files=[pattern + ".missing"], global_batch_size=4, **ONE_HOST)


def test_few_label_subset_reads_exactly_its_tiles(manifest):
  m = json.load(open(manifest))
  ds = make_tf_dataset(
    manifest,
    "train_10",
    global_batch_size=4,
    repeat=False,
    drop_remainder=False,
    with_meta=True,
    **ONE_HOST,
  )
  assert (
    sorted(int(t) for b in ds.as_numpy_iterator() for t in b["tile_id"])
    == m["subsets"]["train_10"]["tile_ids"]
  )
  with pytest.raises(ValueError, match="split 'train_5000' not in"):
    make_dataset(manifest, "train_5000", global_batch_size=4, **ONE_HOST)


def test_truncated_shard_is_an_error_naming_the_file(manifest, tmp_path):
  import shutil
  from pathlib import Path

  src = Path(manifest).parent
  dst = tmp_path / "tiles"
  shutil.copytree(src, dst)
  shard = dst / json.load(open(manifest))["splits"]["val"]["files"][0]
  shard.write_bytes(shard.read_bytes()[:-100])
  with pytest.raises(DataError, match=f"{shard.name}.*corrupt or truncated"):
    list(make_dataset(str(dst / "manifest.json"), "val", global_batch_size=2, **ONE_HOST))


def test_the_eight_symmetries_are_the_dihedral_group():
  import tensorflow as tf

  from data_pipelines.augment import SYMMETRIES

  x = np.arange(3 * 5 * 5).reshape(3, 5, 5)
  got = [f(tf.constant(x)).numpy() for f in SYMMETRIES]
  want = [
    np.stack([np.rot90(t, k) for t in (xi if not tr else xi.T for xi in x)])
    for tr in (False, True)
    for k in range(4)
  ]
  assert len({g.tobytes() for g in got}) == 8
  assert {g.tobytes() for g in got} == {w.tobytes() for w in want}


def test_reader_normalisation_skipping_masks_matches_the_masked_definition(manifest):
  """The reader's unmasked shortcut (filled=True) relies on the writer filling invalid pixels with
  the tile's lowest valid value; check it on tiles with invalid pixels."""
  import tensorflow as tf

  from data_pipelines.normalisation import normalise
  from data_pipelines.tile_records import decode_tile_numpy

  m = json.load(open(manifest))
  files = [
    str(__import__("pathlib").Path(manifest).parent / f) for f in m["splits"]["train"]["files"]
  ]
  tiles = [
    decode_tile_numpy(r, ["elevation"], m["dtype"], 32)
    for r in tf.data.TFRecordDataset(files).as_numpy_iterator()
  ]
  x = np.stack([t["elevation"] for t in tiles])
  v = np.stack([t["valid"] for t in tiles]).astype(bool)
  v[:, :3, :3] = False  # knock out pixels as nodata would
  x[:, :3, :3] = np.where(v, x, np.inf).min(axis=(1, 2))[:, None, None]  # as the writer fills them
  for mode in ("minmax", "relative"):
    a = normalise(x, v, mode, filled=True).numpy()
    b = normalise(x, v, mode).numpy()
    np.testing.assert_array_equal(a, b)


def test_larger_batches_hold_distinct_tiles_and_resume_alike(manifest):
  kw = dict(deterministic=True, seed=2, **ONE_HOST)
  big = make_dataset(manifest, "train", global_batch_size=16, **kw)
  first, second = next(big), next(big)
  assert first["image"].shape == (16, 32, 32, 1)
  resumed = next(make_dataset(manifest, "train", global_batch_size=16, skip_batches=1, **kw))
  assert all(np.array_equal(second[k], resumed[k]) for k in second)
  assert len({t.tobytes() for t in first["image"]}) == 16  # 16 distinct tiles, not 2 x 8


def test_reader_images_equal_the_numpy_normalisation_of_the_stored_tiles(manifest):
  """What the trainer sees equals what the predictor computes on the same pixels."""
  from pathlib import Path

  import tensorflow as tf

  from data_pipelines.normalisation import normalise_numpy
  from data_pipelines.tile_records import decode_tile_numpy

  m = json.load(open(manifest))
  files = [str(Path(manifest).parent / f) for f in m["splits"]["val"]["files"]]
  tiles = {
    t["tile_id"]: t
    for t in (
      decode_tile_numpy(r, ["elevation"], m["dtype"], 32)
      for r in tf.data.TFRecordDataset(files).as_numpy_iterator()
    )
  }
  for mode in ("minmax", "zscore", "relative"):
    ds = make_tf_dataset(
      manifest, "val", global_batch_size=4, normalisation=mode, with_meta=True, **ONE_HOST
    )
    for b in ds.as_numpy_iterator():
      for i, tid in enumerate(b["tile_id"]):
        t = tiles[int(tid)]
        # every stored pixel has a value: the network input does not depend on validity
        want = normalise_numpy(t["elevation"], None, mode, stats=m["stats"]["elevation"])
        np.testing.assert_allclose(b["image"][i], want, atol=1e-6, err_msg=mode)
        np.testing.assert_array_equal(b["label"][i], t["label"])


def _augmented_tiles(manifest, **augmentation) -> list[tuple[np.ndarray, np.ndarray]]:
  """(tile, the same tile with `augmentation`) for the 32 training tiles it changed, once the
  two streams are checked to hold the same tiles, symmetries and labels; and checked never to
  change an evaluation batch, even at probability 1."""
  kw = dict(global_batch_size=8, normalisation="zscore", deterministic=True, seed=3, augment=True)
  plain = make_dataset(manifest, "train", **kw, **ONE_HOST)
  augmented = make_dataset(manifest, "train", **augmentation, **kw, **ONE_HOST)
  changed = []
  for _ in range(4):
    a, b = next(plain), next(augmented)
    np.testing.assert_array_equal(a["label"], b["label"])
    changed += [(x, y) for x, y in zip(a["image"], b["image"]) if not np.array_equal(x, y)]
  ev = dict(global_batch_size=8, deterministic=True, **ONE_HOST)
  always = {k: 1.0 for k in augmentation}
  np.testing.assert_array_equal(
    next(make_dataset(manifest, "val", **always, **ev))["image"],
    next(make_dataset(manifest, "val", **ev))["image"],
  )
  return changed


def test_densifying_closes_a_share_of_tiles_and_only_raises_heights(manifest):
  import scipy.ndimage as ndi

  closed = _augmented_tiles(manifest, densify=0.5)
  assert 8 <= len(closed) <= 24  # about half of 32 tiles
  for x, y in closed:
    assert (y >= x).all()  # a closing only fills pits
    want = ndi.grey_closing(x[..., 0], size=(3, 3))  # away from the tile edge (padding differs)
    np.testing.assert_allclose(y[2:-2, 2:-2, 0], want[2:-2, 2:-2], atol=1e-6)


def test_coarsening_shows_a_share_of_tiles_as_a_2x_coarser_source(manifest):
  coarsened = _augmented_tiles(manifest, coarsen=0.5)
  assert 8 <= len(coarsened) <= 24  # about half of 32 tiles
  for x, y in coarsened:
    h, w, c = x.shape  # block means, bilinearly back: the 2 x 2 means of y are those of x
    means = lambda t: t.reshape(h // 2, 2, w // 2, 2, c).mean((1, 3))  # noqa: B023 (used here)
    assert np.abs(means(y) - means(x)).max() < 0.35 * np.abs(x).max()
    assert np.abs(np.diff(y, axis=0)).mean() < np.abs(np.diff(x, axis=0)).mean()  # smoother
