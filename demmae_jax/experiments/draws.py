"""The tile sets of the labelled sets and, per run, a manifest whose training split is a seeded
draw of tiles from the training area (nested across sizes), beside fixed validation tiles and
the whole test area."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from data_pipelines.atomic import atomic_file, atomic_write_text
from demmae_jax.experiments.plan import Run


def _tiles(manifest: dict, split: str):
  """(tile_id, window, label, raw record) of a split's tiles in file order, decoded by the tile
  format's own reader."""
  import tensorflow as tf

  from data_pipelines.reader import split_files
  from data_pipelines.tile_records import decode_tile_numpy

  form = (manifest["channels"], manifest["dtype"], int(manifest["tile_size"]))
  for rec in tf.data.TFRecordDataset(split_files(manifest, split)).as_numpy_iterator():
    tile = decode_tile_numpy(rec, *form)
    yield int(tile["tile_id"]), tuple(int(v) for v in tile["window"]), tile.get("label"), rec


def _write_records(path: Path, records: list[bytes]) -> None:
  import tensorflow as tf

  with atomic_file(path, overwrite=True) as tmp, tf.io.TFRecordWriter(str(tmp)) as w:
    for r in records:
      w.write(r)


class Data:
  """Tile sets and per-run manifests under `root`, made on first use and reused afterwards."""

  def __init__(self, cfg, root: Path, progress=print):
    self.cfg, self.root, self.log = cfg, Path(root), progress
    self._base: dict[str, dict] = {}

  def base(self, dataset: str) -> dict:
    """The prepared tile set of a labelled set (read_manifest dict)."""
    if dataset in self._base:
      return self._base[dataset]
    from data_pipelines.prepare import prepare_alexandria, prepare_delft
    from data_pipelines.reader import read_manifest

    c = self.cfg
    out = self.root / dataset / "prepared"
    path = out / "tiles" / "manifest.json"
    if not path.exists():
      t = time.time()
      kw = dict(
        tile_size=int(c.tile_size), stride=int(c.stride), block_px=int(c.block_px), progress=False
      )
      if dataset == "alexandria_buildings":
        prepare_alexandria(out, **kw)
      elif dataset == "delft_buildings_lidar":
        prepare_delft(out, "buildings", label_source="lidar", **kw)
      else:
        prepare_delft(out, dataset.removeprefix("delft_"), **kw)
      self.log(f"data: prepared {dataset} in {time.time() - t:.0f} s -> {path}")
    self._base[dataset] = read_manifest(str(path))
    return self._base[dataset]

  def pool(self, dataset: str) -> tuple[dict, list[tuple[int, tuple, bytes]], dict]:
    """(manifest whose val/test define the evaluation, training pool records, its class summary).
    Table 2's pool: LiDAR-labelled tiles lying wholly in blocks that the BGT set uses for
    training (any of the LiDAR set's own splits), evaluated on the BGT val/test tiles."""
    if dataset != "delft_buildings_lidar":
      m = self.base(dataset)
      pool = [(tid, window, rec) for tid, window, _, rec in _tiles(m, "train")]
      return m, pool, m["splits"]["train"]["classes"]
    from data_pipelines.tile_stats import class_summary

    bgt, noisy = self.base("delft_buildings"), self.base(dataset)
    bp, blocks = bgt["split"]["block_px"], np.asarray(bgt["split"]["block_splits"])
    pool, counts = [], np.zeros(256, np.int64)
    for split in ("train", "val", "test"):
      for tid, (col, row, w, h), label, rec in _tiles(noisy, split):
        under = blocks[row // bp : (row + h - 1) // bp + 1, col // bp : (col + w - 1) // bp + 1]
        if (under == 0).all():  # 0 = train in data_pipelines.tiles.SPLITS
          pool.append((tid, (col, row, w, h), rec))
          counts += np.bincount(label.ravel(), minlength=256)
    counts = {k: int(c) for k, c in enumerate(counts) if c}
    return bgt, pool, class_summary(counts, int(noisy["ignore_value"]))

  def manifest(self, run: Run) -> tuple[Path, dict]:
    """The run's manifest path (train = its draw, val = the fixed draw, test = the test area)
    and facts about the draw."""
    key = f"n{run.size}_s{run.seed}"
    folder = self.root / run.dataset / key
    path = folder / "manifest.json"
    info_path = folder / "draw.json"
    if path.exists():
      return path, json.loads(info_path.read_text())
    evalm, pool, classes = self.pool(run.dataset)
    n = len(pool) if run.size == "all" else int(run.size)
    if n > len(pool):
      raise PoolTooSmall(
        f"{run.dataset}: {n} training tiles asked, the training area holds "
        f"{len(pool)} (tile {self.cfg.tile_size} px, stride {self.cfg.stride})"
      )
    # nested draws for one seed: the 10 tiles of seed s are the first 10 of its 50
    order = draw_order(
      [w for _, w, _ in pool], np.random.default_rng(1000 + run.seed), str(self.cfg.draw)
    )[:n]
    chosen = [pool[i] for i in sorted(order)]
    folder.mkdir(parents=True, exist_ok=True)
    _write_records(folder / "train.tfrecord", [r for *_, r in chosen])
    val_file = self.val_file(run.dataset, evalm)
    m = {k: v for k, v in evalm.items() if k != "_dir"}
    rel = lambda p: os.path.relpath(p, folder)  # noqa: E731
    m["splits"] = {
      "train": {
        "files": ["train.tfrecord"],
        "count": n,
        "tile_ids": [t for t, *_ in chosen],
        "classes": classes,
      },  # the pool's class weights: a 10-tile draw may lack a class
      "val": {"files": [rel(val_file)], "count": int(self.cfg.val_tiles)},
      "test": {
        **evalm["splits"]["test"],
        "files": [rel(os.path.join(evalm["_dir"], f)) for f in evalm["splits"]["test"]["files"]],
      },
    }
    m["subsets"] = {}
    info = {
      "pool_tiles": len(pool),
      "drawn": n,
      "tile_ids": [t for t, *_ in chosen],
      "val_tiles": int(self.cfg.val_tiles),
      "val_pool": evalm["splits"]["val"]["count"],
      "test_tiles": evalm["splits"]["test"]["count"],
      "disjoint_train_tiles": disjoint_count([w for _, w, _ in pool]),
      "disjoint_drawn": disjoint_count([w for _, w, _ in chosen]),
    }
    atomic_write_text(info_path, json.dumps(info, indent=1), overwrite=True)
    # last: its presence marks a complete folder
    atomic_write_text(path, json.dumps(m, indent=1), overwrite=True)
    return path, info

  def val_file(self, dataset: str, evalm: dict) -> Path:
    """One fixed seeded draw of validation tiles shared by every run of a labelled set."""
    name = "delft_buildings" if dataset == "delft_buildings_lidar" else dataset
    path = self.root / name / f"val_{self.cfg.val_tiles}.tfrecord"
    if not path.exists():
      recs = list(_tiles(evalm, "val"))
      k = min(int(self.cfg.val_tiles), len(recs))
      pick = sorted(np.random.default_rng(0).permutation(len(recs))[:k])
      _write_records(path, [recs[i][-1] for i in pick])
    return path


class PoolTooSmall(ValueError):
  pass


def _disjoint(a, b) -> bool:
  (c, r, w, h), (c2, r2, w2, h2) = a, b
  return c >= c2 + w2 or c2 >= c + w or r >= r2 + h2 or r2 >= r + h


def _greedy_disjoint(windows, order) -> list[int]:
  """Indices (in `order`) of tiles each disjoint from every one taken before it."""
  taken: list[int] = []
  for i in order:
    if all(_disjoint(windows[i], windows[j]) for j in taken):
      taken.append(i)
  return taken


def disjoint_count(windows) -> int:
  """Greedy count of pairwise non-overlapping tiles among `windows` (col, row, w, h): how many
  independent tiles a draw really holds."""
  windows = list(windows)
  return len(
    _greedy_disjoint(windows, sorted(range(len(windows)), key=lambda i: windows[i][1::-1]))
  )


def draw_order(windows, rng: np.random.Generator, how: str = "disjoint_first") -> list[int]:
  """The order in which a seed draws training tiles; a draw of N takes the first N, so draws of
  one seed are nested. `uniform`: a random permutation (overlapping crops as likely as new
  terrain). `disjoint_first`: the same permutation, but the tiles that greedily pack without
  overlap come first, so small draws hold as many independent views as the area allows."""
  perm = [int(i) for i in rng.permutation(len(windows))]
  if how == "uniform":
    return perm
  if how != "disjoint_first":
    raise ValueError(f"unknown draw {how!r}: disjoint_first or uniform")
  first = _greedy_disjoint(list(windows), perm)
  chosen = set(first)
  return first + [i for i in perm if i not in chosen]
