"""Statistics the manifest carries: global elevation moments and percentiles (for z-score
normalisation), local relief per tile (for choosing a relative-height scale), class counts."""

from __future__ import annotations

import numpy as np

PERCENTILES = (1, 2, 5, 50, 95, 98, 99)


class ValueStats:
  """Exact mean/std/min/max over all values added; percentiles from a seeded sample."""

  def __init__(self, seed: int = 0, per_add: int = 4096):
    self.n, self.sum, self.sumsq = 0, 0.0, 0.0
    self.min, self.max = np.inf, -np.inf
    self.sample: list[np.ndarray] = []
    self.rng = np.random.default_rng(seed)
    self.per_add = per_add

  def add(self, values: np.ndarray) -> None:
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0:
      return
    self.n += values.size
    self.sum += values.sum()
    self.sumsq += np.square(values).sum()
    self.min, self.max = min(self.min, values.min()), max(self.max, values.max())
    take = min(self.per_add, values.size)
    self.sample.append(self.rng.choice(values, take, replace=False).astype(np.float32))

  def summary(self) -> dict:
    if self.n == 0:
      return {"count": 0}
    mean = self.sum / self.n
    std = float(np.sqrt(max(self.sumsq / self.n - mean**2, 0.0)))
    sample = np.concatenate(self.sample)
    pct = np.percentile(sample, PERCENTILES)
    return {
      "count": int(self.n),
      "mean": float(mean),
      "std": std,
      "min": float(self.min),
      "max": float(self.max),
      **{f"p{p:02d}": float(v) for p, v in zip(PERCENTILES, pct)},
    }


def class_summary(counts: dict[int, int], ignore: int) -> dict:
  """Pixel counts, frequencies among labelled pixels, and inverse-frequency weights (mean 1)."""
  labelled = {k: v for k, v in counts.items() if k != ignore}
  total = sum(labelled.values())
  freq = {k: (v / total if total else 0.0) for k, v in sorted(labelled.items())}
  inv = {k: 1.0 / f for k, f in freq.items() if f > 0}
  mean_inv = np.mean(list(inv.values())) if inv else 1.0
  return {
    "pixel_counts": {str(k): int(v) for k, v in sorted(counts.items())},
    "frequencies": {str(k): float(f) for k, f in freq.items()},
    "weights": {str(k): float(w / mean_inv) for k, w in inv.items()},
  }
