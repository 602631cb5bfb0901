"""Masked-autoencoder pretraining on real elevation, sharded over all devices, resumable.

  python scripts/pretrain.py --config configs/dem_pretrain.py:tiny --workdir runs/pretrain_tiny
  python scripts/pretrain.py --config configs/dem_pretrain.py:base --workdir gs://... \
      --config.mesh.fsdp=8 --config.global_batch=1024

Running it again with the same --workdir resumes from the latest checkpoint; a workdir made
with another config is refused. SIGTERM saves a checkpoint and exits with status 0.
Outputs in the workdir: config.json, checkpoints/, metrics.jsonl, tensorboard/, pictures/.
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
  "Config file and preset, e.g. configs/dem_pretrain.py:tiny; override keys with "
  "--config.key=value (unknown keys are an error).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Run directory: checkpoints, metrics, pictures. An existing one of the same config is resumed.",
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
  from demmae_jax.train import loop, pretrain

  workdir = Path(_WORKDIR.value)
  pretrain.check_data(config, reads=not _DRY_RUN.value)
  d = config.distributed
  sharding.maybe_initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
  mesh = sharding.make_mesh(**config.mesh)
  try:
    if _DRY_RUN.value:
      return pretrain.dry_run(config, workdir, mesh)
    result = pretrain.run(config, workdir, mesh=mesh)
  except (loop.NonFiniteLoss, workdirs.WorkdirConfigMismatch, loop.DoesNotFit) as e:
    print(f"pretrain: error: {e}", file=sys.stderr)
    return 2
  last = next((h for h in reversed(result.history) if "loss" in h), {})
  print(
    f"pretrain: {'stopped by signal at' if result.preempted else 'finished'} step "
    f"{result.step}; loss {last.get('loss', float('nan')):.4f}; outputs in {workdir}: "
    f"checkpoints/, metrics.jsonl, tensorboard/, pictures/. Export the encoder with "
    f"scripts/export_encoder.py --workdir {workdir} --out DIR"
  )
  return 0


if __name__ == "__main__":
  from demmae_jax.train import cli

  cli.run(main)
