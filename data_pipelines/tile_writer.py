"""Rasters (DEM, optional validity, labels and extra channels on the same grid) into TFRecord
shards of tiles with a manifest; the whole output folder appears atomically."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import rasterio
import rasterio.windows
import tensorflow as tf
from tqdm import tqdm

from data_pipelines.atomic import atomic_dir, refuse_existing
from data_pipelines.errors import DataError
from data_pipelines.labels import IGNORE
from data_pipelines.raster_io import (
  cell_size_m as metric_cell_size,
  check_elevation_range,
  check_georeferenced,
  elevation_band,
  open_raster,
  read_band,
  single_band,
)
from data_pipelines.tile_records import FLOAT_DTYPES, encode_tile
from data_pipelines.tile_stats import ValueStats, class_summary
from data_pipelines.tiles import (
  SPLITS,
  TileWindow,
  assign_blocks,
  few_label_subsets,
  tile_split,
  tile_windows,
)

FORMAT = "demmae-tiles/1"
MANIFEST = "manifest.json"
DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def _open_same_grid(path, ref, stack, role: str) -> rasterio.DatasetReader:
  src = stack.enter_context(open_raster(path))
  single_band(src, role)
  if src.crs != ref.crs:
    raise DataError(path, f"CRS mismatch: {src.crs} vs {ref.crs} of {ref.name}")
  if (src.width, src.height) != (ref.width, ref.height) or not src.transform.almost_equals(
    ref.transform
  ):
    raise DataError(
      path,
      f"grid differs from {ref.name}: {src.width}x{src.height} {tuple(src.transform)[:6]} "
      f"vs {ref.width}x{ref.height} {tuple(ref.transform)[:6]}",
    )
  return src


def _read_valid(
  src: rasterio.DatasetReader, window, band: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """Values as float32 and validity (not nodata, finite)."""
  masked = read_band(src, window, masked=True, band=band)
  values = masked.astype(np.float32).filled(np.nan)  # int16 SRTM too
  return values, ~np.ma.getmaskarray(masked) & np.isfinite(values)


class _ShardWriter:
  def __init__(self, folder: Path, prefix: str, per_shard: int):
    self.folder, self.prefix, self.per_shard = folder, prefix, per_shard
    self.files: list[str] = []
    self.count, self.writer = 0, None

  def write(self, record: bytes) -> None:
    if self.count % self.per_shard == 0:
      self.close()
      self.files.append(f"{self.prefix}-{len(self.files):05d}.tfrecord")
      self.writer = tf.io.TFRecordWriter(str(self.folder / self.files[-1]))
    self.writer.write(record)
    self.count += 1

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self.writer = None


def write_tiles(
  elevation: str | Path,
  out_dir: str | Path,
  *,
  label: str | Path | None = None,
  valid: str | Path | None = None,
  extras: Mapping[str, str | Path] | None = None,
  tile_size: int = 224,
  stride: int | None = None,
  min_valid: float = 0.9,
  min_labelled: float = 0.25,
  block_px: int | None = None,
  fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
  seed: int = 0,
  dtype: str = "float32",
  tiles_per_shard: int = 1024,
  label_names: Mapping[int, str] | None = None,
  overwrite: bool = False,
  progress: bool = True,
  extra_manifest: dict | None = None,
  block_split: np.ndarray | None = None,
  band: int | None = None,
  cell_size_m: float | None = None,
) -> Path:
  """Tile the rasters into `out_dir` (train/val/test shards, few-label subsets, manifest.json).

  A tile is kept if >= `min_valid` of its pixels are valid and (with labels) >= `min_labelled`
  are labelled (not IGNORE); skips are counted in the manifest. Returns the manifest path.
  `block_split` (index into SPLITS per block of `block_px`, from the raster's top-left corner)
  replaces the seeded draw, so that several tile sets on one grid share one split.
  The elevation is `band` of a multi-band raster (required then: data_pipelines.raster_io's one
  band rule); label, validity and extra rasters have one band. The manifest's `cell_size` is in
  metres: converted from the CRS's unit, or `cell_size_m` for a geographic or local CRS.
  """
  if dtype not in FLOAT_DTYPES:
    raise ValueError(f"dtype must be one of {list(FLOAT_DTYPES)}, got {dtype!r}")
  stride = stride or tile_size
  block_px = block_px or 2 * tile_size
  if block_px < tile_size:
    raise ValueError(f"block_px ({block_px}) must be at least the tile size ({tile_size})")
  extras = dict(extras or {})
  given_split = block_split is not None
  out_dir = Path(out_dir)
  refuse_existing(out_dir, overwrite)  # before any work
  with contextlib.ExitStack() as stack:
    dem = stack.enter_context(open_raster(elevation))
    band = elevation_band(dem, band)
    check_georeferenced(dem)
    cell_m = metric_cell_size(dem, given_m=cell_size_m)
    if dem.height < tile_size or dem.width < tile_size:
      raise DataError(
        elevation,
        f"raster of {dem.height} x {dem.width} px is smaller than one {tile_size} px tile",
      )
    lab = _open_same_grid(label, dem, stack, "label") if label else None
    val = _open_same_grid(valid, dem, stack, "validity") if valid else None
    ext = {k: _open_same_grid(p, dem, stack, f"{k!r} channel") for k, p in extras.items()}

    def read_tile(w: TileWindow):
      win = rasterio.windows.Window(w.col, w.row, w.size, w.size)
      elev, ok = _read_valid(dem, win, band)
      check_elevation_range(elev, ok, elevation, f" in the window at column {w.col}, row {w.row}")
      if val is not None:
        ok &= read_band(val, win) > 0
      chans = {"elevation": elev}
      for k, src in ext.items():
        chans[k], k_ok = _read_valid(src, win)
        ok &= k_ok
      lbl = read_band(lab, win) if lab is not None else None
      return win, chans, ok, lbl

    nb_r, nb_c = -(-dem.height // block_px), -(-dem.width // block_px)
    if block_split is not None:
      block_split = np.asarray(block_split, np.int8)
      if block_split.shape != (nb_r, nb_c) or not np.isin(block_split, range(len(SPLITS))).all():
        raise ValueError(
          f"block_split must be {nb_r} x {nb_c} values in 0..{len(SPLITS) - 1} "
          f"({block_px} px blocks over {elevation}), got shape {block_split.shape}"
        )
    else:
      # pass 1: weight of each block = useful pixels (labelled if labels exist, else valid)
      weights = np.zeros((nb_r, nb_c), np.int64)
      for br in range(nb_r):
        for bc in range(nb_c):
          win = rasterio.windows.Window(
            bc * block_px,
            br * block_px,
            min(block_px, dem.width - bc * block_px),
            min(block_px, dem.height - br * block_px),
          )
          _, ok = _read_valid(dem, win, band)
          if lab is not None:
            ok &= read_band(lab, win) != IGNORE
          weights[br, bc] = ok.sum()
      if weights.sum() == 0:
        raise DataError(label or elevation, "no valid labelled pixel in the whole raster")
      block_split = assign_blocks(weights, dict(fractions), seed)

    # pass 2: read, filter, encode, write
    windows = tile_windows(dem.height, dem.width, tile_size, stride)
    tmp = stack.enter_context(atomic_dir(out_dir, overwrite))
    writers = {s: _ShardWriter(tmp, s, tiles_per_shard) for s in SPLITS}
    skipped = {"low_valid": 0, "low_labelled": 0, "straddles_splits": 0}
    elev_stats = ValueStats(seed)
    extra_stats = {k: ValueStats(seed) for k in ext}
    relief = ValueStats(seed)
    class_counts = {s: {} for s in SPLITS}
    tile_ids = {s: [] for s in SPLITS}
    crs_wkt = dem.crs.to_wkt()
    source = Path(elevation).name
    for tile_id, w in enumerate(tqdm(windows, desc="tiles", disable=not progress)):
      split_i = tile_split(w, block_split, block_px)
      if split_i is None:
        skipped["straddles_splits"] += 1
        continue
      win, chans, ok, lbl = read_tile(w)
      if ok.mean() < min_valid or not ok.any():
        skipped["low_valid"] += 1
        continue
      if lbl is not None and (lbl != IGNORE).mean() < min_labelled:
        skipped["low_labelled"] += 1
        continue
      # Pixels without a value take the tile's lowest valid value (no NaN, stats unbent). Cells
      # with an interpolated value (a scan gap the rasteriser filled: finite but not valid) keep
      # it: the network sees the roof, not a pit to street level, as the predictor does on a DSM
      # GeoTIFF; `valid` still keeps them out of the loss and the metrics.
      for k in chans:
        chans[k] = np.where(np.isfinite(chans[k]), chans[k], chans[k][ok].min())
      split = SPLITS[split_i]
      meta = dict(
        transform=tuple(rasterio.windows.transform(win, dem.transform))[:6],
        window=(w.col, w.row, w.size, w.size),
        tile_id=tile_id,
        cell_size=cell_m,
        crs_wkt=crs_wkt,
        source=source,
      )
      writers[split].write(encode_tile(chans, ok, lbl, dtype, meta))
      tile_ids[split].append(tile_id)
      if split == "train":  # normalisation statistics from training tiles only
        elev_stats.add(chans["elevation"][ok])
        for k in ext:
          extra_stats[k].add(chans[k][ok])
        relief.add([np.ptp(chans["elevation"][ok])])
      if lbl is not None:
        for v, c in zip(*np.unique(lbl, return_counts=True)):
          class_counts[split][int(v)] = class_counts[split].get(int(v), 0) + int(c)
    for wr in writers.values():
      wr.close()
    if not tile_ids["train"] and (fractions["train"] > 0 or not any(tile_ids.values())):
      # (a set drawn wholly for evaluation, train fraction 0, needs no training tile)
      raise DataError(
        elevation,
        f"no training tile survived the filters ({skipped}); lower "
        "min_valid/min_labelled, the tile size or the block size",
      )

    # few-label subsets: copies of their records, so a reader takes them like any split
    subsets = few_label_subsets(tile_ids["train"], seed)
    subset_files = {}
    if subsets:
      wanted = {name: set(ids) for name, ids in subsets.items()}
      sub_writers = {name: _ShardWriter(tmp, name, tiles_per_shard) for name in subsets}
      for record in tf.data.TFRecordDataset(
        [str(tmp / f) for f in writers["train"].files]
      ).as_numpy_iterator():
        tid = tf.train.Example.FromString(record).features.feature["tile_id"].int64_list.value[0]
        for name, ids in wanted.items():
          if tid in ids:
            sub_writers[name].write(record)
      for name, wr in sub_writers.items():
        wr.close()
        subset_files[name] = {"files": wr.files, "count": wr.count, "tile_ids": subsets[name]}

    manifest = {
      "format": FORMAT,
      "tile_size": tile_size,
      "stride": stride,
      "cell_size": cell_m,
      "dtype": dtype,
      "channels": ["elevation", *ext],
      "has_label": lab is not None,
      "ignore_value": IGNORE,
      "label_names": {str(k): v for k, v in (label_names or {}).items()},
      "crs_wkt": crs_wkt,
      # relative to the tile folder, so they stay right when a whole prepared folder moves
      "sources": {
        k: os.path.relpath(Path(p).resolve(), out_dir.resolve()) if p else None
        for k, p in {"elevation": elevation, "label": label, "valid": valid, **extras}.items()
      },
      "filters": {"min_valid": min_valid, "min_labelled": min_labelled},
      "split": {
        "block_px": block_px,
        "fractions": dict(fractions),
        "seed": seed,
        "block_splits": block_split.tolist(),
        "given": given_split,
      },
      "splits": {
        s: {
          "files": writers[s].files,
          "count": writers[s].count,
          "tile_ids": tile_ids[s],
          **({"classes": class_summary(class_counts[s], IGNORE)} if lab is not None else {}),
        }
        for s in SPLITS
      },
      "subsets": subset_files,
      "skipped": skipped,
      "candidates": len(windows),
      "stats": {
        "elevation": elev_stats.summary(),
        "local_relief": relief.summary(),
        **{k: s.summary() for k, s in extra_stats.items()},
      },
      **(extra_manifest or {}),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
  return out_dir / MANIFEST
