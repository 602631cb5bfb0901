#!/usr/bin/env python
"""The non-learned height-rule baseline (demmae_jax/baselines.py): its few parameters are tuned
by grid search on labelled training tiles (highest IoU), then it is evaluated on a test split
exactly as the models are: the same tiles, the same labelled valid pixels, IoU, precision,
recall, F1 and boundary IoU of the positive class.

  # tuned on the whole training split of a tile set
  python scripts/baseline.py --manifest data/delft/buildings/tiles/manifest.json \\
      --tune-split train --eval-split test --out runs/baseline/delft_buildings.json
  # tuned on the 10 tiles the experiment harness gives the models, for seeds 0, 1 and 2
  python scripts/baseline.py --manifest data/delft/roads/tiles/manifest.json --draw 10 \\
      --seeds 0,1,2 --out runs/baseline/delft_roads_10.json --pictures roads_10.png

Buildings: DSM - grey opening (square window) > a height, smooth (not a tree crown). Roads:
DSM - opening <= a height, slope and roughness below thresholds. Then objects below a minimum
area are dropped and holes below a maximum area filled. --height-source ndsm uses the tiles'
nDSM (DSM - LiDAR DTM) instead of the opening: more information than the models, which see the
DSM only.

--mode tile runs the rule on each tile alone, as a model sees it; raster runs it on the whole
raster the tiles were cut from and crops the result at the tiles (a 20-30 m ground window needs
more than a 32 m tile); both (the default) reports both. --tune-split test gives the rule's
ceiling (tuned on the test tiles themselves), never a fair comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--manifest", required=True, help="tile set manifest.json (scripts/prepare_data.py)"
  )
  p.add_argument(
    "--task",
    choices=("buildings", "roads"),
    help="what the rule finds (default: the tile set's task, from its manifest)",
  )
  p.add_argument(
    "--tune-split",
    default="train",
    help="split or few-label subset the parameters are tuned on (train, train_10, ...)",
  )
  p.add_argument(
    "--draw",
    type=int,
    help="tune instead on the N training tiles the experiment "
    "harness draws for each of --seeds (the models' training tiles at N tiles)",
  )
  p.add_argument(
    "--seeds", default="0", help="draw seeds, comma separated (with --draw; default 0)"
  )
  p.add_argument("--eval-split", default="test", help="split evaluated (default test)")
  p.add_argument(
    "--mode",
    choices=("tile", "raster", "both"),
    default="both",
    help="run the rule per tile, on the whole raster, or both (default)",
  )
  p.add_argument(
    "--height-source",
    choices=("opening", "ndsm"),
    default="opening",
    help="height above ground from a grey opening of the DSM (default) or the nDSM channel",
  )
  p.add_argument(
    "--band-m",
    type=float,
    default=None,
    help="boundary IoU band in metres (default demmae_jax.metrics.DEFAULT_BAND_M, 1 m)",
  )
  p.add_argument(
    "--out", required=True, help="result JSON (refused if it exists, unless --overwrite)"
  )
  p.add_argument("--pictures", help="PNG of test tiles: DSM, label, the rule in each mode")
  p.add_argument("--picture-tiles", type=int, default=4, help="tiles in the picture (default 4)")
  p.add_argument("--overwrite", action="store_true")
  return p.parse_args(argv)


def task_of(manifest: dict) -> str:
  task = (manifest.get("preset") or {}).get("task")
  if task is None:
    name = manifest.get("label_names", {}).get("1", "")
    task = {"building": "buildings", "road": "roads"}.get(name)
  if task not in ("buildings", "roads"):
    raise ValueError(
      f"cannot tell the task of {manifest['_dir']} (label 1 = "
      f"{manifest.get('label_names', {}).get('1')!r}); give --task"
    )
  return task


def run(a: argparse.Namespace, log=print) -> tuple[dict, dict, dict]:
  """(the result JSON, the evaluated tiles, the first seed's prediction on them per mode)."""
  import numpy as np

  from data_pipelines.reader import read_manifest
  from demmae_jax import baselines, metrics

  t0 = time.time()
  manifest = read_manifest(a.manifest)
  task = a.task or task_of(manifest)
  cell = float(manifest["cell_size"])
  band_m = metrics.DEFAULT_BAND_M if a.band_m is None else a.band_m
  ndsm = a.height_source == "ndsm"
  tune_split = "train" if a.draw else a.tune_split
  tune_tiles = baselines.load_tiles(a.manifest, tune_split, ndsm)
  test = baselines.load_tiles(a.manifest, a.eval_split, ndsm)
  seeds = [int(s) for s in str(a.seeds).split(",")] if a.draw else [None]
  modes = ("tile", "raster") if a.mode == "both" else (a.mode,)
  raster = baselines.raster_scene(a.manifest, ndsm) if "raster" in modes else None
  rules = baselines.grid(task, a.height_source)
  names = list(manifest.get("label_names", {}).values()) or ["background", task[:-1]]
  oracle = tune_split == a.eval_split
  log(
    f"{task} on {a.manifest}: {len(rules)} rules tuned on {tune_split}"
    + (f" ({a.draw}-tile draws, seeds {seeds})" if a.draw else f" ({len(tune_tiles['dsm'])} tiles)")
    + f", evaluated on {a.eval_split} ({len(test['dsm'])} tiles), boundary band {band_m:g} m"
    + (
      " -- tuned on the evaluated tiles: the rule's CEILING, not a fair comparison"
      if oracle
      else ""
    )
  )

  def scene(tiles, idx=slice(None)):
    return baselines.Scene(
      tiles["dsm"][idx], tiles["valid"][idx], cell, tiles["ndsm"][idx] if ndsm else None
    )

  test_scene = scene(test) if "tile" in modes else None
  results, preds = [], {}
  for mode in modes:
    for seed in seeds:
      idx = (
        baselines.draw(tune_tiles["window"], a.draw, seed)
        if a.draw
        else np.arange(len(tune_tiles["dsm"]))
      )
      label, valid = tune_tiles["label"][idx], tune_tiles["valid"][idx]
      if mode == "tile":
        best, table = baselines.tune(scene(tune_tiles, idx), label, valid, rules)
        pred = baselines.apply(best, test_scene)
      else:
        best, table = baselines.tune(
          raster, label, valid, rules, baselines.crop(tune_tiles["window"][idx])
        )
        pred = baselines.crop(test["window"])(baselines.apply(best, raster))
      summary = baselines.evaluate(pred, test["label"], test["valid"], cell, names, band_m)
      top = sorted(table, key=lambda r: -np.nan_to_num(r["iou"], nan=-1))[:10]
      results.append(
        {
          "mode": mode,
          "seed": seed,
          "tune_tiles": int(len(idx)),
          "tune_tile_ids": tune_tiles["tile_id"][idx].tolist(),
          "rule": dataclasses.asdict(best),
          "tune_iou": top[0]["iou"],
          "top_rules": top,
          "test": summary,
        }
      )
      preds.setdefault(mode, pred)  # the first seed's, for the picture
      log(line(results[-1], names[1]))
  means = {}
  for mode in modes:
    rs = [r for r in results if r["mode"] == mode]
    values = {
      "iou": [r["test"]["iou"] for r in rs],
      "boundary_iou": [r["test"]["boundary_iou"] for r in rs],
      **{k: [r["test"]["per_class"][names[1]][k] for r in rs] for k in ("precision", "recall")},
    }
    means[mode] = {
      k: {
        "mean": float(np.mean(v)),
        "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
        "n": len(v),
      }
      for k, v in values.items()
    }
    if len(rs) > 1:
      log(
        f"  {mode}: mean over {len(rs)} draws: "
        + ", ".join(
          f"{k} {100 * m['mean']:.1f} ± {100 * m['std']:.1f}" for k, m in means[mode].items()
        )
      )
  out = {
    "manifest": str(a.manifest),
    "task": task,
    "height_source": a.height_source,
    "cell_size": cell,
    "band_m": band_m,
    "tune_split": tune_split,
    "draw": a.draw,
    "eval_split": a.eval_split,
    "eval_tiles": int(len(test["dsm"])),
    "oracle": oracle,
    "grid": {k: list(v) for k, v in baselines.GRIDS[task].items()},
    "results": results,
    "mean": means,
    "command": " ".join(sys.argv),
    "seconds": round(time.time() - t0, 1),
  }
  return out, test, preds


def line(r: dict, positive: str) -> str:
  rule, t = r["rule"], r["test"]
  pc = t["per_class"][positive]
  f = lambda v, unit="": "-" if v is None else f"{v:g}{unit}"  # noqa: E731
  return (
    f"  {r['mode']:6s} {'seed ' + str(r['seed']) if r['seed'] is not None else '':7s} "
    f"window {f(rule['window_m'], ' m') if rule['height_source'] == 'opening' else 'nDSM'}, "
    f"height {f(rule['height_m'], ' m')}, roughness {f(rule['max_roughness_m'], ' m')}, "
    f"slope {f(rule['max_slope_deg'], ' deg')}, area >= {f(rule['min_area_m2'], ' m2')}, "
    f"holes < {f(rule['max_hole_m2'], ' m2')} filled | "
    f"tune IoU {r['tune_iou']:.3f} | test IoU {t['iou']:.3f}, boundary IoU "
    f"{'n/a' if t['boundary_iou'] is None else format(t['boundary_iou'], '.3f')}, "
    f"P {pc['precision']:.3f}, R {pc['recall']:.3f}, F1 {pc['f1']:.3f}"
  )


def draw_pictures(test: dict, preds: dict, results: list[dict], path: Path, n: int) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  from matplotlib.colors import ListedColormap

  total = len(test["dsm"])
  pick = np.linspace(0, total - 1, min(n, total)).round().astype(int)  # spread over the area
  cmap = ListedColormap(["#f2f2f2", "#e6194b"]).with_extremes(bad="0.55")
  ious = {r["mode"]: r["test"]["iou"] for r in reversed(results)}  # the first seed's
  cols = 2 + len(preds)
  fig, axes = plt.subplots(
    len(pick), cols, figsize=(2.1 * cols, 2.1 * len(pick) + 0.4), squeeze=False
  )
  for r, (row, i) in enumerate(zip(axes, pick)):
    known = (test["label"][i] != 255) & (test["valid"][i] > 0)
    label = np.where(known, test["label"][i], np.nan)
    panels = [(test["dsm"][i], "terrain", "DSM (m)"), (label, cmap, "label (grey: not counted)")]
    panels += [
      (np.where(known, p[i], np.nan), cmap, f"rule, {m} ({100 * ious[m]:.0f})")
      for m, p in preds.items()
    ]
    for k, (ax, (img, cm, title)) in enumerate(zip(row, panels)):
      ax.imshow(img, cmap=cm, interpolation="nearest", **({} if k == 0 else {"vmin": 0, "vmax": 1}))
      if k >= 2:  # the label's outline over the rule
        ax.contour(test["label"][i] == 1, levels=[0.5], colors="k", linewidths=0.6)
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(title, fontsize=7)
  fig.suptitle(
    "height rule on test tiles (mode: test IoU %); black: the label's outline", fontsize=8
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110, format="png")
  plt.close(fig)


def main(argv=None) -> int:
  a = parse_args(argv)
  from data_pipelines.atomic import atomic_file, refuse_existing
  from data_pipelines.errors import DataError

  try:
    refuse_existing(a.out, a.overwrite)
    if a.pictures:
      refuse_existing(a.pictures, a.overwrite)
    out, test, preds = run(a)
  except (DataError, FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"baseline: error: {e}", file=sys.stderr)
    return 2
  with atomic_file(a.out, a.overwrite) as tmp:
    tmp.write_text(json.dumps(out, indent=1))
  if a.pictures:
    with atomic_file(a.pictures, a.overwrite) as tmp:
      draw_pictures(test, preds, out["results"], tmp, a.picture_tiles)
  print(
    f"baseline: results in {a.out}"
    + (f", pictures in {a.pictures}" if a.pictures else "")
    + f" ({out['seconds']:.0f} s)"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
