"""Segmentation finetuning on a prepared tile set, sharded over all devices, resumable.

  python scripts/finetune.py --config configs/finetune.py:buildings --workdir runs/buildings \
      --config.data.manifest=data/delft_buildings/tiles/manifest.json --config.init=runs/mae_export

Running it again with the same --workdir resumes from the latest checkpoint; a workdir made with
another config is refused. Outputs in the workdir: config.json, segmenter.json, checkpoints/ (the
last ones and the best by validation IoU), metrics.jsonl, tensorboard/. Then
scripts/evaluate.py and scripts/predict.py take the workdir.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file and preset, e.g. configs/finetune.py:tiny; override keys with "
  "--config.key=value (unknown keys are an error).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory; an existing one of the same config is resumed."
)
_DRY_RUN = flags.DEFINE_bool(
  "dry_run",
  False,
  "Print the memory plan per device for this config "
  "and mesh (or the one the workdir recorded) and exit; nothing is "
  "trained or written. See docs/memory.md.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = _CONFIG.value
  from demmae_jax import sharding, workdirs
  from demmae_jax.train import finetune, loop

  d = config.distributed
  sharding.maybe_initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
  workdir = Path(_WORKDIR.value)
  try:
    if _DRY_RUN.value:
      return finetune.dry_run(config, workdir)
    result = finetune.run(config, workdir)
  except (loop.NonFiniteLoss, workdirs.WorkdirConfigMismatch, ValueError) as e:
    print(f"finetune: error: {e}", file=sys.stderr)
    return 2
  evals = [h for h in result.history if "eval_iou" in h]
  best = max(evals, key=lambda h: h["eval_iou"]) if evals else None
  print(
    f"finetune: {'stopped by signal at' if result.preempted else 'finished'} step "
    f"{result.step}; "
    + (f"best validation IoU {best['eval_iou']:.4f} at step {best['step']}; " if best else "")
    + f"outputs in {workdir}. Next: scripts/evaluate.py --workdir {workdir} --split test"
  )
  return 0


if __name__ == "__main__":
  from demmae_jax.train import cli

  cli.run(main)
