#!/usr/bin/env python
"""The few-label probe of a pretraining run (demmae_jax/probe.py): a linear map from the frozen
encoder's patch tokens to building pixels, fitted on a few labelled tiles per draw and scored on
validation tiles, at each kept checkpoint and at random initialisation. "Does pretraining help"
as a curve over steps; writes JSON (and a plot with --png).

  python scripts/probe.py --workdir runs/pretrain_hr --steps 1000,1500 \\
      --draws runs/study/data/delft/delft_buildings/n10_s{0,1,2}/manifest.json --out runs/probe_hr.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--workdir", required=True, help="pretraining run (scripts/pretrain.py --workdir)")
  p.add_argument(
    "--draws",
    nargs="+",
    required=True,
    help="tile manifests whose train split is one few-label draw",
  )
  p.add_argument(
    "--val",
    default=None,
    help="manifest whose val split scores the probe (default: the first draw's)",
  )
  p.add_argument(
    "--steps", default="latest", help="comma list of kept checkpoint steps, or 'latest'"
  )
  p.add_argument("--probe_steps", type=int, default=300, help="optimiser steps of the linear map")
  p.add_argument(
    "--layer", type=int, default=None, help="encoder block to read (default: the last)"
  )
  p.add_argument("--out", required=True, help="JSON to write (refused if it exists)")
  p.add_argument("--png", default=None, help="also plot IoU against pretraining step here")
  a = p.parse_args(argv)
  out = Path(a.out)
  if out.exists():
    print(f"error: {out}: exists; choose another --out", file=sys.stderr)
    return 2
  for m in a.draws + ([a.val] if a.val else []):
    if not Path(m).is_file():
      print(f"error: {m}: no such manifest", file=sys.stderr)
      return 2
  if not (Path(a.workdir) / "config.json").is_file():
    print(f"error: {a.workdir}: no config.json, not a pretraining workdir", file=sys.stderr)
    return 2
  from data_pipelines.atomic import atomic_file
  from demmae_jax import probe

  steps = [None] if a.steps == "latest" else [int(s) for s in a.steps.split(",")]
  results = probe.probe_run(
    a.workdir, a.draws, a.val, steps=steps, probe_steps=a.probe_steps, layer=a.layer
  )
  with atomic_file(out, overwrite=False) as tmp:
    tmp.write_text(
      json.dumps(
        {
          "workdir": a.workdir,
          "draws": a.draws,
          "val": a.val or a.draws[0],
          "probe_steps": a.probe_steps,
          "layer": a.layer,
          "results": results,
        },
        indent=1,
      )
    )
  if a.png:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["step"] for r in results]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.errorbar(
      xs, [r["iou"] for r in results], yerr=[r["iou_std"] for r in results], marker="o", capsize=3
    )
    ax.set_xlabel("pretraining step (0 = random initialisation)")
    task = json.loads(Path(a.draws[0]).read_text()).get("preset", {}).get("task", "positive class")
    ax.set_ylabel(f"probe IoU, {task}")
    ax.set_title(f"linear probe on {len(a.draws)} draws: {Path(a.workdir).name}", fontsize=9)
    fig.tight_layout()
    with atomic_file(Path(a.png), overwrite=False) as tmp:
      fig.savefig(tmp, format="png", dpi=110)
  for r in results:
    print(f"step {r['step']}: probe IoU {r['iou']:.3f} +- {r['iou_std']:.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
