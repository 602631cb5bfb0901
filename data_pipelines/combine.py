"""Several prepared tile sets as one, for training on several areas (leave-one-area-out: train on
three areas, test on the fourth) with the one-manifest reader.

The combined manifest lists the members' own shards (paths relative to it; gs:// paths kept
absolute), so nothing is copied except the few-label subsets, which are record copies as in
`write_tiles`. Tile ids become unique by offsetting each member's ids by the candidates of the
members before it. Class counts are summed; elevation statistics are recomputed from the
combined training tiles (as stored), so z-score normalisation sees the union.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from data_pipelines.atomic import atomic_dir
from data_pipelines.errors import DataError
from data_pipelines.reader import read_manifest, split_files
from data_pipelines.tile_records import decode_tile_numpy
from data_pipelines.tile_stats import ValueStats, class_summary
from data_pipelines.tile_writer import FORMAT, MANIFEST, _ShardWriter
from data_pipelines.tiles import SPLITS, few_label_subsets

MUST_AGREE = ("tile_size", "dtype", "channels", "has_label", "ignore_value", "label_names")


def _place(m: dict) -> str:
  preset = m.get("preset") or {}
  return preset.get("place") or preset.get("name") or m["_path"]


def _check_compatible(members: list[dict]) -> None:
  first = members[0]
  for m in members[1:]:
    for key in MUST_AGREE:
      if m.get(key) != first.get(key):
        raise DataError(
          m["_path"],
          f"{key} {m.get(key)!r} differs from {first.get(key)!r} of {first['_path']}: "
          "prepare all areas with the same tile size, task, channels and dtype",
        )
    if not math.isclose(m["cell_size"], first["cell_size"], rel_tol=1e-6):
      raise DataError(
        m["_path"],
        f"cell size {m['cell_size']:g} differs from {first['cell_size']:g} of "
        f"{first['_path']}: prepare all areas at one cell size (cell_size=...)",
      )


def combine_tile_sets(
  train_sets: Sequence[str | Path],
  out_dir: str | Path,
  *,
  test_sets: Sequence[str | Path] | None = None,
  seed: int = 0,
  overwrite: bool = False,
  tiles_per_shard: int = 1024,
) -> Path:
  """One manifest (returned) over the manifests `train_sets`: train = their train splits, val =
  their val splits, test = their test splits, or, with `test_sets`, every tile of those
  (train, val and test splits alike: the areas a model never trains on). A test set at a place
  of a training set (Amsterdam AHN2 vs AHN3) is refused, as are members of other tile size,
  cell size, channels, dtype or labels. Few-label subsets (train_10, ...) are drawn from the
  combined training tiles with `seed`.
  """
  if not train_sets:
    raise ValueError("no tile set to combine")
  out_dir = Path(out_dir)
  members = []
  for role, paths in (("train", train_sets), ("test", test_sets or [])):
    for p in paths:
      m = read_manifest(str(p))
      m["_path"], m["_role"] = str(p), role
      members.append(m)
  _check_compatible(members)
  train_places = {_place(m) for m in members if m["_role"] == "train"}
  for m in members:
    if m["_role"] == "test" and _place(m) in train_places:
      raise DataError(
        m["_path"],
        f"place {_place(m)!r} is also among the training sets: a held-out area must be unseen",
      )
  seen = [m["_path"] if "://" in m["_path"] else str(Path(m["_path"]).resolve()) for m in members]
  if len(set(seen)) < len(seen):
    raise ValueError(f"a tile set is given twice: {[m['_path'] for m in members]}")
  takes = {
    "train": {"train": ("train",), "test": ()},
    "val": {"train": ("val",), "test": ()},
    "test": {"train": () if test_sets else ("test",), "test": SPLITS},
  }
  offsets = np.cumsum([0] + [int(m["candidates"]) for m in members[:-1]]).tolist()
  here = out_dir.resolve()

  def rel(path: str) -> str:
    return path if "://" in path else os.path.relpath(Path(path).resolve(), here)

  splits = {}
  for split in SPLITS:
    files, ids, counts, n = [], [], {}, 0
    for m, off in zip(members, offsets):
      for member_split in takes[split][m["_role"]]:
        entry = m["splits"][member_split]
        files += [rel(f) for f in split_files(m, member_split)]
        ids += [off + int(t) for t in entry["tile_ids"]]
        n += int(entry["count"])
        for k, v in entry.get("classes", {}).get("pixel_counts", {}).items():
          counts[int(k)] = counts.get(int(k), 0) + int(v)
    splits[split] = {"files": files, "count": n, "tile_ids": ids}
    if members[0]["has_label"]:
      splits[split]["classes"] = class_summary(counts, members[0]["ignore_value"])
  if not splits["train"]["count"]:
    raise DataError(train_sets[0], "the training sets hold no training tile")

  channels, size, dtype = members[0]["channels"], int(members[0]["tile_size"]), members[0]["dtype"]
  subsets = few_label_subsets(splits["train"]["tile_ids"], seed)
  wanted = {name: set(ids) for name, ids in subsets.items()}
  stats = {c: ValueStats(seed) for c in channels}
  relief = ValueStats(seed)
  with atomic_dir(out_dir, overwrite) as tmp:
    writers = {name: _ShardWriter(tmp, name, tiles_per_shard) for name in subsets}
    for m, off in zip(members, offsets):
      if m["_role"] != "train":
        continue
      for record in tf.data.TFRecordDataset(split_files(m, "train")).as_numpy_iterator():
        tile = decode_tile_numpy(record, channels, dtype, size)
        ok = tile["valid"] > 0
        for c in channels:  # as write_tiles: valid pixels of training tiles
          stats[c].add(tile[c][ok])
        relief.add([np.ptp(tile["elevation"][ok])])
        for name, ids in wanted.items():
          if off + int(tile["tile_id"]) in ids:
            writers[name].write(record)
    for w in writers.values():
      w.close()
    manifest = {
      "format": FORMAT,
      **{k: members[0][k] for k in MUST_AGREE},
      "cell_size": float(members[0]["cell_size"]),
      "stride": members[0].get("stride") if len({m.get("stride") for m in members}) == 1 else None,
      "crs_wkt": None,  # members differ; every record carries its own
      "members": [
        {
          "manifest": rel(m["_path"]),
          "role": m["_role"],
          "place": _place(m),
          "name": (m.get("preset") or {}).get("name"),
          "tile_id_offset": off,
          "counts": {s: m["splits"][s]["count"] for s in SPLITS},
        }
        for m, off in zip(members, offsets)
      ],
      "split": {"combined": True, "seed": seed},
      "splits": splits,
      "subsets": {
        name: {"files": writers[name].files, "count": writers[name].count, "tile_ids": ids}
        for name, ids in subsets.items()
      },
      "skipped": {
        k: sum(int(m["skipped"].get(k, 0)) for m in members) for k in members[0]["skipped"]
      },
      "candidates": int(sum(int(m["candidates"]) for m in members)),
      "stats": {
        "elevation": stats["elevation"].summary(),
        "local_relief": relief.summary(),
        **{c: stats[c].summary() for c in channels if c != "elevation"},
      },
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
  return out_dir / MANIFEST
