#!/usr/bin/env python
"""Train the recommended building and road models on every labelled area of ../shared/data (1 m,
nDSM input, UNet; demmae_jax/study.py) into OUT/buildings and OUT/roads, then score each on the
areas' test blocks. Resumable. Predict with them:

  python scripts/train_model.py --out models
  python scripts/predict.py --workdir models/buildings --input area.laz --crs EPSG:28992 \\
      --output buildings.tif --window 256 --tta
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
  p.add_argument("--out", default="models", help="output folder (default: models)")
  p.add_argument("--tasks", default="buildings,roads", help="comma list of buildings, roads")
  p.add_argument("--steps", type=int, default=None, help="training steps per model")
  p.add_argument(
    "--arm",
    default=None,
    help="train this arm of demmae_jax/study.py's ARMS instead of the recommended ones "
    "(study.MODEL_ARMS: per task)",
  )
  p.add_argument(
    "--encoder",
    default=None,
    help="exported DEM-pretrained encoder for the arms that start from one (default: "
    "study.DEM_ENCODER)",
  )
  a = p.parse_args(argv)
  from demmae_jax import study

  arm = a.arm
  if arm is not None and arm not in study.ARMS:
    print(f"error: unknown arm {arm!r}: one of {', '.join(study.ARMS)}", file=sys.stderr)
    return 2
  if a.encoder:
    if not Path(a.encoder).is_dir():
      print(f"error: --encoder {a.encoder}: no such folder", file=sys.stderr)
      return 2
    study.DEM_ENCODER = a.encoder

  for task in a.tasks.split(","):
    if task not in study.LOAO_AREAS:
      print(f"error: unknown task {task!r}: buildings or roads", file=sys.stderr)
      return 2
    workdir = study.train_recommended(
      Path(a.out), task, arm=arm, steps=a.steps or study.MODEL_STEPS
    )
    print(f"{task}: model in {workdir} (scripts/predict.py --workdir {workdir})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
