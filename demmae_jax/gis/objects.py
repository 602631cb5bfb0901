"""Object-level evaluation of building polygons beside pixel IoU.

A predicted polygon and a reference footprint match when their IoU (area of intersection / area
of union) is >= `iou_min` (0.5: then each polygon has at most one partner); pairs are taken
greedily by decreasing IoU. Precision = matched predictions / predictions, recall = matched
footprints / footprints, F1 their harmonic mean. Height error compares, over the matched pairs,
a predicted height (e.g. the median nDSM in the predicted polygon) with a reference height
(LiDAR-derived, or a footprint attribute such as Alexandria's HEIGHT).

Only objects in the labelled area count: `labelled_fraction` (the share of a polygon's cells whose
label is not `ignore`) keeps predictions and footprints mostly (>= half) inside it.
"""

from __future__ import annotations

import numpy as np
import shapely

from data_pipelines.raster_io import open_raster


def match(pred, ref, iou_min: float = 0.5) -> list[tuple[int, int, float]]:
  """One-to-one (prediction index, reference index, IoU) pairs with IoU >= iou_min."""
  pred, ref = np.asarray(pred, dtype=object), np.asarray(ref, dtype=object)
  if not len(pred) or not len(ref):
    return []
  tree = shapely.STRtree(ref)
  pi, ri = tree.query(pred, predicate="intersects")
  inter = shapely.area(shapely.intersection(pred[pi], ref[ri]))
  iou = inter / (shapely.area(pred[pi]) + shapely.area(ref[ri]) - inter)
  pairs, used_p, used_r = [], set(), set()
  for k in np.argsort(-iou, kind="stable"):
    if iou[k] < iou_min:
      break
    if pi[k] in used_p or ri[k] in used_r:
      continue
    used_p.add(pi[k])
    used_r.add(ri[k])
    pairs.append((int(pi[k]), int(ri[k]), float(iou[k])))
  return pairs


def object_scores(pred, ref, iou_min: float = 0.5) -> dict:
  pairs = match(pred, ref, iou_min)
  tp = len(pairs)
  precision = tp / len(pred) if len(pred) else float("nan")
  recall = tp / len(ref) if len(ref) else float("nan")
  f1 = 2 * tp / (len(pred) + len(ref)) if len(pred) + len(ref) else float("nan")
  return {
    "iou_min": iou_min,
    "predicted": len(pred),
    "reference": len(ref),
    "matched": tp,
    "precision": precision,
    "recall": recall,
    "f1": f1,
    "mean_iou_matched": float(np.mean([p[2] for p in pairs])) if pairs else float("nan"),
    "pairs": pairs,
  }


def height_errors(predicted, reference) -> dict:
  """Errors of predicted against reference heights (pairs with both finite)."""
  p, r = np.asarray(predicted, np.float64), np.asarray(reference, np.float64)
  ok = np.isfinite(p) & np.isfinite(r)
  p, r = p[ok], r[ok]
  if len(p) < 2:
    return {"n": int(len(p))}
  e = p - r
  return {
    "n": int(len(p)),
    "bias_m": float(e.mean()),
    "mae_m": float(np.abs(e).mean()),
    "median_abs_m": float(np.median(np.abs(e))),
    "rmse_m": float(np.sqrt((e**2).mean())),
    "pearson_r": float(np.corrcoef(p, r)[0, 1]),
  }


def dissolve(geoms, attrs: dict | None = None, gap_m: float = 0.05):
  """Touching (or closer than `gap_m`) footprints merged into blocks; (blocks, attributes), an
  attribute kept for a block of one footprint and NaN for a merged block."""
  geoms = np.asarray(geoms, dtype=object)
  blocks = np.asarray(
    list(shapely.get_parts(shapely.unary_union(shapely.buffer(geoms, gap_m / 2)))), dtype=object
  )
  blocks = shapely.buffer(blocks, -gap_m / 2)
  tree = shapely.STRtree(blocks)
  member = tree.query(shapely.point_on_surface(geoms), predicate="intersects")
  owner = np.full(len(geoms), -1)
  owner[member[0]] = member[1]
  sizes = np.bincount(owner[owner >= 0], minlength=len(blocks))
  out = {}
  for name, values in (attrs or {}).items():
    col = np.full(len(blocks), np.nan)
    for i, b in enumerate(owner):
      if b >= 0 and sizes[b] == 1:
        col[b] = float(values[i])
    out[name] = col
  return blocks, out


def labelled_fraction(polys, labels, ignore: int = 255) -> np.ndarray:
  """Per polygon: the share of its cells (centres inside) whose label is not `ignore`; cells
  outside the label raster count as unlabelled."""
  from demmae_jax.gis.polygons import _window_mask

  out = []
  with open_raster(labels) as src:
    for p in polys:
      win, mask = _window_mask(p, src.transform)
      lab = src.read(1, window=win, boundless=True, fill_value=ignore)
      out.append(float((lab[mask] != ignore).mean()) if mask.any() else 0.0)
  return np.asarray(out)
