"""Export a pretraining run's MAE as a checkpoint that `mae.from_pretrained` (and so
`scripts/finetune.py`) loads: orbax `state/` + `config.json`, written atomically.

  python scripts/export_encoder.py --workdir runs/pretrain_tiny --out runs/dem_mae_tiny

The whole autoencoder is written (the decoder is small; finetuning reads the encoder only).
The run's config comes from the workdir (config.json), so no --config is needed.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Pretraining run directory (scripts/pretrain.py).")
_OUT = flags.DEFINE_string("out", None, "Directory to write; refused if it exists.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments {argv[1:]}")
  import ml_collections
  from demmae_jax import mae
  from demmae_jax.train import loop, pretrain
  from data_pipelines.atomic import check_outputs
  workdir, out = Path(_WORKDIR.value), Path(_OUT.value)
  check_outputs([out], [workdir])  # --out replaced as a whole must not be or hold the workdir
  if out.exists() and not _OVERWRITE.value:
    print(f"export_encoder: error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
    return 2
  config_file = workdir / "config.json"
  if not config_file.is_file():
    print(f"export_encoder: error: {config_file} not found: not a pretraining workdir",
          file=sys.stderr)
    return 2
  config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
  with config.unlocked():
    config.init = ""  # the checkpoint holds every weight; do not read the original init file
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  model, step = loop.restore(pretrain.MAEPretrain(config), config, workdir, step=_STEP.value)
  dst = mae.save_model(model, out, overwrite=_OVERWRITE.value)
  print(f"export_encoder: step {step} of {workdir} -> {dst} "
        f"(load with demmae_jax.mae.from_pretrained('{dst}'))")
  return 0


if __name__ == "__main__":
  from demmae_jax.train import cli
  cli.run(main)
