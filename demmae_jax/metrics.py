"""Segmentation metrics from a confusion matrix: IoU (the paper's figure is the positive class's),
per-class IoU, precision, recall, F1. Pixels labelled `ignore_index` (255) or outside `valid`
never count.

`confusion_matrix` is jittable (used inside eval steps and summed over batches); `summarize` turns
the accumulated NumPy matrix into plain floats for JSON and Markdown.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255


def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int,
                     valid: jax.Array | None = None) -> jax.Array:
  """[K, K] int32 counts, rows = true class, columns = predicted class."""
  keep = (label != IGNORE_INDEX) & (label >= 0) & (label < num_classes)
  if valid is not None:
    keep &= valid > 0
  index = jnp.where(keep, label * num_classes + pred, 0).reshape(-1)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(keep.reshape(-1).astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def _ratio(num, den):
  return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def summarize(cm: np.ndarray, positive: int = 1, class_names: list[str] | None = None) -> dict:
  """Metrics of an accumulated confusion matrix. A class absent from both labels and predictions
  has IoU NaN (reported as null in JSON), not 0 or 1."""
  cm = np.asarray(cm, np.int64)
  k = cm.shape[0]
  tp = np.diag(cm).astype(np.float64)
  fp = cm.sum(axis=0) - tp
  fn = cm.sum(axis=1) - tp
  iou = _ratio(tp, tp + fp + fn)
  precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
  f1 = _ratio(2 * tp, 2 * tp + fp + fn)
  names = class_names or [str(i) for i in range(k)]
  clean = lambda a: [None if np.isnan(v) else float(v) for v in a]
  return {
      "iou": None if np.isnan(iou[positive]) else float(iou[positive]),
      "positive_class": names[positive],
      "miou": float(np.nanmean(iou)) if not np.all(np.isnan(iou)) else None,
      "accuracy": float(tp.sum() / max(cm.sum(), 1)),
      "per_class": {n: {"iou": i, "precision": p, "recall": r, "f1": f}
                    for n, i, p, r, f in zip(names, clean(iou), clean(precision), clean(recall),
                                             clean(f1))},
      "confusion_matrix": cm.tolist(),
      "pixels": int(cm.sum()),
  }


def to_markdown(summary: dict) -> str:
  fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
  lines = [f"IoU ({summary['positive_class']}): **{fmt(summary['iou'])}**, mIoU {fmt(summary['miou'])}, "
           f"pixel accuracy {fmt(summary['accuracy'])} over {summary['pixels']:,} labelled pixels",
           "", "| class | IoU | precision | recall | F1 |", "|---|---|---|---|---|"]
  for name, m in summary["per_class"].items():
    lines.append(f"| {name} | {fmt(m['iou'])} | {fmt(m['precision'])} | {fmt(m['recall'])} | "
                 f"{fmt(m['f1'])} |")
  names = list(summary["per_class"])
  lines += ["", "Confusion matrix (rows: label, columns: prediction)", "",
            "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  for name, row in zip(names, summary["confusion_matrix"]):
    lines.append(f"| {name} | " + " | ".join(f"{v:,}" for v in row) + " |")
  return "\n".join(lines) + "\n"
