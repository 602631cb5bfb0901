"""Calibration of predicted probabilities against labels: reliability table, expected calibration
error (ECE) and a reliability plot.

Top-label calibration (Guo et al. 2017): each pixel's confidence is its highest class probability
and it is correct when that class is the label; pixels are binned by confidence in equal-width
bins, ECE = sum over bins of (pixels in bin / pixels) x |accuracy - mean confidence|. Only
labelled (label != ignore) pixels with finite probabilities count. Read block by block: memory is
flat in the raster size (the bins are accumulated).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from data_pipelines.errors import DataError
from data_pipelines.raster_io import open_raster


@dataclasses.dataclass
class Reliability:
  edges: np.ndarray  # [bins + 1]
  count: np.ndarray  # [bins] pixels
  confidence: np.ndarray  # [bins] sum of confidences
  correct: np.ndarray  # [bins] correct pixels

  @classmethod
  def empty(cls, bins: int, low: float = 0.0) -> Reliability:
    return cls(
      np.linspace(low, 1.0, bins + 1), np.zeros(bins, np.int64), np.zeros(bins), np.zeros(bins)
    )

  def add(self, probs: np.ndarray, labels: np.ndarray, ignore: int = 255) -> None:
    """probs [K, ...] and labels [...] of one block."""
    ok = (labels != ignore) & np.isfinite(probs).all(axis=0)
    if not ok.any():
      return
    p = probs[:, ok]
    conf, pred = p.max(axis=0), p.argmax(axis=0)
    b = np.clip(np.searchsorted(self.edges, conf, side="right") - 1, 0, len(self.count) - 1)
    self.count += np.bincount(b, minlength=len(self.count))
    self.confidence += np.bincount(b, conf, minlength=len(self.count))
    self.correct += np.bincount(b, pred == labels[ok], minlength=len(self.count))

  @property
  def total(self) -> int:
    return int(self.count.sum())

  def accuracy_per_bin(self) -> np.ndarray:
    with np.errstate(invalid="ignore"):
      return self.correct / self.count

  def confidence_per_bin(self) -> np.ndarray:
    with np.errstate(invalid="ignore"):
      return self.confidence / self.count

  def ece(self) -> float:
    if not self.total:
      raise ValueError("no labelled pixel with a probability: the ECE is undefined")
    gap = np.abs(self.correct - self.confidence)  # = count x |accuracy - confidence| per bin
    return float(gap.sum() / self.total)

  def summary(self) -> dict:
    return {
      "ece": self.ece(),
      "pixels": self.total,
      "accuracy": float(self.correct.sum() / self.total),
      "mean_confidence": float(self.confidence.sum() / self.total),
      "bins": [
        {
          "low": float(lo),
          "high": float(hi),
          "pixels": int(n),
          "confidence": None if not n else float(c / n),
          "accuracy": None if not n else float(a / n),
        }
        for lo, hi, n, c, a in zip(
          self.edges[:-1], self.edges[1:], self.count, self.confidence, self.correct
        )
      ],
    }


def reliability_of_rasters(
  probabilities: str | Path, labels: str | Path, bins: int = 10, ignore: int = 255
) -> Reliability:
  """Top-label reliability of a probability GeoTIFF (one band per class) against a label GeoTIFF
  on the same grid (class indices, `ignore` = unlabelled), block by block."""
  with open_raster(probabilities) as p, open_raster(labels) as lab:
    if p.crs != lab.crs or p.transform != lab.transform or p.shape != lab.shape:
      raise DataError(labels, f"grid or CRS differs from the probabilities {probabilities}")
    rel = Reliability.empty(bins, low=1.0 / p.count)
    for _, win in p.block_windows(1):
      rel.add(p.read(window=win), lab.read(1, window=win), ignore)
  return rel


def uncertainty_of_errors(
  probabilities: str | Path, labels: str | Path, uncertainty: str | Path, ignore: int = 255
) -> dict:
  """Is the uncertainty raster high where the prediction is wrong? Mean uncertainty on correct
  and on wrong labelled pixels, and the error rate in the most and least uncertain tenth (from a
  histogram of 100 bins over [0, 1]), block by block."""
  bins = 100
  right, wrong = np.zeros(bins, np.int64), np.zeros(bins, np.int64)
  with open_raster(probabilities) as p, open_raster(labels) as lab, open_raster(uncertainty) as u:
    for src, path in ((lab, labels), (u, uncertainty)):
      if src.crs != p.crs or src.transform != p.transform or src.shape != p.shape:
        raise DataError(path, f"grid or CRS differs from the probabilities {probabilities}")
    for _, win in p.block_windows(1):
      probs, y, unc = p.read(window=win), lab.read(1, window=win), u.read(1, window=win)
      ok = (y != ignore) & np.isfinite(probs).all(axis=0) & np.isfinite(unc)
      b = np.clip((unc[ok] * bins).astype(int), 0, bins - 1)
      correct = probs[:, ok].argmax(axis=0) == y[ok]
      right += np.bincount(b[correct], minlength=bins)
      wrong += np.bincount(b[~correct], minlength=bins)
  centres = (np.arange(bins) + 0.5) / bins
  n = right + wrong
  cum = np.cumsum(n) / n.sum()
  # the least and the most uncertain tenth, in whole bins (so each holds at least a tenth)
  low, high = np.concatenate([[True], cum[:-1] < 0.1]), cum > 0.9
  return {
    "mean_uncertainty_correct": float((centres * right).sum() / right.sum()),
    "mean_uncertainty_wrong": float((centres * wrong).sum() / max(wrong.sum(), 1)),
    "error_rate": float(wrong.sum() / n.sum()),
    "error_rate_least_uncertain_tenth": float(wrong[low].sum() / max(n[low].sum(), 1)),
    "error_rate_most_uncertain_tenth": float(wrong[high].sum() / max(n[high].sum(), 1)),
    "tenths_pixel_shares": [float(n[low].sum() / n.sum()), float(n[high].sum() / n.sum())],
  }


def plot_reliability(
  curves: dict[str, Reliability], out: str | Path, overwrite: bool = False
) -> Path:
  """Reliability diagram (accuracy against confidence per bin, one line per area, ECE in the
  legend; the diagonal is perfect calibration) and the pixels per bin, to a PNG (atomic)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from demmae_jax.gis.figures import save_png

  fig, (ax, hist) = plt.subplots(
    2, 1, figsize=(5.5, 7), gridspec_kw={"height_ratios": [3, 1]}, sharex=True
  )
  low = min(r.edges[0] for r in curves.values())
  ax.plot([low, 1], [low, 1], color="0.6", ls="--", label="perfectly calibrated")
  for name, r in curves.items():
    conf, acc = r.confidence_per_bin(), r.accuracy_per_bin()
    ok = r.count > 0
    ax.plot(conf[ok], acc[ok], marker="o", label=f"{name} (ECE {r.ece():.3f}, {r.total:,} px)")
    centres = (r.edges[:-1] + r.edges[1:]) / 2
    hist.plot(centres, r.count / r.total, marker=".", label=name)
  ax.set_ylabel("accuracy (fraction correct)")
  ax.set_title("reliability of the top-label probability")
  ax.legend(fontsize=8, loc="upper left")
  hist.set_xlabel("confidence (highest class probability)")
  hist.set_ylabel("fraction of pixels")
  hist.set_yscale("log")
  return save_png(fig, out, overwrite)
