"""Pretraining batches streamed from Beam-built corpora (data_pipelines/corpus_beam.py) by tf.data.

    source = CorpusTiles(["runs/corpus/corpus_manifest.json"], global_batch=256, normalisation="ndsm")
    for batch in source.batches(start_step, rows=(a, b)):  # {"image": float32 [b - a, H, W, C]}

The same interface as data_pipelines.raster_source.RasterCrops, so the training loop takes either.

- Files: the shards of every manifest (globs of manifests or corpus folders, local or gs://) whose
  role matches (train / eval) and that hold the channels the normalisation needs ("ndsm": LiDAR
  shards only), sorted.
- Streams: the shards are dealt to `streams` (K) streams, k reading shards k, k + K, ... (every
  K-th record when there are fewer shards than streams); rows [k * B/K, (k + 1) * B/K) of the
  global batch B come from stream k. A process reads only the streams of its rows (per-process
  file sharding), so the global batch is the same for 1 process or any number dividing K
  (tested: two processes' rows put together equal one process's batch, bit for bit).
- Order: epoch e of stream k reads its shards in a permutation seeded by (seed, k, e),
  interleaved (ordered), through a shuffle buffer seeded likewise; epochs are concatenated, then
  batched. Batch s is a pure function of (seed, s): a run resumed at step s reads each stream
  from epoch floor(s * B/K / N_k) on (N_k: the stream's tile count, from the manifests) and skips
  the rest of that epoch's records unparsed, so it sees bit-identical batches to an uninterrupted
  run, at the cost of at most one epoch of reading.
- Per batch: parse (tf.io.parse_example), random symmetries per group of tiles (augment.py) and
  an optional random crop to `crop` px, both seeded by (seed, step, stream),
  then normalisation.normalise with the modes of RasterCrops (minmax | relative | ndsm, joined by
  "+" for one channel each): raw heights are stored, so the mode is the reader's choice.
"""

from __future__ import annotations

import glob
import json
import posixpath
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf

from data_pipelines.augment import GROUPS, random_symmetries
from data_pipelines.errors import DataError
from data_pipelines.normalisation import mode_channels, normalise, parse_mode
from data_pipelines.tile_records import decode_raw_channel, parse_spec, to_metres

INTERLEAVE = 8  # shards read at once per process


def _manifest_paths(patterns: Sequence[str]) -> list[str]:
  from data_pipelines.corpus_beam import MANIFEST

  out = []
  for pattern in patterns:
    pattern = str(pattern)
    matches = tf.io.gfile.glob(pattern) if "://" in pattern else glob.glob(pattern)
    if not matches:
      raise DataError(pattern, "matches no corpus (build one: scripts/prepare_data.py corpus-beam)")
    for m in sorted(matches):
      path = m if m.endswith(".json") else posixpath.join(m, MANIFEST)
      if not tf.io.gfile.exists(path):
        raise DataError(
          path, "no corpus manifest here (build the corpus: scripts/prepare_data.py corpus-beam)"
        )
      out.append(path)
  return out


def read_corpus_manifest(path: str) -> dict:
  """A corpus manifest (local or gs://), checked for the corpus format."""
  from data_pipelines.corpus_beam import FORMAT

  try:
    with tf.io.gfile.GFile(path) as f:
      m = json.load(f)
  except (tf.errors.NotFoundError, json.JSONDecodeError) as e:
    raise DataError(path, f"cannot read the corpus manifest ({e})") from e
  if m.get("format") != FORMAT:
    raise DataError(path, f"not a {FORMAT} manifest (format={m.get('format')!r})")
  return m


def corpus_shards(
  patterns: Sequence[str], role: str, channels: Sequence[str]
) -> tuple[list[str], list[int], dict]:
  """(shard paths, their tile counts, the common format) of `role` holding `channels`."""
  paths, counts, fmt = [], [], None
  for manifest_path in _manifest_paths(patterns):
    m = read_corpus_manifest(manifest_path)
    this = {"tile_size": m["tile_size"], "dtype": m["dtype"]}
    if fmt is not None and this != fmt:
      raise DataError(
        manifest_path, f"tiles of {this}, the other corpora's are {fmt}: one tile format per run"
      )
    fmt = this
    root = posixpath.dirname(manifest_path)
    for s in m["shards"]:
      if s.get("role", "train") == role and set(channels) <= set(s["channels"]):
        paths.append(posixpath.join(root, s["file"]))
        counts.append(int(s["count"]))
  if not paths:
    raise DataError(
      ", ".join(map(str, patterns)), f"no {role!r} shards with channels {list(channels)}"
    )
  order = np.argsort(paths, kind="stable")
  return [paths[i] for i in order], [counts[i] for i in order], fmt


class CorpusTiles:
  """`batches(start_step, rows=(a, b))` yields {"image": float32 [b - a, crop, crop, C]}; see the
  module doc. The global batch is `streams` sub-batches of global_batch / streams rows, one per
  stream of shards; the rows a process asks for name the streams it reads."""

  def __init__(
    self,
    manifests: Sequence[str],
    global_batch: int,
    *,
    seed: int = 0,
    augment: bool = True,
    normalisation: str = "minmax",
    scale_m: float = 30.0,
    low_percentile: float = 2.0,
    role: str = "train",
    shuffle_buffer: int = 4096,
    crop: int | None = None,
    streams: int = 8,
  ):
    self.modes = parse_mode(normalisation)
    if "zscore" in self.modes:
      raise ValueError(
        "zscore needs global statistics a corpus does not keep: use minmax, relative or ndsm"
      )
    self.normalisation, self.scale_m, self.low_percentile = (
      normalisation,
      float(scale_m),
      float(low_percentile),
    )
    # the channels the modes read ("ndsm" alone does not need the elevation: not parsed then)
    self.channel_names = [
      c
      for c, used in (("elevation", set(self.modes) - {"ndsm"}), ("ndsm", "ndsm" in self.modes))
      if used
    ]
    self.paths, self.counts, fmt = corpus_shards(manifests, role, self.channel_names)
    self.tile_size, self.dtype = int(fmt["tile_size"]), fmt["dtype"]
    self.crop = int(crop or self.tile_size)
    if self.crop > self.tile_size:
      raise ValueError(f"crop {self.crop} is larger than the corpus tiles ({self.tile_size} px)")
    self.global_batch, self.seed, self.augment = int(global_batch), int(seed), bool(augment)
    self.shuffle_buffer, self.streams = int(shuffle_buffer), int(streams)
    if self.streams < 1 or self.global_batch % self.streams:
      raise ValueError(
        f"the global batch {self.global_batch} must be a multiple of streams ({self.streams})"
      )
    self.stream_rows = self.global_batch // self.streams
    # stream k reads shards k, k + K, ...; with fewer shards than streams, every K-th record of all
    self.by_file = len(self.paths) >= self.streams
    total = sum(self.counts)
    self.stream_paths = [
      self.paths[k :: self.streams] if self.by_file else self.paths for k in range(self.streams)
    ]
    self.stream_tiles = [
      sum(self.counts[k :: self.streams])
      if self.by_file
      else total // self.streams + (k < total % self.streams)
      for k in range(self.streams)
    ]
    if min(self.stream_tiles) == 0:
      raise DataError(
        ", ".join(map(str, manifests)), f"{total} tiles cannot feed {self.streams} streams"
      )

  # ---------------------------------------------------------------- the record streams
  def _epoch(self, k: int, epoch: tf.Tensor) -> tf.data.Dataset:
    paths = self.stream_paths[k]
    seed = tf.stack([tf.constant(self.seed * self.streams + k, tf.int64), epoch])
    files = tf.constant(paths)
    if len(paths) > 1:
      files = tf.random.experimental.stateless_shuffle(files, seed=seed)
    # sequential interleave: the parallel one cost ~30 % more CPU per tile (its threads), and
    # the map after it is parallel anyway
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
      tf.data.TFRecordDataset, cycle_length=min(len(paths), INTERLEAVE)
    )
    if not self.by_file:
      ds = ds.shard(self.streams, k)
    return ds.shuffle(self.shuffle_buffer, seed=(self.seed * self.streams + k) * 1_000_003 + epoch)

  def records(self, k: int = 0, start_record: int = 0) -> tf.data.Dataset:
    """Stream k's endless records from record `start_record` on."""
    first_epoch, skip = divmod(int(start_record), self.stream_tiles[k])
    ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(
      lambda e: self._epoch(k, e)
    )
    return ds.skip(skip)  # unparsed records of the first epoch only

  # ---------------------------------------------------------------- batches
  def tf_dataset(self, start_step: int = 0, rows: tuple[int, int] | None = None) -> tf.data.Dataset:
    a, b = rows or (0, self.global_batch)
    r = self.stream_rows
    if a % r or b % r or not 0 <= a < b <= self.global_batch:
      raise ValueError(
        f"rows {a}:{b} do not fall on the {self.streams} streams of {r} rows of the global "
        f"batch {self.global_batch}: choose data.streams so that every process holds whole streams"
      )
    mine = range(a // r, b // r)
    spec = parse_spec(self.channel_names, has_label=False)
    spec.pop("valid")  # pretraining sees every stored pixel; validity is not needed
    size, crop, dtype = self.tile_size, self.crop, self.dtype

    def one_stream(planes, seed):
      if self.augment:  # GROUPS symmetry groups per global batch in all, as with one stream
        planes = random_symmetries(planes, seed, groups=max(1, GROUPS // self.streams))
      if crop < size:
        y, x = tf.unstack(tf.random.stateless_uniform([2], seed + 1, 0, size - crop + 1, tf.int64))
        planes = [
          tf.ensure_shape(p[:, y : y + crop, x : x + crop], [None, crop, crop]) for p in planes
        ]
      return planes

    def process(step, records):
      f = tf.io.parse_example(records, spec)
      planes = [decode_raw_channel(f[c], dtype, size) for c in self.channel_names]
      # each stream's rows are augmented and cropped by (seed, step, stream): the same rows of
      # the global batch whichever process reads them
      parts = [
        one_stream(
          [p[j * r : (j + 1) * r] for p in planes],
          tf.stack([tf.constant(self.seed, tf.int64), step * self.streams + k]),
        )
        for j, k in enumerate(mine)
      ]
      planes = [tf.concat([part[i] for part in parts], 0) for i in range(len(planes))]
      # minmax and relative do not change when a constant is added to a tile: the per-tile
      # offset of float16 storage is added only where the metres themselves count (ndsm / scale)
      metres = {
        c: to_metres(p, f[f"{c}_offset"]) if c == "ndsm" else tf.cast(p, tf.float32)
        for c, p in zip(self.channel_names, planes)
      }
      first = metres[self.channel_names[0]]
      has_value = tf.ones(tf.shape(first), tf.bool)  # stored filled: every pixel has one
      image = normalise(
        metres.get("elevation", first),
        has_value,
        self.normalisation,
        ndsm=metres.get("ndsm"),
        scale_m=self.scale_m,
        low_percentile=self.low_percentile,
        channels=mode_channels(self.normalisation),
        filled=True,
      )
      return {"image": image}

    # r records of each of this process's streams in turn, batched: one batch op, not one per stream
    streams = [self.records(k, int(start_step) * r) for k in mine]
    turns = (
      tf.data.Dataset.range(len(streams))
      .flat_map(lambda j: tf.data.Dataset.from_tensors(j).repeat(r))
      .repeat()
    )
    ds = tf.data.Dataset.choose_from_datasets(streams, turns).batch(b - a, drop_remainder=True)
    ds = tf.data.Dataset.zip((tf.data.Dataset.range(int(start_step), np.iinfo(np.int64).max), ds))
    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

  def batches(
    self, start_step: int = 0, rows: tuple[int, int] | None = None
  ) -> Iterator[dict[str, np.ndarray]]:
    return self.tf_dataset(start_step, rows).as_numpy_iterator()

  def batch(self, step: int, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    return next(iter(self.batches(step, rows)))


def pretrain_sources(config, workdir):
  """The pretraining data of `config.data.corpus_tiles` (a comma-separated list of corpus folders /
  manifests / globs; "auto" = the shared data built into WORKDIR/corpus_tiles on first use, by
  process 0): (training source, held-out evaluation batch or None). The factory scripts/pretrain.py
  calls when the option is set."""
  from pathlib import Path

  d, n = config.data, config.data.normalisation
  spec = str(d.corpus_tiles)
  if spec == "auto":
    import jax
    from jax.experimental import multihost_utils

    from data_pipelines import corpus_beam as cb

    out = Path(workdir) / "corpus_tiles"
    if jax.process_index() == 0 and not (out / cb.MANIFEST).exists():
      size = int(config.model.img_size)
      opts = cb.BuildOptions(
        out_dir=str(out),
        cell_size=d.corpus_cell_size,
        tile_size=size,
        stride=size // 2,
        held_out=cb.held_out_from_corpus(str(out), d.corpus_cell_size),
      )
      cb.build_corpus_beam(cb.shared_inputs(d.corpus_cell_size), opts)
    multihost_utils.sync_global_devices("corpus_tiles")
    manifests = [str(out)]
  else:
    manifests = [s.strip() for s in spec.split(",") if s.strip()]
  norm = dict(normalisation=n.mode, scale_m=n.scale_m, low_percentile=n.low_percentile)
  source = CorpusTiles(
    manifests,
    config.global_batch,
    seed=d.seed,
    augment=d.augment,
    crop=config.model.img_size,
    shuffle_buffer=d.shuffle_buffer,
    streams=d.streams,
    **norm,
  )
  eval_batch = None
  if config.eval_every_steps:
    try:
      held_out = CorpusTiles(
        manifests,
        d.eval_samples,
        seed=d.seed + 1,
        augment=False,
        role="eval",
        crop=config.model.img_size,
        streams=1,
        **norm,
      )
    except DataError:  # a corpus without evaluation tiles: no held-out loss
      held_out = None
    eval_batch = held_out.batch(0) if held_out is not None else None
  return source, eval_batch
