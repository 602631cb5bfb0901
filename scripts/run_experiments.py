"""The paper's protocol in one command: Table 1 (training-set sizes x arms x seeds on every real
labelled set), the Table 2 analogue (noisy LiDAR labels) and the normalisation ablation, then
tables and figures in OUT/report.md (and in docs/results.md with --report docs/results.md).

  python scripts/run_experiments.py --config configs/experiments.py:cpu --out runs/experiments/cpu
  python scripts/run_experiments.py --config configs/experiments.py:cpu --out runs/experiments/cpu \
      --config.seeds=1 --config.sizes=10,50 --config.groups=table1 --config.steps=150
  python scripts/run_experiments.py ... --imagenet mae_pretrain_vit_base.pth   # arm (b)
  python scripts/run_experiments.py ... --report_only                         # tables only

Arms: (a) dem_mae: the encoder at --config.encoder (scripts/export_encoder.py output; pretrained
here first if it does not exist), frozen, + UperNet; (b) imagenet_mae: --imagenet PATH (skipped
with a message without it); (c) random_frozen: the same architecture, random and frozen;
(d) unet from scratch. Every run writes OUT/results/<run>.json atomically when it ends; a rerun
skips finished runs and resumes an interrupted one from its checkpoint; one OUT holds one
protocol (another recipe is refused).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "configs/experiments.py:PROTOCOL (cpu, tiny, paper); override keys with --config.key=value.",
  lock_config=True,
)
_OUT = flags.DEFINE_string("out", None, "Folder of this protocol's data, workdirs and results.")
_IMAGENET = flags.DEFINE_string("imagenet", None, "ImageNet MAE weights (.pth) for arm (b).")
_ENCODER = flags.DEFINE_string(
  "encoder", None, "Exported DEM MAE encoder for arm (a) (default: the protocol's config.encoder)."
)
_REPORT = flags.DEFINE_string(
  "report",
  "",
  "Also rewrite the generated part of this Markdown file "
  "(e.g. docs/results.md; its figures go beside it). The report always "
  "goes to OUT/report.md.",
)
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only aggregate the existing results.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the runs and whether they are finished.")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  from demmae_jax.experiments import plan, report, runner

  cfg = _CONFIG.value
  with cfg.unlocked():
    if _IMAGENET.value:
      cfg.imagenet = _IMAGENET.value
    if _ENCODER.value:
      cfg.encoder = _ENCODER.value
  out = Path(_OUT.value)
  if _DRY_RUN.value:
    for r in plan.plan(cfg):
      print(("done " if runner.result_path(out, r).exists() else "todo ") + r.id)
    return 0
  if not _REPORT_ONLY.value:
    try:
      runner.sweep(cfg, out, log=lambda m: print(m, flush=True))
    except (ValueError, FileExistsError) as e:
      print(f"run_experiments: error: {e}", file=sys.stderr)
      return 2
    except KeyboardInterrupt as e:  # SIGTERM/Ctrl-C: the run's checkpoint is saved, rerun resumes
      print(f"run_experiments: interrupted: {e}", file=sys.stderr)
      return 130
  command = "python scripts/run_experiments.py " + " ".join(
    shlex.quote(a) for a in sys.argv[1:] if a != "--report_only"
  )
  docs = [report.report(cfg, out, command)]
  if _REPORT.value:
    docs.append(report.report(cfg, out, command, Path(_REPORT.value)))
  print(
    f"run_experiments: tables and figures in {', '.join(map(str, docs))} (from {out / 'results'})"
  )
  return 0


if __name__ == "__main__":
  from demmae_jax.train import cli

  cli.run(main)
