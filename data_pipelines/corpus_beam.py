"""The corpus builder: LAZ / COPC LAZ / GeoTIFF / COG / HGT files (local or gs://) into sharded
TFRecord tiles of raw heights plus a manifest, as an Apache Beam pipeline (DirectRunner here,
Dataflow / Flink / Spark unchanged).

    build_corpus_beam([CorpusInput("data/**/*.laz", crs="EPSG:28992")], BuildOptions(out_dir="corpus"),
                      ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])

One input file is one unit of work (a "source"); each worker, for each source:
1. finds its CRS (the file's header, or the input's `crs`; one without either is quarantined);
2. LiDAR: rasterises DSM / DTM / nDSM / validity at `cell_size` with data_pipelines.lidar (output
   windows of `window_px` cells plus a halo: the memory is bounded by the window, not the file);
   rasters: reads the one elevation band window by window (data_pipelines.raster_io's rules);
3. cuts `tile_size` tiles with `stride`, dropping tiles with more than `max_nodata` cells
   without a value, with less than `min_relief` metres of relief, or touching a validation/test
   block of an evaluation split (`held_out`: rectangles with their CRS, reprojected to the
   source's; data_pipelines.pretrain_corpus.HELD_OUT by default);
4. writes the tiles in the tile record format (data_pipelines.tile_records: channel "elevation" =
   DSM or the raster's heights, "ndsm" and "dtm" for LiDAR; raw metres, normalisation is the
   reader's choice) with per-tile bounds, CRS, cell size and statistics, into
   OUT/sources/ID/tiles-NNNNN.tfrecord + source.json. The folder appears atomically (locally; on
   gs:// source.json is copied last and marks it complete).
A failing source (corrupt, no CRS, unreadable) is quarantined with its reason and the build goes
on. The manifest (OUT/corpus_manifest.json) lists every source, shard, count and quarantined
file, sorted: the same inputs give byte-identical shards and manifest with any number of
workers. A rerun skips sources whose folder is complete and retries quarantined ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import posixpath
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

FORMAT = "demmae-corpus/1"
MANIFEST = "corpus_manifest.json"
OPTIONS = "build_options.json"
SOURCE_JSON = "source.json"
LIDAR_SUFFIXES = (".las", ".laz")
RASTER_SUFFIXES = (".tif", ".tiff", ".hgt", ".vrt", ".img")
LIDAR_CHANNELS = {"dsm": "elevation", "ndsm": "ndsm", "dtm": "dtm"}  # product -> record channel
# per-tile statistics stored in each record's "stats" (raw metres of the elevation channel)
TILE_STATS = ("min", "max", "mean", "std", "measured_share")
MAX_SOURCE_CELLS = 4e8  # 10 x 10 km at 0.5 m: one LAZ tile of any national survey is far smaller


@dataclasses.dataclass(frozen=True)
class CorpusInput:
  """A path or glob (local or gs://), with options for the files it matches: `crs` for files
  whose header has none (must agree with one that has), `cell_size` (LiDAR, metres) instead of
  the build's."""

  pattern: str
  crs: str | None = None
  cell_size: float | None = None
  role: str = "train"  # "eval": held-out pretraining evaluation, never trained on


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  out_dir: str
  cell_size: float = 1.0  # LiDAR cell in metres (rasters keep their own grid)
  tile_size: int = 224
  stride: int | None = None  # default: the tile size
  max_nodata: float = 0.1  # share of a tile's cells without a value (after the DSM fill)
  min_relief: float = 1.0  # metres, max - min of the elevation channel
  dtype: str = "float16"  # tile_records storage (float16: offset per tile, relief exact to 1.6 cm)
  tiles_per_shard: int = 256
  window_px: int = 2048  # LiDAR output window side: the memory bound
  lidar_products: tuple[str, ...] = ("dsm", "ndsm")  # and/or "dtm"
  held_out: tuple[dict, ...] = ()  # {"key", "crs", "rects": [[xmin, ymin, xmax, ymax], ...]}

  def record(self) -> dict:
    """What a rerun into the same folder must agree on."""
    return dataclasses.asdict(self) | {"out_dir": None, "format": FORMAT}


@dataclasses.dataclass(frozen=True)
class SourceFile:
  id: str
  path: str
  kind: str  # "lidar" | "raster"
  crs: str | None
  cell_size: float | None
  role: str = "train"


# ------------------------------------------------------------------ paths (local or gs://)
def _remote(path: str) -> bool:
  return "://" in str(path)


def _join(*parts: str) -> str:
  return posixpath.join(*parts) if _remote(parts[0]) else os.path.join(*parts)


def _gfile():
  import tensorflow as tf

  return tf.io.gfile


def _exists(path: str) -> bool:
  return _gfile().exists(path) if _remote(path) else os.path.exists(path)


def _read_json(path: str) -> dict:
  with _gfile().GFile(path, "r") as f:
    return json.load(f)


def _write_json(path: str, value, overwrite: bool = True) -> None:
  """Atomically: a local temporary renamed (data_pipelines.atomic), or on gs:// a temporary
  object copied to the final name (readers never see a partial one)."""
  text = json.dumps(value, indent=1, sort_keys=True) + "\n"
  if _remote(path):
    tmp = f"{path}.tmp-{os.getpid()}"
    with _gfile().GFile(tmp, "w") as f:
      f.write(text)
    _gfile().rename(tmp, path, overwrite=True)
    return
  from data_pipelines.atomic import atomic_file

  with atomic_file(path, overwrite=overwrite) as tmp:
    Path(tmp).write_text(text)


def source_id(path: str) -> str:
  """A folder name for a source: its file name (sanitised) and a hash of the whole path."""
  stem = re.sub(r"[^A-Za-z0-9_.-]", "_", posixpath.basename(str(path)))
  return f"{stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def expand_inputs(inputs: Sequence[CorpusInput]) -> list[SourceFile]:
  """Every file the patterns match, sorted by id; a pattern matching nothing, or a file of an
  unknown type, is an error before any work (DataError naming it)."""
  from data_pipelines.errors import DataError

  found: dict[str, SourceFile] = {}
  for inp in inputs:
    if _remote(inp.pattern):
      paths = _gfile().glob(inp.pattern)
    else:
      import glob

      paths = [
        os.path.abspath(p) for p in glob.glob(inp.pattern, recursive=True) if os.path.isfile(p)
      ]
    if not paths:
      raise DataError(inp.pattern, "matches no file")
    for path in sorted(paths):
      suffix = posixpath.splitext(path)[1].lower()
      kind = (
        "lidar" if suffix in LIDAR_SUFFIXES else "raster" if suffix in RASTER_SUFFIXES else None
      )
      if kind is None:
        raise DataError(
          path,
          f"unknown input type {suffix!r}: LAS/LAZ/COPC ({', '.join(LIDAR_SUFFIXES)}) "
          f"or rasters ({', '.join(RASTER_SUFFIXES)})",
        )
      sid = source_id(path)
      found[sid] = SourceFile(sid, path, kind, inp.crs, inp.cell_size, inp.role)
  return [found[k] for k in sorted(found)]


# ------------------------------------------------------------------ one source
def _local_copy(path: str, scratch: Path) -> str:
  """LAZ on gs:// is copied to local scratch (laspy wants a seekable local file)."""
  if not _remote(path):
    return path
  local = scratch / posixpath.basename(path)
  _gfile().copy(path, str(local), overwrite=True)
  return str(local)


def _rasterio_path(path: str) -> str:
  return "/vsigs/" + path[len("gs://") :] if path.startswith("gs://") else path


def _held_out_rects(held_out: Sequence[dict], crs) -> list[list[float]]:
  """The held-out rectangles in the source's CRS (bounding boxes of the reprojected ones)."""
  import rasterio.crs
  import rasterio.warp

  rects = []
  for split in held_out:
    split_crs = rasterio.crs.CRS.from_user_input(split["crs"])
    for r in split["rects"]:
      rects.append(
        list(r)
        if split_crs == crs
        else list(rasterio.warp.transform_bounds(split_crs, crs, *r, densify_pts=21))
      )
  return rects


def _lidar_rasters(src: SourceFile, opts: BuildOptions, scratch: Path) -> tuple[dict, float]:
  """{channel: GeoTIFF} of one LAZ at its cell size, and that cell size."""
  from data_pipelines.errors import DataError
  from data_pipelines.lidar import inspect_las, las_to_rasters

  cell = float(src.cell_size or opts.cell_size)
  local = _local_copy(src.path, scratch)
  x0, y0, x1, y1 = inspect_las(local, src.crs).bounds
  if (x1 - x0) * (
    y1 - y0
  ) / cell**2 > MAX_SOURCE_CELLS:  # a corrupt header's bounds, or a unit slip
    raise DataError(
      src.path,
      f"header bounds {x1 - x0:.0f} x {y1 - y0:.0f} CRS units hold more than "
      f"{MAX_SOURCE_CELLS:.0e} cells of {cell} (corrupt header, or split the file)",
    )
  out = las_to_rasters(
    [local],
    scratch / "rasters",
    cell_size=cell,
    crs=src.crs,
    window_px=opts.window_px,
    progress=False,
  )
  files = {LIDAR_CHANNELS[p]: str(out[p]) for p in opts.lidar_products}
  return files | {"measured": str(out["valid"])}, cell


class _Channels:
  """Windowed reads of a source's channels; values float32 with NaN where there is none."""

  def __init__(self, files: dict[str, str], src: SourceFile):
    import rasterio
    import rasterio.crs

    from data_pipelines.errors import DataError
    from data_pipelines.raster_io import check_elevation_range, elevation_band, open_raster

    self._check_range = check_elevation_range
    self.srcs = {k: open_raster(v) for k, v in files.items()}
    first = self.srcs["elevation"]
    self.band = elevation_band(first, None, flag=None) if src.kind == "raster" else 1
    self.transform, self.height, self.width = first.transform, first.height, first.width
    self.crs = first.crs
    if src.crs:
      given = rasterio.crs.CRS.from_user_input(src.crs)
      if self.crs is not None and self.crs != given:
        raise DataError(
          src.path, f"header CRS {self.crs.to_string()} differs from the given {src.crs}"
        )
      self.crs = given
    if self.crs is None:
      raise DataError(
        src.path, "has no CRS in its header; give one for this input (--source PATTERN EPSG:XXXX)"
      )
    if first.transform.is_identity:
      raise DataError(src.path, "has no geotransform, so its cells have no place or size")
    self.path = src.path

  def read(self, window) -> dict[str, np.ndarray]:
    from data_pipelines.raster_io import read_band

    out = {}
    for name, s in self.srcs.items():
      if name == "measured":
        out[name] = read_band(s, window) > 0
        continue
      masked = read_band(s, window, masked=True, band=self.band if name == "elevation" else 1)
      values = masked.astype(np.float32).filled(np.nan)
      if self.path.lower().endswith(".hgt"):
        values[values <= -32768] = np.nan  # SRTM void
      self._check_range(
        values,
        np.isfinite(values),
        self.path,
        f" in the window at column {window.col_off}, row {window.row_off}",
      )
      out[name] = values
    return out

  def close(self) -> None:
    for s in self.srcs.values():
      s.close()


def _cut_tiles(
  src: SourceFile, files: dict[str, str], cell: float | None, opts: BuildOptions, folder: Path
) -> dict:
  """Tile one source's channels into folder/tiles-NNNNN.tfrecord; returns its record."""
  import rasterio.windows
  import tensorflow as tf

  from data_pipelines.pretrain_corpus import rect_mask
  from data_pipelines.raster_io import metres_per_unit
  from data_pipelines.tile_records import encode_tile
  from data_pipelines.tile_stats import ValueStats
  from data_pipelines.tiles import tile_windows

  size = opts.tile_size
  ch = _Channels(files, src)
  try:
    cell = cell or abs(ch.transform.a)
    geographic = ch.crs.is_geographic
    unit_m = None if geographic else metres_per_unit(ch.crs, src.path, flag=None)
    rects = _held_out_rects(opts.held_out, ch.crs)
    crs_wkt = ch.crs.to_wkt()
    names = [n for n in ch.srcs if n != "measured"]
    skipped = {"nodata": 0, "relief": 0, "held_out": 0}
    stats = ValueStats(0)
    shards: list[dict] = []
    writer, count = None, 0
    # a source smaller than one tile gives none (not an error: small LiDAR units exist)
    windows = (
      tile_windows(ch.height, ch.width, size, opts.stride or size)
      if min(ch.height, ch.width) >= size
      else []
    )
    for tile_id, w in enumerate(windows):
      win = rasterio.windows.Window(w.col, w.row, size, size)
      transform = rasterio.windows.transform(win, ch.transform)
      if rects and rect_mask(rects, transform, (size, size)).any():
        skipped["held_out"] += 1
        continue
      values = ch.read(win)
      has_value = np.logical_and.reduce([np.isfinite(values[n]) for n in names])
      if 1.0 - has_value.mean() > opts.max_nodata or not has_value.any():
        skipped["nodata"] += 1
        continue
      elevation = values["elevation"][has_value]
      if float(elevation.max() - elevation.min()) < opts.min_relief:
        skipped["relief"] += 1
        continue
      chans = {n: np.where(has_value, values[n], values[n][has_value].min()) for n in names}
      measured = values.get("measured", has_value) & has_value
      x0, y1 = transform @ (0, 0)
      x1, y0 = transform @ (size, size)
      meta = dict(
        transform=tuple(transform)[:6],
        window=(w.col, w.row, size, size),
        tile_id=tile_id,
        cell_size=cell,
        crs_wkt=crs_wkt,
        source=src.id,
        bounds=(x0, y0, x1, y1),
        stats=(
          elevation.min(),
          elevation.max(),
          elevation.mean(),
          elevation.std(),
          measured.mean(),
        ),
      )
      if count % opts.tiles_per_shard == 0:
        if writer is not None:
          writer.close()
        shards.append({"file": f"tiles-{len(shards):05d}.tfrecord", "count": 0})
        writer = tf.io.TFRecordWriter(str(folder / shards[-1]["file"]))
      writer.write(encode_tile(chans, measured, None, opts.dtype, meta))
      shards[-1]["count"] += 1
      count += 1
      stats.add(elevation)
    if writer is not None:
      writer.close()
    left, bottom, right, top = rasterio.transform.array_bounds(ch.height, ch.width, ch.transform)
    km2 = (
      None if geographic else round(ch.height * ch.width * (cell * (unit_m or 1.0)) ** 2 / 1e6, 6)
    )
    return {
      "id": src.id,
      "path": src.path,
      "kind": src.kind,
      "status": "ok",
      "role": src.role,
      "crs": ch.crs.to_string(),
      "cell_size": cell,
      "cell_unit": "degree" if geographic else "metre",
      "bounds": [left, bottom, right, top],
      "shape": [ch.height, ch.width],
      "km2": km2,
      "channels": names,
      "candidates": len(windows),
      "tiles": count,
      "skipped": skipped,
      "held_out_rects": len(rects),
      "shards": shards,
      "elevation": stats.summary(),
    }
  finally:
    ch.close()


def _build_in(src: SourceFile, opts: BuildOptions, folder: Path, scratch: Path) -> dict:
  if src.kind == "lidar":
    files, cell = _lidar_rasters(src, opts, scratch)
  else:
    files, cell = {"elevation": _rasterio_path(src.path)}, None
  record = _cut_tiles(src, files, cell, opts, folder)
  (folder / SOURCE_JSON).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
  return record


def build_source(src: SourceFile, opts: BuildOptions) -> dict:
  """Build one source's folder (or read it back when complete); a failure returns a quarantine
  record {"status": "quarantined", "reason"} instead of raising."""
  final = _join(opts.out_dir, "sources", src.id)
  done = _join(final, SOURCE_JSON)
  if _exists(done):
    return _read_json(done) | {"resumed": True}
  quarantine = _join(opts.out_dir, "quarantine", f"{src.id}.json")
  try:
    if _remote(opts.out_dir):
      with tempfile.TemporaryDirectory(prefix="corpus_beam.") as tmp:
        folder, scratch = Path(tmp) / "out", Path(tmp) / "scratch"
        folder.mkdir(), scratch.mkdir()
        record = _build_in(src, opts, folder, scratch)
        for name in sorted(os.listdir(folder), key=lambda n: n == SOURCE_JSON):  # source.json last
          _gfile().copy(str(folder / name), _join(final, name), overwrite=True)
    else:
      from data_pipelines.atomic import atomic_dir, scratch_dir

      with scratch_dir(final) as scratch, atomic_dir(final) as folder:
        record = _build_in(src, opts, Path(folder), Path(scratch))
  except Exception as e:  # noqa: BLE001 (any failure of one source is that source's, not the build's)
    reason = str(e) if isinstance(e, ValueError) else f"{e.__class__.__name__}: {e}"
    record = {
      "id": src.id,
      "path": src.path,
      "kind": src.kind,
      "status": "quarantined",
      "reason": " ".join(reason.split())[:1000],
    }
    _write_json(quarantine, record)
    return record
  if _exists(quarantine):  # an earlier run quarantined it; this one built it
    (_gfile().remove if _remote(quarantine) else os.remove)(quarantine)
  return record | {"resumed": False}


RECOUNT_SECONDS = 30.0  # a worker lists the output folder at most this often (O(sources) a listing)


class _Progress:
  """One line per source: the counts so far and the ETA from this run's rate. The counts come
  from the output folder, so every worker process sees all workers' sources; a worker lists it
  at most every RECOUNT_SECONDS (a listing of 100k sources on gs:// is not free) and adds its own
  completions since the last listing in between ("~" then marks the counts as at least that)."""

  def __init__(self, opts: BuildOptions, total: int, start: float, done_before: int):
    self.opts, self.total, self.start, self.done_before = opts, total, start, done_before
    self.counted_at, self.built, self.quarantined = -math.inf, 0, 0
    self.since = {"ok": 0, "quarantined": 0}

  def _count(self, sub: str, pattern: str) -> int:
    folder = _join(self.opts.out_dir, sub)
    return len(_gfile().glob(_join(folder, pattern))) if _exists(folder) else 0

  def line(self, record: dict) -> str:
    fresh = time.time() - self.counted_at >= RECOUNT_SECONDS
    if fresh:
      self.built, self.quarantined = (
        self._count("sources", f"*/{SOURCE_JSON}"),
        self._count("quarantine", "*.json"),
      )
      self.counted_at, self.since = time.time(), {"ok": 0, "quarantined": 0}
    elif not record.get("resumed"):
      self.since[record["status"]] += 1
    built, quarantined = self.built + self.since["ok"], self.quarantined + self.since["quarantined"]
    finished = built + quarantined
    elapsed = time.time() - self.start
    eta = elapsed / max(finished - self.done_before, 1) * max(self.total - finished, 0)
    what = (
      f"quarantined: {record['reason'][:200]}"
      if record["status"] == "quarantined"
      else f"{record['tiles']} tiles" + (" (already built)" if record.get("resumed") else "")
    )
    approx = "" if fresh else "~"
    return (
      f"corpus: [{approx}{finished}/{self.total}] {record['id']}: {what} | {approx}{built} built, "
      f"{approx}{quarantined} quarantined, {elapsed:.0f} s elapsed, ETA {eta:.0f} s"
    )


# ------------------------------------------------------------------ manifest
def manifest_of(records: Iterable[dict], opts: BuildOptions) -> dict:
  """The corpus manifest: sorted, without timings, so that it is the same for any run order."""
  records = sorted((dict(r) for r in records), key=lambda r: r["id"])
  for r in records:
    r.pop("resumed", None)
  ok = [r for r in records if r["status"] == "ok"]
  channels = sorted({tuple(r["channels"]) for r in ok})
  return {
    "format": FORMAT,
    "tile_size": opts.tile_size,
    "dtype": opts.dtype,
    "options": opts.record(),
    "tile_stats": list(TILE_STATS),
    "record_channels": [list(c) for c in channels],
    "shards": [
      {
        "file": f"sources/{r['id']}/{s['file']}",
        "count": s["count"],
        "source": r["id"],
        "channels": r["channels"],
        "cell_size": r["cell_size"],
        "role": r["role"],
      }
      for r in ok
      for s in r["shards"]
    ],
    "sources": [{k: v for k, v in r.items() if k != "shards"} for r in ok],
    "quarantined": [
      {"path": r["path"], "id": r["id"], "reason": r["reason"]}
      for r in records
      if r["status"] != "ok"
    ],
    "totals": {
      "sources": len(ok),
      "quarantined": len(records) - len(ok),
      "tiles": sum(r["tiles"] for r in ok),
      "km2": round(sum(r["km2"] or 0 for r in ok), 6),
      "skipped": {k: sum(r["skipped"][k] for r in ok) for k in ("nodata", "relief", "held_out")},
    },
  }


def _write_manifest(records: list[dict], opts: BuildOptions) -> str:
  path = _join(opts.out_dir, MANIFEST)
  _write_json(path, manifest_of(records, opts))
  return path


# ------------------------------------------------------------------ the pipeline
def _check_options(opts: BuildOptions) -> None:
  """The output folder's options must be this build's (a rerun completes, never mixes)."""
  path = _join(opts.out_dir, OPTIONS)
  if _exists(path):
    before = _read_json(path)
    if before != json.loads(json.dumps(opts.record(), sort_keys=True)):
      changed = sorted(
        k for k in set(before) | set(opts.record()) if before.get(k) != opts.record().get(k)
      )
      raise ValueError(
        f"{opts.out_dir} was built with other options ({', '.join(changed)} differ): "
        f"use another output folder"
      )
  else:
    if not _remote(opts.out_dir):
      os.makedirs(opts.out_dir, exist_ok=True)
    _write_json(path, opts.record(), overwrite=False)


class _BuildFn:
  """The DoFn body (a plain callable: beam.Map pickles it with its options)."""

  def __init__(self, opts: BuildOptions, total: int, start: float, done_before: int):
    self.opts, self.progress = opts, _Progress(opts, total, start, done_before)

  def __call__(self, src: SourceFile) -> dict:
    record = build_source(src, self.opts)
    print(self.progress.line(record), file=sys.stderr, flush=True)
    return record


def build_corpus_beam(
  inputs: Sequence[CorpusInput], opts: BuildOptions, pipeline_args: Sequence[str] = ()
) -> dict:
  """Run the pipeline (Beam options in `pipeline_args`, e.g. --runner, --direct_num_workers);
  returns the manifest."""
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions

  if opts.dtype not in ("float16", "float32"):
    raise ValueError(f"dtype must be float16 or float32, got {opts.dtype!r}")
  bad = set(opts.lidar_products) - set(LIDAR_CHANNELS)
  if bad or "dsm" not in opts.lidar_products:
    raise ValueError(
      f"lidar_products must include dsm, from {tuple(LIDAR_CHANNELS)}; got {opts.lidar_products}"
    )
  sources = expand_inputs(inputs)
  _check_options(opts)
  done_before = sum(_exists(_join(opts.out_dir, "sources", s.id, SOURCE_JSON)) for s in sources)
  print(f"corpus: {len(sources)} sources, {done_before} already built", file=sys.stderr, flush=True)
  fn = _BuildFn(opts, len(sources), time.time(), done_before)
  with beam.Pipeline(options=PipelineOptions(list(pipeline_args))) as p:
    _ = (
      p
      | "sources" >> beam.Create(sources)
      | "spread" >> beam.Reshuffle()
      | "build" >> beam.Map(fn)
      | "collect" >> beam.combiners.ToList()
      | "manifest" >> beam.Map(_write_manifest, opts)
    )
  return _read_json(_join(opts.out_dir, MANIFEST))


# ------------------------------------------------------------------ held-out splits
def held_out_from_corpus(
  out_dir: str, cell_size: float, specs=None, progress: bool = True
) -> tuple[dict, ...]:
  """The val/test rectangles of data_pipelines.pretrain_corpus.HELD_OUT (each prepared once by its
  labelled set, cached in OUT/splits/): what the in-memory corpus masks, here dropped tiles."""
  from data_pipelines.pretrain_corpus import HELD_OUT, held_out_split

  out = []
  for spec in specs or HELD_OUT:
    if progress:
      print(f"corpus: held-out split {spec.key(cell_size)}", file=sys.stderr, flush=True)
    s = held_out_split(spec, Path(out_dir), cell_size)
    out.append({"key": s["key"], "crs": s["crs"], "rects": s["rects"]["val"] + s["rects"]["test"]})
  return tuple(out)


def held_out_from_file(path: str) -> tuple[dict, ...]:
  """[{"key", "crs", "rects": [[xmin, ymin, xmax, ymax], ...]}, ...] from a JSON file."""
  from data_pipelines.errors import DataError

  try:
    value = _read_json(path)
    return tuple(
      {
        "key": str(s.get("key", i)),
        "crs": s["crs"],
        "rects": [list(map(float, r)) for r in s["rects"]],
      }
      for i, s in enumerate(value)
    )
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(
      path, f"not a held-out list [{{'crs': ..., 'rects': [[xmin, ymin, xmax, ymax]]}}] ({e})"
    ) from e


def shared_inputs(
  cell_size: float = 1.0, srtm: bool = False, data_dir: str | None = None
) -> list[CorpusInput]:
  """The shared real data as corpus inputs: the sources of data_pipelines.pretrain_corpus.SOURCES
  (every LAZ file with its CRS and the finest cell its density supports; the DSM of each raster
  pair; the IGN La Rochelle tile as "eval"), plus the SRTM tiles if `srtm`."""
  from data_pipelines.pretrain_corpus import SOURCES
  from data_pipelines.shared_data import shared_data_dir

  root = Path(data_dir) if data_dir else shared_data_dir()
  inputs = []
  for src in SOURCES:
    files = src.files if src.kind == "lidar" else src.files[:1]  # rasters: (DSM, DTM) -> the DSM
    for f in files:
      inputs.append(
        CorpusInput(
          str(root / f),
          src.crs,
          max(cell_size, src.min_cell) if src.kind == "lidar" else None,
          src.role,
        )
      )
  if srtm:
    inputs += [CorpusInput(str(root / "pretrain" / f)) for f in ("N46E008.tif", "N49W123.tif")]
    inputs.append(CorpusInput(str(root / "pretrain" / "N44W072.hgt"), role="eval"))
  return inputs
