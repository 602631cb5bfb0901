#!/usr/bin/env python
"""Prepare every labelled area at one cell size and print docs/data.md's tables: tiles per split,
independent (pairwise disjoint) tiles, positive shares, and the leave-one-area-out sets.

  scripts/area_report.py --work-dir /tmp/areas --cell-size 1 [--json areas.json]

Existing tile sets under --work-dir are reused (delete the folder to rebuild).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SPLITS = ("train", "val", "test")
LOAO = {
  "buildings": ("delft", "alexandria", "amsterdam_ahn2", "gothenburg"),
  "roads": ("delft", "gothenburg"),
}


def _windows(manifest: Path, split: str) -> list[tuple]:
  import tensorflow as tf

  from data_pipelines.reader import read_manifest, split_files

  m = read_manifest(str(manifest))
  return [
    tuple(tf.train.Example.FromString(r).features.feature["window"].int64_list.value)
    for r in tf.data.TFRecordDataset(split_files(m, split)).as_numpy_iterator()
  ]


def _prepared(name, task, root, cell, tile, stride, holdout=False) -> Path:
  from data_pipelines.areas import prepare_area

  out = root / f"{name}_{task}_{cell:g}m{'_holdout' if holdout else ''}"
  manifest = out / "tiles" / "manifest.json"
  if not manifest.exists():
    prepare_area(name, out, task, cell, tile, stride, holdout=holdout, progress=False)
  return manifest


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--work-dir", required=True, help="where the tile sets are written (reused if present)"
  )
  p.add_argument("--cell-size", type=float, default=1.0)
  p.add_argument("--tile-size", type=int, default=64)
  p.add_argument("--stride", type=int, default=32)
  p.add_argument("--json", help="also write the numbers here")
  a = p.parse_args(argv)
  from data_pipelines.areas import AREAS, leave_one_area_out
  from demmae_jax.experiments.draws import disjoint_count

  root = Path(a.work_dir)
  kw = dict(root=root, cell=a.cell_size, tile=a.tile_size, stride=a.stride)
  rows, loao = [], []
  print(
    "| area | task | train / val / test tiles | independent train / val / test | positive share "
    "train / val / test | holdout tiles (independent) | skipped: low valid / low labelled / straddling |"
  )
  print("|---|---|---|---|---|---|---|")
  for name, area in AREAS.items():
    for task in area.tasks:
      manifest = _prepared(name, task, **kw)
      m = json.loads(manifest.read_text())
      held = _prepared(name, task, holdout=True, **kw)
      row = {
        "area": name,
        "task": task,
        "block_px": m["split"]["block_px"],
        "tiles": {s: m["splits"][s]["count"] for s in SPLITS},
        "independent": {s: disjoint_count(_windows(manifest, s)) for s in SPLITS},
        "positive": {s: m["splits"][s]["classes"]["frequencies"].get("1") for s in SPLITS},
        "holdout": json.loads(held.read_text())["splits"]["test"]["count"],
        "holdout_independent": disjoint_count(_windows(held, "test")),
        "skipped": m["skipped"],
      }
      rows.append(row)
      share = " / ".join("-" if v is None else f"{v:.2f}" for v in row["positive"].values())
      print(
        f"| {name} | {task} | {' / '.join(map(str, row['tiles'].values()))} | "
        f"{' / '.join(map(str, row['independent'].values()))} | {share} | {row['holdout']} "
        f"({row['holdout_independent']}) | {' / '.join(map(str, m['skipped'].values()))} |"
      )
  print(
    "\n| task | held out | trained on | train / val tiles | test tiles (all of the held-out area) |"
  )
  print("|---|---|---|---|---|")
  for task, names in LOAO.items():
    for held in names:
      sets = {n: _prepared(n, task, holdout=(n == held), **kw) for n in names}
      out = root / f"loao_{task}_{held}_{a.cell_size:g}m"
      path = (
        out / "manifest.json"
        if (out / "manifest.json").exists()
        else leave_one_area_out(held, sets, out)
      )
      m = json.loads(path.read_text())
      train = [x["name"] for x in m["members"] if x["role"] == "train"]
      loao.append(
        {
          "task": task,
          "held_out": held,
          "train_areas": train,
          "tiles": {s: m["splits"][s]["count"] for s in SPLITS},
        }
      )
      print(
        f"| {task} | {held} | {', '.join(train)} | {m['splits']['train']['count']} / "
        f"{m['splits']['val']['count']} | {m['splits']['test']['count']} |"
      )
  if a.json:
    from data_pipelines.atomic import atomic_file

    with atomic_file(a.json, overwrite=True) as tmp:
      tmp.write_text(
        json.dumps(
          {
            "cell_size": a.cell_size,
            "tile_size": a.tile_size,
            "stride": a.stride,
            "areas": rows,
            "loao": loao,
          },
          indent=1,
        )
      )
  return 0


if __name__ == "__main__":
  sys.exit(main())
