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


def plot_outlines(
  raster: str | Path,
  layers,
  out: str | Path,
  title: str = "",
  overwrite: bool = False,
  vmax: float = 25.0,
  max_side: int = 1500,
) -> Path:
  """A height raster (read decimated) with polygon outlines over it: `layers` is a list of
  (polygons, colour, label)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  from matplotlib.lines import Line2D

  from data_pipelines.raster_io import open_raster

  with open_raster(raster) as src:
    scale = max(1, int(np.ceil(max(src.height, src.width) / max_side)))
    img = src.read(1, out_shape=(src.height // scale, src.width // scale), masked=True)
    b = src.bounds
  fig, ax = plt.subplots(figsize=(9, 9 * img.shape[0] / img.shape[1] + 0.4))
  ax.imshow(img, cmap="Greys_r", vmin=0, vmax=vmax, extent=(b.left, b.right, b.bottom, b.top))
  handles = []
  for polys, colour, label in layers:
    for g in polys:
      for part in getattr(g, "geoms", [g]):
        for ring in [part.exterior, *part.interiors]:
          ax.plot(*ring.xy, color=colour, lw=1.0)
    handles.append(Line2D([], [], color=colour, label=label))
  ax.legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.9)
  ax.set_title(title, fontsize=10)
  return save_png(fig, out, overwrite)
