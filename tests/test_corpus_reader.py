"""The tf.data reader of Beam-built corpora (data_pipelines/corpus_reader.py): every tile once per
epoch, processes read disjoint shards, a resumed stream is bit-identical, normalisation is the
function RasterCrops and finetuning use, and scripts/pretrain.py trains from a corpus."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import corpus_beam as cb
from data_pipelines.corpus_reader import CorpusTiles
from data_pipelines.normalisation import normalise_numpy
from data_pipelines.synthetic import synthetic_scene, write_las
from data_pipelines.tile_records import decode_tile_numpy
from test_corpus_beam import CRS, X0, Y0, _cloud, _geotiff

TILE = 32
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("corpus_inputs")
  write_las(d / "a.laz", *_cloud(X0, Y0, size=96), crs=CRS)
  for i in range(2):
    _geotiff(
      d / f"dem{i}.tif",
      synthetic_scene(128, 128, seed=i).dsm + 10 * i,
      origin=(X0 + 1000 + 300 * i, Y0),
    )
  _geotiff(d / "eval.tif", synthetic_scene(64, 64, seed=9).dsm, origin=(X0 + 2000, Y0))
  out = tmp_path_factory.mktemp("corpus") / "c"
  cb.build_corpus_beam(
    [
      cb.CorpusInput(str(d / "*.laz")),
      cb.CorpusInput(str(d / "dem*.tif")),
      cb.CorpusInput(str(d / "eval.tif"), role="eval"),
    ],
    cb.BuildOptions(out_dir=str(out), tile_size=TILE, stride=16, tiles_per_shard=5),
  )
  return out


def _raw(records) -> list[dict]:
  return [decode_tile_numpy(r, ["elevation"], "float16", TILE) for r in records]


def _key(record: bytes) -> tuple:
  t = decode_tile_numpy(record, [], "float16", TILE)
  return t["source"], tuple(t["window"])


def test_each_epoch_reads_every_tile_once_in_a_new_order_and_streams_split_the_shards(corpus):
  m = json.loads((corpus / cb.MANIFEST).read_text())
  train = {(s["source"]) for s in m["shards"] if s["role"] == "train"}
  n = sum(s["count"] for s in m["shards"] if s["role"] == "train")
  assert len(train) == 3 and n > 40 and len([s for s in m["shards"] if s["role"] == "train"]) > 8
  src = CorpusTiles([str(corpus)], 8, streams=1, shuffle_buffer=16)
  assert src.stream_tiles == [n]
  stream = [_key(r) for r in src.records(0).take(2 * n).as_numpy_iterator()]
  first, second = stream[:n], stream[n:]
  assert len(set(first)) == n and set(first) == set(second) and first != second
  assert {k[0] for k in first} == train  # no eval tile in training

  two = CorpusTiles([str(corpus)], 8, streams=2, shuffle_buffer=16)
  keys = [
    {_key(r) for r in two.records(k).take(two.stream_tiles[k]).as_numpy_iterator()}
    for k in range(2)
  ]
  assert not keys[0] & keys[1] and keys[0] | keys[1] == set(first)
  assert not set(two.stream_paths[0]) & set(two.stream_paths[1]) and sum(two.stream_tiles) == n


def test_processes_reading_their_rows_make_the_one_process_global_batch(corpus):
  src = CorpusTiles(
    [str(corpus)], 8, streams=4, normalisation="relative", crop=24, shuffle_buffer=16
  )
  for start in (0, 7):
    whole = list(src.tf_dataset(start).take(3).as_numpy_iterator())
    halves = [
      list(src.tf_dataset(start, rows=rows).take(3).as_numpy_iterator())
      for rows in ((0, 4), (4, 8))
    ]
    for step, batch in enumerate(whole):
      np.testing.assert_array_equal(
        batch["image"], np.concatenate([h[step]["image"] for h in halves])
      )
  assert not np.array_equal(whole[0]["image"][:4], whole[0]["image"][4:])


@pytest.mark.parametrize("mode", ["minmax", "relative+ndsm"])
def test_resumed_batches_are_bit_identical_across_epochs(corpus, mode):
  src = CorpusTiles([str(corpus)], 12, normalisation=mode, streams=2, shuffle_buffer=16)
  steps = max(src.stream_tiles) // 6 * 2 + 3  # past every stream's second epoch boundary
  run = list(src.tf_dataset(0).take(steps).as_numpy_iterator())
  start = steps - 4
  resumed = list(src.tf_dataset(start).take(4).as_numpy_iterator())
  for a, b in zip(run[start:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert run[0]["image"].shape == (12, TILE, TILE, len(mode.split("+")))
  again = list(src.tf_dataset(0).take(steps).as_numpy_iterator())  # deterministic from scratch too
  assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(run, again))


@pytest.mark.parametrize("mode", ["minmax", "relative", "ndsm"])
def test_images_are_the_raw_tiles_normalised_as_rastercrops_does(corpus, mode):
  src = CorpusTiles(
    [str(corpus)], 6, normalisation=mode, augment=False, streams=1, shuffle_buffer=16, scale_m=20.0
  )
  records = list(src.records(0).take(6).as_numpy_iterator())
  channels = ["elevation", "ndsm"] if mode == "ndsm" else ["elevation"]
  raw = [decode_tile_numpy(r, channels, "float16", TILE) for r in records]
  image = next(src.batches(0))["image"]
  elevation = np.stack([t["elevation"] for t in raw])
  kw = {"ndsm": np.stack([t["ndsm"] for t in raw])} if mode == "ndsm" else {}
  want = normalise_numpy(elevation, None, mode, scale_m=20.0, **kw)
  np.testing.assert_allclose(image, want, atol=1e-6)
  assert image.min() >= 0 and image.max() <= 1 and image.std() > 0.01
  if mode == "ndsm":
    assert all(t["source"].startswith("a.laz") for t in raw)  # only LiDAR tiles have an nDSM


def test_cropping_rows_and_bad_requests(corpus, tmp_path):
  src = CorpusTiles([str(corpus)], 8, crop=16, streams=2)
  assert next(src.batches(0, rows=(4, 8)))["image"].shape == (4, 16, 16, 1)
  with pytest.raises(ValueError, match="rows 0:3 do not fall on the 2 streams"):
    src.tf_dataset(0, rows=(0, 3))
  with pytest.raises(ValueError, match="must be a multiple of streams"):
    CorpusTiles([str(corpus)], 8, streams=3)
  with pytest.raises(ValueError, match="larger than the corpus tiles"):
    CorpusTiles([str(corpus)], 8, crop=64)
  with pytest.raises(ValueError, match="matches no corpus"):
    CorpusTiles([str(tmp_path / "none*")], 8)
  with pytest.raises(ValueError, match="no 'eval' shards with channels"):
    CorpusTiles([str(corpus)], 8, role="eval", normalisation="ndsm")


def test_pretrain_script_trains_from_a_corpus_with_held_out_loss(corpus, tmp_path):
  wd = tmp_path / "run"
  out = subprocess.run(
    [
      sys.executable,
      "scripts/pretrain.py",
      "--config=configs/dem_pretrain.py:tiny",
      f"--workdir={wd}",
      f"--config.data.corpus_tiles={corpus}",
      "--config.data.normalisation.mode=relative",
      "--config.total_steps=4",
      "--config.optim.warmup_steps=2",
      "--config.checkpoint.every_steps=2",
      "--config.log.every_steps=1",
      "--config.log.picture_every_steps=0",
      "--config.log.progress=False",
      "--config.eval_every_steps=2",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
  assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_tfds_load_serves_the_corpus_tiles_by_role(corpus, tmp_path):
  import tensorflow_datasets as tfds

  import data_pipelines.tfds_builder  # noqa: F401  (registers dem_corpus)

  m = json.loads((corpus / cb.MANIFEST).read_text())
  for role in ("train", "eval"):
    ds = tfds.load(
      "dem_corpus",
      split=role,
      data_dir=str(tmp_path / "tfds"),
      builder_kwargs={"manifest": str(corpus / cb.MANIFEST)},
    )
    got = {(ex["source"].decode(), tuple(ex["bounds"])): ex for ex in tfds.as_numpy(ds)}
    files = [str(corpus / s["file"]) for s in m["shards"] if s["role"] == role]
    want = _raw(tf.data.TFRecordDataset(files).as_numpy_iterator())
    assert len(got) == len(want) == sum(s["count"] for s in m["shards"] if s["role"] == role)
    for t in want:
      ex = got[(t["source"], tuple(t["bounds"]))]
      np.testing.assert_array_equal(ex["elevation"], t["elevation"])
      np.testing.assert_array_equal(ex["stats"], t["stats"])
