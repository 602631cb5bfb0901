"""Export a pretraining run's MAE as a checkpoint that `api.from_pretrained` (and so
`scripts/finetune.py`) loads: orbax `state/` + `config.json`, written atomically.

  python scripts/export_encoder.py --workdir runs/pretrain_tiny --out runs/dem_mae_tiny

The whole autoencoder is written (the decoder is small; finetuning reads the encoder only).
The run's config comes from the workdir (config.json), so no --config is needed.
"""

from __future__ import annotations

import os
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
  from demmae_jax.train import pretrain

  workdir = Path(_WORKDIR.value)
  dst, step = pretrain.export(workdir, _OUT.value, step=_STEP.value, overwrite=_OVERWRITE.value)
  print(
    f"export_encoder: step {step} of {workdir} -> {dst} "
    f"(load with demmae_jax.api.from_pretrained('{dst}'))"
  )
  return 0


if __name__ == "__main__":
  from demmae_jax.train import cli

  cli.run(main)
