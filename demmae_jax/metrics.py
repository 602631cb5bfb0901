"""Segmentation metrics from a confusion matrix: IoU (the paper's figure is the positive class's),
per-class IoU, precision, recall, F1; and boundary IoU (Cheng et al., CVPR 2021) of the positive
class. Pixels labelled `ignore_index` (255) or outside `valid` never count.

`confusion_matrix` is jittable (used inside eval steps and summed over batches); `BoundaryIoU`
accumulates its intersection and union over tiles the same way (NumPy/SciPy, on predictions already
on the host); `summarize` turns the accumulated counts into plain floats for JSON and Markdown.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

IGNORE_INDEX = 255
# Boundary IoU's band: the paper's 2 % of the image diagonal is 1-2 px on our 32-128 m tiles, so the
# band is set in metres instead; 1 m is 2 px at 0.5 m (a wall's or kerb's misplacement by a cell
# or two shows) and the 1 px minimum at 2 m.
DEFAULT_BAND_M = 1.0


def confusion_matrix(
  pred: jax.Array, label: jax.Array, num_classes: int, valid: jax.Array | None = None
) -> jax.Array:
  """[K, K] int32 counts, rows = true class, columns = predicted class."""
  keep = (label != IGNORE_INDEX) & (label >= 0) & (label < num_classes)
  if valid is not None:
    keep &= valid > 0
  index = jnp.where(keep, label * num_classes + pred, 0).reshape(-1)
  counts = (
    jnp.zeros(num_classes * num_classes, jnp.int32)
    .at[index]
    .add(keep.reshape(-1).astype(jnp.int32))
  )
  return counts.reshape(num_classes, num_classes)


def _ratio(num, den):
  return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def summarize(
  cm: np.ndarray,
  positive: int = 1,
  class_names: list[str] | None = None,
  boundary: BoundaryIoU | None = None,
) -> dict:
  """Metrics of an accumulated confusion matrix (and boundary IoU when `boundary` is given). A
  class absent from both labels and predictions has IoU NaN (reported as null in JSON), not 0
  or 1."""
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
    "per_class": {
      n: {"iou": i, "precision": p, "recall": r, "f1": f}
      for n, i, p, r, f in zip(names, clean(iou), clean(precision), clean(recall), clean(f1))
    },
    "confusion_matrix": cm.tolist(),
    "pixels": int(cm.sum()),
    **({"boundary_iou": boundary.value, "boundary": boundary.summary()} if boundary else {}),
  }


def band_px(width_m: float, cell_size: float) -> int:
  """A band of `width_m` metres in pixels of `cell_size` metres; at least one pixel."""
  return max(1, int(round(width_m / cell_size)))


def band_px_from_ratio(shape, ratio: float = 0.02) -> int:
  """The paper's band: `ratio` of the image diagonal (shape [..., H, W]), at least one pixel."""
  h, w = shape[-2:]
  return max(1, int(round(ratio * np.hypot(h, w))))


def inner_band(
  mask: np.ndarray, width: int, unknown: np.ndarray | None = None, edge: str = "unknown"
) -> np.ndarray:
  """Pixels of `mask` ([H, W] or [B, H, W], tiles independent) within chessboard distance `width`
  of a pixel outside it: the mask minus its erosion by a 3 x 3 square `width` times (the reference
  implementation's mask_to_boundary, bowenc0221/boundary-iou-api). `unknown` pixels are taken as
  inside the mask, so they make no boundary. `edge`: "unknown" treats beyond the image edge the
  same way (a tile's edge is no object's edge); "boundary" makes it one, as the reference's zero
  padding does for whole images."""
  if edge not in ("unknown", "boundary"):
    raise ValueError(f"edge must be 'unknown' or 'boundary', got {edge!r}")
  mask = np.asarray(mask, bool)
  solid = mask | np.asarray(unknown, bool) if unknown is not None else mask
  square = np.ones((1,) * (mask.ndim - 2) + (3, 3), bool)  # no erosion across the batch axis
  core = scipy.ndimage.binary_erosion(
    solid, square, iterations=int(width), border_value=int(edge == "unknown")
  )
  return mask & ~core


class BoundaryIoU:
  """Boundary IoU of one class, accumulated over tiles: sum |Gb & Pb| / sum |Gb | Pb|, where Gb and
  Pb are the inner bands (`inner_band`) of the label's and the prediction's masks of `positive`.
  Pixels labelled IGNORE_INDEX or outside `valid` are unknown: they make no boundary in either
  mask and are not counted. `cell_size` (m) only labels the band in metres in the summary."""

  def __init__(
    self, band_px: int, positive: int = 1, edge: str = "unknown", cell_size: float | None = None
  ):
    if band_px < 1:
      raise ValueError(f"band_px must be at least 1, got {band_px}")
    self.band_px, self.positive, self.edge, self.cell_size = int(band_px), positive, edge, cell_size
    self.intersection = self.union = 0

  @classmethod
  def in_metres(cls, cell_size: float, width_m: float = DEFAULT_BAND_M, **kwargs) -> BoundaryIoU:
    """The band `width_m` metres wide (`band_px`) on cells of `cell_size` metres."""
    return cls(band_px(width_m, cell_size), cell_size=float(cell_size), **kwargs)

  def update(self, pred, label, valid=None) -> None:
    """One tile [H, W] or a batch [B, H, W]."""
    pred, label = np.asarray(pred), np.asarray(label)
    known = label != IGNORE_INDEX
    if valid is not None:
      known &= np.asarray(valid) > 0
    gb, pb = (
      inner_band(m == self.positive, self.band_px, ~known, self.edge) & known for m in (label, pred)
    )
    self.intersection += int((gb & pb).sum())
    self.union += int((gb | pb).sum())

  @property
  def value(self) -> float | None:
    """None when neither mask has a boundary pixel (as IoU of an absent class)."""
    return self.intersection / self.union if self.union else None

  def summary(self) -> dict:
    return {
      "iou": self.value,
      "band_px": self.band_px,
      **({"band_m": self.band_px * self.cell_size} if self.cell_size else {}),
      "edge": self.edge,
      "intersection": self.intersection,
      "union": self.union,
    }


def to_markdown(summary: dict) -> str:
  fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
  lines = [
    f"IoU ({summary['positive_class']}): **{fmt(summary['iou'])}**, mIoU {fmt(summary['miou'])}, "
    f"pixel accuracy {fmt(summary['accuracy'])} over {summary['pixels']:,} labelled pixels"
  ]
  if "boundary" in summary:
    b = summary["boundary"]
    lines.append(
      f"boundary IoU ({summary['positive_class']}, band {b['band_px']} px"
      + (f" = {b['band_m']:g} m" if "band_m" in b else "")
      + f"): **{fmt(b['iou'])}**"
    )
  lines += ["", "| class | IoU | precision | recall | F1 |", "|---|---|---|---|---|"]
  for name, m in summary["per_class"].items():
    lines.append(
      f"| {name} | {fmt(m['iou'])} | {fmt(m['precision'])} | {fmt(m['recall'])} | {fmt(m['f1'])} |"
    )
  names = list(summary["per_class"])
  lines += [
    "",
    "Confusion matrix (rows: label, columns: prediction)",
    "",
    "| | " + " | ".join(names) + " |",
    "|---" * (len(names) + 1) + "|",
  ]
  for name, row in zip(names, summary["confusion_matrix"]):
    lines.append(f"| {name} | " + " | ".join(f"{v:,}" for v in row) + " |")
  return "\n".join(lines) + "\n"
