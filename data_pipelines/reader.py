"""The streaming tf.data reader of tile shards: yields NumPy batch dicts

  {"image": float32 [B, H, W, C] normalised, "valid": float32 [B, H, W],
   "label": int32 [B, H, W] with 255 = ignore (only when the tiles carry labels)}

files (local or gs://) -> per-process file shard -> interleave -> shuffle -> repeat -> batch
(per-process share of the global batch) -> parse the whole batch at once (tf.io.parse_example,
float16 storage halves the bytes) -> dihedral augmentation (flips and 90-degree rotations, the same
on DEM, validity and label) -> normalisation -> prefetch.

Deterministic mode (seeded shuffles, ordered interleave and map) gives the same batches on every
run; `skip_batches=K` then resumes a run exactly at batch K (skipping happens before parsing).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf

from data_pipelines.augment import random_closing, random_coarsening, random_symmetries
from data_pipelines.errors import DataError
from data_pipelines.normalisation import normalise, parse_mode
from data_pipelines.tile_records import (
  FLOAT_DTYPES,
  decode_mask,
  decode_raw_channel,
  parse_spec,
  to_metres,
)
from data_pipelines.tile_writer import FORMAT


def read_manifest(path: str) -> dict:
  """The manifest at `path` (local or gs://), checked for the tile format."""
  try:
    with tf.io.gfile.GFile(path, "r") as f:
      manifest = json.load(f)
  except (tf.errors.NotFoundError, json.JSONDecodeError) as e:
    raise DataError(path, f"cannot read the tile manifest ({e})") from e
  if manifest.get("format") != FORMAT:
    raise DataError(path, f"not a {FORMAT} manifest (format={manifest.get('format')!r})")
  manifest["_dir"] = posixpath.dirname(str(path))
  return manifest


def split_files(manifest: dict, split: str) -> list[str]:
  """Shard paths of a split ('train', 'val', 'test') or a few-label subset ('train_50')."""
  entry = manifest["splits"].get(split) or manifest["subsets"].get(split)
  if entry is None:
    known = list(manifest["splits"]) + list(manifest["subsets"])
    raise ValueError(f"split {split!r} not in {manifest['_dir']}; available: {known}")
  return [posixpath.join(manifest["_dir"], f) for f in entry["files"]]


def make_tf_dataset(
  manifest_path: str,
  split: str = "train",
  *,
  global_batch_size: int,
  normalisation: str = "minmax",
  channels: int = 1,
  scale_m: float = 30.0,
  low_percentile: float = 2.0,
  augment: bool | None = None,
  shuffle: bool | None = None,
  repeat: bool | None = None,
  seed: int = 0,
  deterministic: bool = False,
  skip_batches: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  shuffle_buffer: int = 2048,
  drop_remainder: bool | None = None,
  files: Sequence[str] | None = None,
  with_meta: bool = False,
  coarsen: float = 0.0,
  densify: float = 0.0,
) -> tf.data.Dataset:
  """The tf.data pipeline (tensors); `make_dataset` wraps it into NumPy dicts.

  Training defaults (split starting with 'train'): augment, shuffle, repeat, drop the remainder;
  evaluation splits: none of these. `files` (paths or globs, e.g. gs://...) overrides the split's
  shards. `process_index`/`process_count` default to jax.process_index()/process_count().
  `coarsen`: with augmentation, the share of tiles shown as a 2x coarser source would give them;
  `densify`: the share shown as a denser survey would draw them (augment.random_closing).
  """
  manifest = read_manifest(manifest_path)
  training = split.startswith("train")
  augment = training if augment is None else augment
  shuffle = training if shuffle is None else shuffle
  repeat = training if repeat is None else repeat
  drop_remainder = training if drop_remainder is None else drop_remainder
  if skip_batches and not deterministic:
    raise ValueError(
      "skip_batches needs deterministic=True: only a deterministic stream can be resumed"
    )
  if process_index is None or process_count is None:
    import jax  # lazily: the data code does not need jax otherwise

    process_index, process_count = jax.process_index(), jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(
      f"global batch {global_batch_size} is not divisible by {process_count} processes"
    )
  batch = global_batch_size // process_count

  if files:
    paths = sorted(p for pattern in files for p in tf.io.gfile.glob(pattern))
  else:
    paths = split_files(manifest, split)
  if not paths:
    raise DataError(files or manifest_path, f"no TFRecord files for split {split!r}")
  missing = [p for p in paths if not tf.io.gfile.exists(p)]
  if missing:
    raise DataError(
      missing[0],
      f"listed in the tile manifest {manifest_path} but missing"
      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
    )
  wants_ndsm = "ndsm" in parse_mode(normalisation)
  if wants_ndsm and "ndsm" not in manifest["channels"]:
    raise DataError(
      manifest_path, f"normalisation {normalisation!r} needs tiles with an 'ndsm' channel"
    )
  size, dtype, has_label = manifest["tile_size"], manifest["dtype"], manifest["has_label"]
  channel_names = ["elevation"] + (["ndsm"] if wants_ndsm else [])
  spec = parse_spec(channel_names, has_label, with_meta)
  stats = manifest["stats"]["elevation"]

  # one process reads whole files when there are enough of them, otherwise every n-th record
  by_file = len(paths) >= process_count
  if by_file:
    paths = paths[process_index::process_count]
  ds = tf.data.Dataset.from_tensor_slices(paths)
  # sharding by record needs the same record order in every process: no file shuffle, ordered
  # interleave (the record shuffle after the shard still mixes)
  if shuffle and by_file:
    ds = ds.shuffle(len(paths), seed=seed if deterministic else None, reshuffle_each_iteration=True)
  ds = ds.interleave(
    tf.data.TFRecordDataset,
    cycle_length=min(len(paths), 8),
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=deterministic or not by_file,
  )
  if not by_file:
    ds = ds.shard(process_count, process_index)
  if shuffle:
    ds = ds.shuffle(
      shuffle_buffer, seed=seed if deterministic else None, reshuffle_each_iteration=True
    )
  if repeat:
    ds = ds.repeat()
  ds = ds.batch(batch, drop_remainder=drop_remainder).enumerate()
  if skip_batches:
    ds = ds.skip(skip_batches)  # before parsing: skipped batches cost only their reading

  def transform(planes, offsets, aug_seed):
    """Augment in the stored dtypes (float16/uint8: fewer bytes to move), then convert, normalise.
    (XLA-compiling this was tried: no reliable gain on 2 CPU cores.)"""
    if augment:
      planes = random_symmetries(planes, aug_seed)
    metres = {c: to_metres(p, o) for c, p, o in zip(channel_names, planes, offsets)}
    valid = planes[len(channel_names)]
    # The network sees every stored pixel (measured, interpolated, or filled with the tile's
    # lowest value where there is none); validity only weights the loss and the metrics.
    has_value = tf.ones_like(valid, tf.bool)
    out = {
      "image": normalise(
        metres["elevation"],
        has_value,
        normalisation,
        stats=stats,
        ndsm=metres.get("ndsm"),
        scale_m=scale_m,
        low_percentile=low_percentile,
        channels=channels,
        filled=True,
      ),
      "valid": tf.cast(valid, tf.float32),
    }
    if augment and densify > 0:
      out["image"] = random_closing(out["image"], aug_seed + tf.constant([2, 0], tf.int64), densify)
    if augment and coarsen > 0:
      out["image"] = random_coarsening(
        out["image"], aug_seed + tf.constant([1, 0], tf.int64), coarsen
      )
    if has_label:
      out["label"] = tf.cast(planes[-1], tf.int32)
    return out

  def process(index, records):
    f = tf.io.parse_example(records, spec)
    planes = [decode_raw_channel(f[c], dtype, size) for c in channel_names]
    planes.append(decode_mask(f["valid"], size))
    if has_label:
      planes.append(decode_mask(f["label"], size))
    # the augmentation seed depends on the batch's position only: same batch, same augmentation
    out = transform(
      planes, [f[f"{c}_offset"] for c in channel_names], tf.stack([tf.cast(seed, tf.int64), index])
    )
    if with_meta:
      out.update(
        {k: f[k] for k in ("tile_id", "window", "transform", "cell_size", "crs_wkt", "source")}
      )
    return out

  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  options = tf.data.Options()
  options.deterministic = deterministic
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _check_record(record: bytes, manifest: dict) -> str | None:
  """What is wrong with one record against the manifest's tile format (None: nothing)."""
  try:
    f = tf.train.Example.FromString(record).features.feature
  except Exception as e:  # protobuf's DecodeError and friends
    return f"not a tf.train.Example ({e.__class__.__name__})"
  size, dtype = int(manifest["tile_size"]), manifest["dtype"]
  width = np.dtype(FLOAT_DTYPES[dtype]).itemsize
  want = {c: (size * size * width, f"{size}x{size} {dtype}") for c in manifest["channels"]}
  want["valid"] = (size * size, f"{size}x{size} uint8")
  if manifest.get("has_label"):
    want["label"] = (size * size, f"{size}x{size} uint8")
  for name, (nbytes, what) in want.items():
    if name not in f or len(f[name].bytes_list.value) != 1:
      return f"no {name!r} bytes"
    got = len(f[name].bytes_list.value[0])
    if got != nbytes:
      return f"{name!r} holds {got} bytes, the manifest's tiles need {nbytes} ({what})"
  for c in manifest["channels"]:
    if len(f[f"{c}_offset"].float_list.value) != 1:
      return f"no {c + '_offset'!r} float"
  if len(f["tile_id"].int64_list.value) != 1 or len(f["window"].int64_list.value) != 4:
    return "no tile_id / window"
  return None


def check_shards(
  paths: Sequence[str], manifest: dict | None = None, counts: Sequence[int] | None = None
) -> int:
  """Read every record of every file; with `manifest`, decode each against its tile size, dtype,
  channels and label, and compare the number of records with `counts` (one per file or one in
  total). DataError naming the first missing, corrupt, truncated or misshapen file (and the
  record). Returns the number of records."""
  total = 0
  for path in paths:
    if not tf.io.gfile.exists(path):
      raise DataError(path, "listed in the tile manifest but missing")
    n = 0
    try:
      for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        if manifest is not None:
          problem = _check_record(record, manifest)
          if problem:
            raise DataError(path, f"record {n} does not match the manifest: {problem}")
        n += 1
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
      found = re.search(r"(corrupted|truncated) record at \d+", e.message)
      raise DataError(
        path,
        f"corrupt or truncated TFRecord after {n} good records ("
        + (found[0] if found else e.message.strip()[-200:])
        + ")",
      ) from e
    except tf.errors.OpError as e:
      raise DataError(
        path, f"cannot be read ({e.__class__.__name__}: {e.message.strip()[-200:]})"
      ) from e
    total += n
  if counts is not None and sum(counts) != total:
    raise DataError(
      paths[0] if len(paths) == 1 else posixpath.dirname(paths[0]),
      f"{total} records but the manifest lists {sum(counts)}",
    )
  return total


def check_tile_set(manifest_path: str) -> dict[str, int]:
  """Every split and subset of a tile set decoded against its manifest: {split: records}."""
  m = read_manifest(manifest_path)
  out = {}
  for split in list(m["splits"]) + list(m["subsets"]):
    entry = m["splits"].get(split) or m["subsets"][split]
    out[split] = check_shards(split_files(m, split), m, [entry["count"]])
  return out


def make_dataset(
  manifest_path: str, split: str = "train", **kwargs
) -> Iterator[dict[str, np.ndarray]]:
  """Iterator of NumPy batch dicts (see module doc); arguments as `make_tf_dataset`.

  tf.data's own errors do not say which file broke: on one, the shards are checked one by one
  (each record decoded against the manifest) and a DataError names the file and the record.
  """
  dataset = make_tf_dataset(manifest_path, split, **kwargs)

  def batches():
    try:
      yield from dataset.as_numpy_iterator()
    except tf.errors.OpError:
      files = kwargs.get("files")
      manifest = read_manifest(manifest_path)
      paths = (
        [p for pattern in files for p in tf.io.gfile.glob(pattern)]
        if files
        else split_files(manifest, split)
      )
      check_shards(paths, manifest)  # names the file (and record) tf.data did not
      raise

  return batches()
