"""Evaluate a finetuned segmenter on a tile split: IoU of the positive class (the paper's figure),
its boundary IoU (1 m band, demmae_jax.metrics.BoundaryIoU), per-class IoU, precision, recall, F1
and the confusion matrix, as JSON and Markdown, plus pictures (DEM | prediction | label) of the
first tiles.

  python scripts/evaluate.py --workdir runs/buildings --split test --pictures 8

The model is the workdir's best validation checkpoint (--step=latest or a number to choose);
the tiles are the ones it was trained on (--manifest to evaluate on another tile set). Outputs go
to --out (default WORKDIR/eval_SPLIT_stepN/): metrics.json, metrics.md, tiles.png; an existing
output folder is refused unless --overwrite.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Finetuning workdir (scripts/finetune.py).")
_SPLIT = flags.DEFINE_string("split", "test", "Tile split: train, val, test, or a subset.")
_STEP = flags.DEFINE_string("step", "best", "Checkpoint: best (validation IoU), latest, or a step.")
_MANIFEST = flags.DEFINE_string("manifest", None, "Tile set manifest (default: the training one).")
_PICTURES = flags.DEFINE_integer("pictures", 8, "Number of tiles to draw (0: none).")
_OUT = flags.DEFINE_string("out", None, "Output folder (default WORKDIR/eval_SPLIT_stepN).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output folder.")
flags.mark_flags_as_required(["workdir"])


def draw(tiles: dict, class_names: list[str], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap

  n = len(tiles["pred"])
  cmap = ListedColormap(["#f2f2f2", "#e6194b", "#3cb44b", "#4363d8"][: len(class_names)])
  fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.2 * n + 0.3), squeeze=False)
  for i in range(n):
    label = tiles["label"][i].astype(float)
    label[(tiles["label"][i] == 255) | (tiles["valid"][i] == 0)] = np.nan  # ignore: grey
    panels = [
      (tiles["image"][i][..., 0], "terrain", None),
      (tiles["pred"][i], cmap, len(class_names) - 1),
      (label, cmap, len(class_names) - 1),
    ]
    for ax, (img, cm, vmax) in zip(axes[i], panels):
      cm = plt.get_cmap(cm).copy() if isinstance(cm, str) else cm.copy()
      cm.set_bad("0.55")
      ax.imshow(img, cmap=cm, vmin=0 if vmax else None, vmax=vmax, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
  for ax, title in zip(axes[0], ["DEM (normalised)", "prediction", "label (grey: ignored)"]):
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from data_pipelines.atomic import atomic_dir
  from demmae_jax import metrics
  from demmae_jax.inference.evaluate import evaluate_split
  from demmae_jax.inference.restore import load_trained

  workdir = Path(_WORKDIR.value)
  if _OUT.value:  # before any work: --out replaced as a whole must not hold the workdir or tiles
    from data_pipelines.atomic import check_outputs

    check_outputs([_OUT.value], [workdir, _MANIFEST.value])
  step = _STEP.value if _STEP.value in ("best", "latest") else int(_STEP.value)
  try:
    model, spec, step = load_trained(workdir, step)
    manifest = (
      _MANIFEST.value or json.loads((workdir / "config.json").read_text())["data"]["manifest"]
    )
    summary, tiles = evaluate_split(model, spec, manifest, _SPLIT.value, keep=_PICTURES.value)
  except (FileNotFoundError, ValueError) as e:
    print(f"evaluate: error: {e}", file=sys.stderr)
    return 2
  summary.update(workdir=str(workdir), step=step, split=_SPLIT.value, manifest=str(manifest))
  out = Path(_OUT.value or workdir / f"eval_{_SPLIT.value}_step{step}")
  try:
    with atomic_dir(out, _OVERWRITE.value) as tmp:
      (tmp / "metrics.json").write_text(json.dumps(summary, indent=1))
      (tmp / "metrics.md").write_text(
        f"# {workdir.name}: {_SPLIT.value} split, checkpoint step {step}\n\n"
        + metrics.to_markdown(summary)
      )
      if tiles:
        draw(tiles, spec["class_names"], tmp / "tiles.png")
  except FileExistsError as e:
    print(f"evaluate: error: {e}", file=sys.stderr)
    return 2
  print(metrics.to_markdown(summary))
  biou = summary["boundary_iou"]
  print(
    f"evaluate: IoU({summary['positive_class']}) = {summary['iou']:.4f}, boundary IoU = "
    f"{'n/a' if biou is None else f'{biou:.4f}'} on {_SPLIT.value} (step {step}); outputs in "
    f"{out}: metrics.json, metrics.md" + (", tiles.png" if tiles else "")
  )
  return 0


if __name__ == "__main__":
  from demmae_jax.train import cli

  cli.run(main)
