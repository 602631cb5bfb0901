"""Figures of the GIS measurements, saved atomically."""
from __future__ import annotations

from pathlib import Path


def save_png(fig, out: str | Path, overwrite: bool = False, dpi: int = 110) -> Path:
  """`fig` to the PNG `out` (data_pipelines.atomic: refused if it exists unless `overwrite`),
  then closed."""
  import matplotlib.pyplot as plt
  from data_pipelines.atomic import atomic_file
  fig.tight_layout()
  with atomic_file(out, overwrite) as tmp:
    fig.savefig(tmp, dpi=dpi, format="png")
  plt.close(fig)
  return Path(out)
