"""How well each normalisation mode separates road pixels from building pixels on real data.

For every tile of the Delft DSM (inside the BGT-labelled area), each mode normalises the tile
exactly as the reader would; the normalised values of BGT road pixels and BGT building pixels are
pooled and compared: mean and std per class, the histogram overlap coefficient (sum over bins of
the smaller of the two normalised histograms: 0 = disjoint, 1 = identical) and the probability
that a random building pixel is higher than a random road pixel (AUC; 0.5 = no separation).
Road vs the remaining background (ground, vegetation, water) is reported the same way.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import rasterio

from data_pipelines.labels import IGNORE, LabelLayer, rasterize_labels
from data_pipelines.lidar import las_to_rasters
from data_pipelines.normalisation import normalise_numpy
from data_pipelines.prepare import (
  DELFT_BUILDINGS,
  DELFT_CRS,
  DELFT_LAZ,
  DELFT_ROAD_FUNCTIONS,
  DELFT_ROADS,
)
from data_pipelines.shared_data import shared_file
from data_pipelines.tiles import tile_windows

BACKGROUND, BUILDING, ROAD = 0, 1, 2
BINS = 100


def separation(a: np.ndarray, b: np.ndarray) -> dict:
  """Mean/std of a and b, histogram overlap coefficient, and AUC = P(a > b) (+ half of ties)."""
  lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
  edges = np.linspace(lo, hi if hi > lo else lo + 1, BINS + 1)
  ha = np.histogram(a, edges)[0] / a.size
  hb = np.histogram(b, edges)[0] / b.size
  # AUC from ranks of the pooled values (Mann-Whitney U), ties counted half
  pooled = np.concatenate([a, b])
  order = np.argsort(pooled, kind="stable")
  ranks = np.empty(pooled.size)
  sorted_vals = pooled[order]
  _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
  ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
  auc = (ranks[: a.size].sum() - a.size * (a.size + 1) / 2) / (a.size * b.size)
  return {
    "mean_a": float(a.mean()),
    "std_a": float(a.std()),
    "mean_b": float(b.mean()),
    "std_b": float(b.std()),
    "overlap": float(np.minimum(ha, hb).sum()),
    "auc": float(auc),
  }


def delft_rasters(folder: Path, cell_size: float) -> dict[str, np.ndarray]:
  """DSM, nDSM, validity and a 3-class label (0 other, 1 building, 2 road, 255 unlabelled)."""
  rasters = las_to_rasters(
    [shared_file(p) for p in DELFT_LAZ],
    folder / "rasters",
    cell_size=cell_size,
    crs=DELFT_CRS,
    progress=False,
  )
  coverage = [LabelLayer(shared_file(DELFT_BUILDINGS)), LabelLayer(shared_file(DELFT_ROADS))]
  layers = [
    LabelLayer(shared_file(DELFT_ROADS), value=ROAD, field="function", values=DELFT_ROAD_FUNCTIONS),
    LabelLayer(shared_file(DELFT_BUILDINGS), value=BUILDING),
  ]  # buildings burnt last win overlaps
  rasterize_labels(rasters["dsm"], layers, folder / "label.tif", coverage=coverage)
  read = lambda p: rasterio.open(p).read(1)
  return {
    "dsm": read(rasters["dsm"]),
    "ndsm": read(rasters["ndsm"]),
    "valid": read(rasters["valid"]) > 0,
    "label": read(folder / "label.tif"),
  }


def normalisation_report(
  tile_sizes=(64, 224), cell_size: float = 0.5, scale_m: float = 30.0, stats: dict | None = None
) -> dict:
  """{tile_size: {mode: {"building_vs_road": ..., "road_vs_other": ...}}} on the Delft data.

  z-score uses `stats` (mean/std) or those of the labelled area's valid DSM pixels.
  """
  with tempfile.TemporaryDirectory() as tmp:
    r = delft_rasters(Path(tmp), cell_size)
  dsm, valid, label = r["dsm"], r["valid"] & np.isfinite(r["dsm"]), r["label"]
  labelled = valid & (label != IGNORE)
  stats = stats or {"mean": float(dsm[labelled].mean()), "std": float(dsm[labelled].std())}
  report = {"cell_size": cell_size, "scale_m": scale_m, "zscore_stats": stats, "tiles": {}}
  for size in tile_sizes:
    values = {
      m: {BACKGROUND: [], BUILDING: [], ROAD: []} for m in ("minmax", "zscore", "relative", "ndsm")
    }
    n_tiles = 0
    for w in tile_windows(*dsm.shape, size, size // 2):
      win = np.s_[w.row : w.row + size, w.col : w.col + size]
      lbl, ok = label[win], labelled[win]
      if not ((lbl == ROAD) & ok).any() or not ((lbl == BUILDING) & ok).any():
        continue  # only tiles holding both classes say anything about separating them
      n_tiles += 1
      for mode in values:
        x = normalise_numpy(
          dsm[win], valid[win], mode, stats=stats, ndsm=r["ndsm"][win], scale_m=scale_m
        )[..., 0]
        for c in values[mode]:
          values[mode][c].append(x[(lbl == c) & ok])
    report["tiles"][size] = {"count": n_tiles}
    for mode, per_class in values.items():
      v = {c: np.concatenate(per_class[c]) for c in per_class}
      report["tiles"][size][mode] = {
        "building_vs_road": separation(v[BUILDING], v[ROAD]),
        "road_vs_other": separation(v[ROAD], v[BACKGROUND]),
      }
  return report


def report_markdown(report: dict) -> str:
  lines = []
  for size, per_mode in report["tiles"].items():
    lines += [
      f"\n### {size} x {size} px tiles ({size * report['cell_size']:g} m), stride {size // 2}, "
      f"{per_mode['count']} tiles holding both classes\n",
      "| mode | building mean (std) | road mean (std) | overlap bld/road | AUC bld>road "
      "| other mean (std) | overlap road/other | AUC road>other |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for mode, s in per_mode.items():
      if mode == "count":
        continue
      b, o = s["building_vs_road"], s["road_vs_other"]
      lines.append(
        f"| {mode} | {b['mean_a']:.3f} ({b['std_a']:.3f}) | {b['mean_b']:.3f} ({b['std_b']:.3f}) "
        f"| {b['overlap']:.3f} | {b['auc']:.3f} | {o['mean_b']:.3f} ({o['std_b']:.3f}) "
        f"| {o['overlap']:.3f} | {o['auc']:.3f} |"
      )
  return "\n".join(lines) + "\n"
