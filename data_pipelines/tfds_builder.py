"""TFDS builders over a prepared tile set and over a Beam-built pretraining corpus, so that
`tfds.load` works on both:

  import data_pipelines.tfds_builder  # registers "dem_tiles" and "dem_corpus"
  ds = tfds.load("dem_tiles", split="train", data_dir=..., builder_kwargs={"manifest": ".../manifest.json"})
  ds = tfds.load("dem_corpus", split="train", data_dir=..., builder_kwargs={"manifest": ".../corpus_manifest.json"})

Examples hold the raw tile (elevation in metres, float32), validity, label (if any), tile id and
geotransform; normalisation and augmentation stay with `data_pipelines.reader`. TFDS copies the
tiles into its own format under `data_dir`; each tile set needs its own `data_dir`.
"""

from __future__ import annotations

import posixpath

import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines.reader import read_manifest, split_files
from data_pipelines.tile_records import decode_tile_numpy


def _tile_features(size: int) -> dict:
  return {
    "elevation": tfds.features.Tensor(shape=(size, size), dtype=tf.float32),
    "valid": tfds.features.Tensor(shape=(size, size), dtype=tf.uint8),
  }


class DemTiles(tfds.core.GeneratorBasedBuilder):
  """Elevation tiles with validity and segmentation labels, from a demmae tile manifest."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Tiles of data_pipelines.tile_writer (format demmae-tiles/1)."}

  def __init__(self, *, manifest: str | None = None, **kwargs):
    if manifest is None:
      raise ValueError(
        "dem_tiles needs builder_kwargs={'manifest': path to a tile set's manifest.json}"
      )
    self._manifest = read_manifest(manifest)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self._manifest["tile_size"]
    features = {
      **_tile_features(size),
      "tile_id": tf.int64,
      "transform": tfds.features.Tensor(shape=(6,), dtype=tf.float64),
    }
    if self._manifest["has_label"]:
      features["label"] = tfds.features.Tensor(shape=(size, size), dtype=tf.uint8)
    return tfds.core.DatasetInfo(
      builder=self, description=__doc__, features=tfds.features.FeaturesDict(features)
    )

  def _split_generators(self, dl_manager):
    m = self._manifest
    names = [s for s in m["splits"] if m["splits"][s]["count"]] + list(m["subsets"])
    return {name: self._generate_examples(split_files(m, name)) for name in names}

  def _generate_examples(self, files):
    m = self._manifest
    for record in tf.data.TFRecordDataset(files).as_numpy_iterator():
      t = decode_tile_numpy(record, ["elevation"], m["dtype"], m["tile_size"])
      example = {
        "elevation": t["elevation"],
        "valid": t["valid"],
        "tile_id": t["tile_id"],
        "transform": t["transform"],
      }
      if "label" in t:
        example["label"] = t["label"]
      yield int(t["tile_id"]), example


class DemCorpus(tfds.core.GeneratorBasedBuilder):
  """Raw elevation tiles of a pretraining corpus (data_pipelines/corpus_beam.py), split by role."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Tiles of data_pipelines.corpus_beam (format demmae-corpus/1)."}

  def __init__(self, *, manifest: str | None = None, **kwargs):
    from data_pipelines.corpus_reader import read_corpus_manifest

    if manifest is None:
      raise ValueError(
        "dem_corpus needs builder_kwargs={'manifest': path to a corpus_manifest.json}"
      )
    self._manifest = read_corpus_manifest(manifest)
    self._root = posixpath.dirname(str(manifest))
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
      **_tile_features(self._manifest["tile_size"]),
      "source": tfds.features.Text(),
      "bounds": tfds.features.Tensor(shape=(4,), dtype=tf.float64),
      "cell_size": tf.float32,
      "stats": tfds.features.Tensor(shape=(len(self._manifest["tile_stats"]),), dtype=tf.float32),
    }
    return tfds.core.DatasetInfo(
      builder=self, description=DemCorpus.__doc__, features=tfds.features.FeaturesDict(features)
    )

  def _split_generators(self, dl_manager):
    roles = sorted({s["role"] for s in self._manifest["shards"]})
    return {
      role: self._generate_examples(
        [
          posixpath.join(self._root, s["file"])
          for s in self._manifest["shards"]
          if s["role"] == role
        ]
      )
      for role in roles
    }

  def _generate_examples(self, files):
    m = self._manifest
    for record in tf.data.TFRecordDataset(files).as_numpy_iterator():
      t = decode_tile_numpy(record, ["elevation"], m["dtype"], m["tile_size"])
      yield (
        f"{t['source']}/{int(t['tile_id'])}",
        {k: t[k] for k in ("elevation", "valid", "source", "bounds", "cell_size", "stats")},
      )
