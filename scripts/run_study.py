#!/usr/bin/env python
"""The product's model study (demmae_jax/study.py): the recommended segmentation model against
today's UNet and a height rule, per test tile and over the test area, on Delft at 10 labelled
tiles and leave-one-area-out. Resumable: rerun the same command to continue; finished runs are
skipped.

  python scripts/run_study.py --out runs/study --groups delft,loao --seeds 3
  python scripts/run_study.py --out runs/study --report_only
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--out", required=True, help="study folder (data, workdirs, results)")
  p.add_argument(
    "--groups",
    default="delft,loao",
    help="comma list of delft, loao, rule (the height rule beside both)",
  )
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--tasks", default="buildings,roads")
  p.add_argument(
    "--arms",
    default=None,
    help="comma list (default: every arm for delft, the recommended one for loao)",
  )
  p.add_argument(
    "--held_out",
    default=None,
    help="comma list: leave out only these areas in the loao group (default every one)",
  )
  p.add_argument(
    "--encoder",
    default=None,
    help="DEM-pretrained encoder of arm hybrid_dem "
    "(default runs/dem_mae_hr: scripts/pretrain.py --config configs/dem_pretrain.py:cpu_hr, "
    "then scripts/export_encoder.py)",
  )
  p.add_argument(
    "--rescore",
    action="store_true",
    help="recompute area scores of finished runs "
    "from their kept maps, and on areas whose labels outline roofs also as roof "
    "outlines; building maps of runs from before the predictor's height gate with the gate "
    "(no training)",
  )
  p.add_argument(
    "--doc",
    default=None,
    help="also write the tables into this Markdown file, "
    "between its BEGIN/END GENERATED markers (e.g. docs/results_product.md)",
  )
  p.add_argument(
    "--errors_by_class",
    default=None,
    metavar="RUNS",
    help="comma list of finished run ids held out on a LiDAR area: their test-area errors by "
    "the class of each cell's highest return (no training)",
  )
  p.add_argument(
    "--thinned_holdout",
    default=None,
    metavar="AREA=DENSITY",
    help="score the finished leave-one-area-out building runs of AREA (models and rule, no "
    "training) again on AREA rasterised from its points thinned to DENSITY points/m2, e.g. "
    "delft=3.4 (Amsterdam's density): how much of a score is the survey's density",
  )
  p.add_argument("--report_only", action="store_true", help="print the tables of the results there")
  p.add_argument(
    "--figure",
    default=None,
    metavar="PNG",
    help="draw finished runs' kept test-area maps over the DSM and against their labels into "
    "this PNG (no training); the runs are --figure_runs",
  )
  p.add_argument(
    "--figure_runs",
    default=None,
    help="comma list of run ids for --figure, as under OUT/results (e.g. "
    "delft/buildings/upernet_frozen_ndsm/n10_s1)",
  )
  a = p.parse_args(argv)
  from demmae_jax import study

  out = Path(a.out)
  tasks = tuple(a.tasks.split(","))
  arms = tuple(a.arms.split(",")) if a.arms else None
  unknown = [x for x in arms or () if x not in study.ARMS]
  if unknown:
    print(f"error: unknown arm(s) {unknown}; known: {sorted(study.ARMS)}", file=sys.stderr)
    return 2
  if a.encoder:
    study.DEM_ENCODER = a.encoder
  if a.figure:
    try:
      print(study.figure(out, Path(a.figure), a.figure_runs.split(",") if a.figure_runs else []))
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    return 0
  if a.errors_by_class:
    try:
      print(study.errors_by_lidar_class(out, a.errors_by_class.split(",")))
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    return 0
  if a.thinned_holdout:
    area, _, density = a.thinned_holdout.partition("=")
    try:
      recs = study.thinned_holdout(out, area, float(density))
    except ValueError as e:
      print(f"error: --thinned_holdout {a.thinned_holdout}: {e}", file=sys.stderr)
      return 2
    print(study.thinned_table(recs))
    return 0
  if not (a.report_only or a.rescore):  # rescoring never trains
    for group in a.groups.split(","):
      if group == "delft":
        study.delft_runs(out, seeds=a.seeds, tasks=tasks, arms=arms or ("unet_minmax", "unet_ndsm"))
      elif group == "rule":
        study.rule_runs(out, seeds=a.seeds, tasks=tasks)
      elif group == "loao":
        study.loao_runs(
          out,
          seeds=a.seeds,
          tasks=tasks,
          arms=arms or (study.RECOMMENDED,),
          held_out_areas=a.held_out.split(",") if a.held_out else None,
        )
      else:
        print(f"error: unknown group {group!r}: delft, loao or rule", file=sys.stderr)
        return 2
  if a.rescore:
    study.rescore(out)
    study.outline_scores(out)
    study.gate_scores(out)
  text = study.report(out)
  print(text)
  if a.doc:
    study.write_into(Path(a.doc), text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
