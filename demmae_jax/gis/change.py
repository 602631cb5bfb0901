"""Building change between two surveys of one place (e.g. Amsterdam AHN2 2008-2010 and AHN3 2014).

1. Vertical offset first: on cells whose top return is ground (ASPRS class 2) in both surveys
   (or, without class rasters, cells below `ground_m` above the DTM in both), the median of
   DSM(later) - DSM(earlier) is the surveys' offset; its spread says how well they agree. The
   height difference used below is corrected by it.
2. Per cell, from the two predicted class rasters (1 = building) and the corrected difference dh:
   new (building later only, dh > +`dh_m`), demolished (earlier only, dh < -`dh_m`), raised
   (building in both, dh > +`dh_m`), lowered (both, dh < -`dh_m`): a change of class must also be
   a change of height, else it is the model disagreeing with itself. With `edge_m`, cells that
   close to where either survey has no data (its edge, the raster's border, canals) are not
   compared: the predictor filled those windows. Each change mask is opened with a 3 x 3 square
   (a one-cell misregistration along every wall would otherwise show up as slivers). Cells not valid in both
   surveys are nodata. Written block by block (with a halo for the opening) into a change COG
   (uint8 codes, colour table) and a dh COG (float32, m).
3. Polygons per change class (gis/polygons.py) of at least `min_area_m2`, with the median and max
   dh, area, the heights above ground before and after, and the median roughness (|DSM - its
   3 x 3 median|, 5 x 5 median; baselines.roughness) of each survey's surface: ~0 on roofs, large
   in tree crowns. With `max_roughness_m`, polygons whose building surface is rougher are
   dropped (counted as `dropped_rough`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import rasterio
import scipy.ndimage as ndi
from rasterio.windows import Window

from data_pipelines.errors import DataError
from data_pipelines.raster_io import open_raster
from demmae_jax.gis import cog

NONE, NEW, DEMOLISHED, RAISED, LOWERED, NODATA = 0, 1, 2, 3, 4, 255
NAMES = {NEW: "new", DEMOLISHED: "demolished", RAISED: "raised", LOWERED: "lowered"}
COLOURS = {
  NONE: (235, 235, 235, 255),
  NEW: (40, 170, 60, 255),
  DEMOLISHED: (215, 40, 40, 255),
  RAISED: (40, 90, 215, 255),
  LOWERED: (240, 150, 20, 255),
}
GROUND = 2


@dataclasses.dataclass(frozen=True)
class Survey:
  dsm: str | Path
  dtm: str | Path
  classes: str | Path  # predicted classes (1 = building, 255 = nodata)
  lidar_class: str | Path | None = (
    None  # class of each cell's top return (las_to_rasters' class.tif)
  )


@dataclasses.dataclass(frozen=True)
class ChangeOptions:
  dh_m: float = 2.5  # about one storey
  ground_m: float = 0.3
  min_area_m2: float = 20.0
  block: int = 1024
  building: int = 1
  # a change polygon whose surface with the building (later for new and raised, earlier for
  # demolished and lowered) has a median roughness above this is dropped as vegetation
  # (baselines.roughness; the height rule tuned 0.1-0.2 m on Delft's training tiles); None: off
  max_roughness_m: float | None = None
  edge_m: float = 0.0  # cells this close to where either survey has no data are not compared


def _open_all(a: Survey, b: Survey):
  paths = [p for s in (a, b) for p in (s.dsm, s.dtm, s.classes, s.lidar_class) if p is not None]
  srcs = [open_raster(p) for p in paths]
  ref = srcs[0]
  for p, s in zip(paths[1:], srcs[1:]):
    if s.crs != ref.crs or s.transform != ref.transform or s.shape != ref.shape:
      for x in srcs:
        x.close()
      raise DataError(p, f"grid or CRS differs from {paths[0]}: both surveys must be on one grid")
  return dict(zip(paths, srcs)), ref


def _read(srcs, path, win, dtype=np.float32, fill=np.nan):
  a = srcs[path].read(1, window=win, boundless=True, masked=True, fill_value=fill)
  return a.astype(dtype).filled(fill)


def vertical_offset(a: Survey, b: Survey, opts: ChangeOptions = ChangeOptions()) -> dict:
  """Median and spread of DSM(b) - DSM(a) on ground cells of both surveys, block by block (a
  histogram of 1 cm bins over +-20 m: exact to 1 cm without keeping the differences)."""
  srcs, ref = _open_all(a, b)
  edges = np.arange(-20.0, 20.0001, 0.01)
  hist = np.zeros(len(edges) - 1, np.int64)
  use_class = a.lidar_class is not None and b.lidar_class is not None
  try:
    for r in range(0, ref.height, opts.block):
      for c in range(0, ref.width, opts.block):
        win = Window(c, r, min(opts.block, ref.width - c), min(opts.block, ref.height - r))
        za, zb = _read(srcs, a.dsm, win), _read(srcs, b.dsm, win)
        if use_class:
          ground = (_read(srcs, a.lidar_class, win, np.uint8, 0) == GROUND) & (
            _read(srcs, b.lidar_class, win, np.uint8, 0) == GROUND
          )
        else:
          ground = (za - _read(srcs, a.dtm, win) < opts.ground_m) & (
            zb - _read(srcs, b.dtm, win) < opts.ground_m
          )
        d = (zb - za)[ground & np.isfinite(za) & np.isfinite(zb)]
        hist += np.histogram(d, edges)[0]
  finally:
    for s in srcs.values():
      s.close()
  n = int(hist.sum())
  if n < 100:
    raise DataError(
      a.dsm,
      f"only {n} ground cells in common with {b.dsm}: the vertical offset "
      "cannot be measured (do the surveys overlap?)",
    )
  cdf = np.cumsum(hist) / n
  centres = (edges[:-1] + edges[1:]) / 2
  q = {p: float(centres[np.searchsorted(cdf, p / 100)]) for p in (5, 25, 50, 75, 95)}
  return {
    "ground_cells": n,
    "ground_from": "lidar class 2 in both"
    if use_class
    else f"height above DTM < {opts.ground_m} m in both",
    "median_m": q[50],
    "iqr_m": q[75] - q[25],
    "p5_m": q[5],
    "p95_m": q[95],
  }


def change_block(srcs, a: Survey, b: Survey, win: Window, offset: float, opts: ChangeOptions):
  """(codes uint8, dh float32) of one block (read with a halo for the opening and the edge)."""
  edge = int(np.ceil(opts.edge_m / abs(srcs[a.dsm].transform.a)))
  pad = edge + 1
  halo = Window(win.col_off - pad, win.row_off - pad, win.width + 2 * pad, win.height + 2 * pad)
  za, zb = _read(srcs, a.dsm, halo), _read(srcs, b.dsm, halo)
  ca = _read(srcs, a.classes, halo, np.uint8, 255)
  cb = _read(srcs, b.classes, halo, np.uint8, 255)
  ok = np.isfinite(za) & np.isfinite(zb) & (ca != 255) & (cb != 255)
  if edge:  # predictions beside a survey's edge or a hole saw filled-in windows: not compared
    ok = ndi.binary_erosion(ok, np.ones((2 * edge + 1, 2 * edge + 1), bool), border_value=1)
  ba, bb = ok & (ca == opts.building), ok & (cb == opts.building)
  dh = np.where(ok, zb - za - offset, np.nan).astype(np.float32)
  up, down = dh > opts.dh_m, dh < -opts.dh_m  # a class change must be a height change too
  masks = {
    NEW: bb & ~ba & up,
    DEMOLISHED: ba & ~bb & down,
    RAISED: ba & bb & up,
    LOWERED: ba & bb & down,
  }
  codes = np.where(ok, NONE, NODATA).astype(np.uint8)
  square = np.ones((3, 3), bool)
  for code, m in masks.items():
    codes[ndi.binary_opening(m, square)] = code
  inner = np.s_[pad:-pad, pad:-pad]
  return codes[inner], dh[inner]


def write_change(
  a: Survey,
  b: Survey,
  out_dir: str | Path,
  opts: ChangeOptions = ChangeOptions(),
  overwrite: bool = False,
) -> dict:
  """change.tif (codes), dh.tif (corrected DSM difference) and change.gpkg in `out_dir`; returns
  the offset, the counts and areas per change class."""
  from demmae_jax.gis import polygons
  from demmae_jax.gis.vector_io import write_polygons

  out_dir = Path(out_dir)
  offset = vertical_offset(a, b, opts)
  srcs, ref = _open_all(a, b)
  profile = dict(
    driver="GTiff",
    width=ref.width,
    height=ref.height,
    crs=ref.crs,
    transform=ref.transform,
    count=1,
    tiled=True,
    blockxsize=cog.BLOCK,
    blockysize=cog.BLOCK,
    compress="deflate",
  )
  crs, cell_area = ref.crs, abs(ref.transform.a * ref.transform.e)
  try:
    with (
      cog.cog_output(out_dir / "change.tif", overwrite, "nearest") as ctmp,
      cog.cog_output(out_dir / "dh.tif", overwrite, "average", predictor=3) as dtmp,
    ):
      with (
        rasterio.open(ctmp, "w", **profile, dtype="uint8", nodata=NODATA) as cdst,
        rasterio.open(dtmp, "w", **profile, dtype="float32", nodata=float("nan")) as ddst,
      ):
        cdst.write_colormap(1, COLOURS)
        cdst.update_tags(
          codes=", ".join(f"{k} {v}" for k, v in NAMES.items()), offset_m=str(offset["median_m"])
        )
        ddst.set_band_description(1, "DSM(later) - DSM(earlier) - offset on ground (m)")
        for r in range(0, ref.height, opts.block):
          for c in range(0, ref.width, opts.block):
            win = Window(c, r, min(opts.block, ref.width - c), min(opts.block, ref.height - r))
            codes, dh = change_block(srcs, a, b, win, offset["median_m"], opts)
            cdst.write(codes, 1, window=win)
            ddst.write(dh, 1, window=win)
  finally:
    for s in srcs.values():
      s.close()
  geoms, counts = [], {}
  fields = {
    k: []
    for k in (
      "change",
      "area_m2",
      "dh_median_m",
      "dh_max_abs_m",
      "height_before_m",
      "height_after_m",
      "roughness_before_m",
      "roughness_after_m",
    )
  }
  dh_src = polygons.HeightSource(ndsm=out_dir / "dh.tif")
  before = polygons.HeightSource(dsm=a.dsm, dtm=a.dtm)
  after = polygons.HeightSource(dsm=b.dsm, dtm=b.dtm)
  try:
    for code, name in NAMES.items():
      polys = [
        g
        for g in polygons.vectorise(out_dir / "change.tif", code, opts.block)[0]
        if g.area >= opts.min_area_m2
      ]
      kept, dropped = [], 0
      for g in polys:
        rough = (_median_roughness(a.dsm, g), _median_roughness(b.dsm, g))
        building_surface = rough[1] if code in (NEW, RAISED) else rough[0]
        if opts.max_roughness_m is not None and not building_surface <= opts.max_roughness_m:
          dropped += 1
          continue
        kept.append(g)
        d, h0, h1 = dh_src.heights(g), before.heights(g), after.heights(g)
        geoms.append(g)
        values = [
          name,
          g.area,
          _nan_median(d),
          _nan_max_abs(d),
          _nan_median(h0),
          _nan_median(h1),
          *rough,
        ]
        for key, v in zip(fields, values):
          fields[key].append(v)
      counts[name] = {
        "polygons": len(kept),
        "area_m2": float(sum(g.area for g in kept)),
        "dropped_rough": dropped,
      }
  finally:
    for s in (dh_src, before, after):
      s.close()
  write_polygons(out_dir / "change.gpkg", geoms, fields, crs, "change", overwrite)
  return {
    "offset": offset,
    "changes": counts,
    "options": dataclasses.asdict(opts),
    "cell_area_m2": cell_area,
    "outputs": [str(out_dir / n) for n in ("change.tif", "dh.tif", "change.gpkg")],
  }


def _nan_median(a) -> float:
  return float(np.nanmedian(a)) if np.isfinite(a).any() else float("nan")


def _nan_max_abs(a) -> float:
  return float(np.nanmax(np.abs(a))) if np.isfinite(a).any() else float("nan")


def _median_roughness(dsm: str | Path, poly) -> float:
  """Median roughness (baselines.roughness) of a DSM's cells inside `poly`."""
  from demmae_jax.baselines import fill_invalid, roughness
  from demmae_jax.gis.polygons import _window_mask

  with open_raster(dsm) as src:
    win, mask = _window_mask(poly, src.transform, pad=4)
    z = src.read(1, window=win, boundless=True, masked=True, fill_value=np.nan).astype(np.float32)
  z = z.filled(np.nan)
  ok = np.isfinite(z)
  if not ok[mask].any():
    return float("nan")
  return float(np.median(roughness(fill_invalid(z, ok))[mask & ok]))


def found_footprints(
  change_polys, change_names, footprints, min_cover: float = 0.5, kinds=("new", "raised")
) -> np.ndarray:
  """Per footprint: whether change polygons of `kinds` cover at least `min_cover` of it."""
  import shapely

  sel = [g for g, n in zip(change_polys, change_names) if n in kinds]
  if not sel:
    return np.zeros(len(footprints), bool)
  union = shapely.unary_union(sel)
  fp = np.asarray(footprints, dtype=object)
  cover = shapely.area(shapely.intersection(fp, union)) / np.maximum(shapely.area(fp), 1e-9)
  return cover >= min_cover


def footprint_check(
  change_gpkg: str | Path,
  footprints: str | Path,
  crs,
  *,
  layer=None,
  year_field: str,
  built_after: int,
  built_before: int,
  area=None,
  min_cover: float = 0.5,
) -> dict:
  """How many footprints built in (built_after, built_before] (e.g. BAG `bouwjaar` between the
  surveys) are covered >= `min_cover` by new or raised change polygons, against the same share
  among older footprints (false alarms). `area`: only footprints inside it (both surveys valid)."""
  import shapely

  from demmae_jax.gis.vector_io import read_polygons

  polys, attrs = read_polygons(change_gpkg, crs, None, ["change"])
  fp, fa = read_polygons(footprints, crs, layer, [year_field])
  year = np.asarray(fa[year_field], np.float64)
  if area is not None:
    inside = shapely.area(shapely.intersection(fp, area)) >= 0.9 * shapely.area(fp)
    fp, year = fp[inside], year[inside]
  found = found_footprints(polys, attrs["change"], fp, min_cover)
  between = (year > built_after) & (year <= built_before)
  older = year <= built_after
  union = shapely.unary_union([g for g, n in zip(polys, attrs["change"]) if n in ("new", "raised")])
  cover = shapely.area(shapely.intersection(fp, union)) / shapely.area(fp)
  on_fp = shapely.unary_union(fp)  # how many change polygons lie on (current) footprints
  share = shapely.area(shapely.intersection(polys, on_fp)) / shapely.area(polys)
  on_footprints = {
    n: {
      "polygons": int((attrs["change"] == n).sum()),
      "on_footprints": int(((attrs["change"] == n) & (share >= 0.5)).sum()),
    }
    for n in NAMES.values()
  }
  return {
    "field": year_field,
    "built_between": [built_after + 1, built_before],
    "footprints_in_area": int(len(fp)),
    "built_between_count": int(between.sum()),
    "built_between_found": int((found & between).sum()),
    "built_between_detail": [
      {"year": int(y), "area_m2": float(g.area), "cover_new_or_raised": float(c)}
      for g, y, c in zip(fp[between], year[between], cover[between])
    ],
    "older_count": int(older.sum()),
    "older_flagged": int((found & older).sum()),
    "min_cover": min_cover,
    "change_polygons_half_on_footprints": on_footprints,
  }


def valid_area(change_tif: str | Path, block: int = 1024):
  """The cells valid in both surveys, as one (multi)polygon."""
  import shapely

  from demmae_jax.gis import polygons

  parts = []
  for code in (NONE, *NAMES):
    parts += polygons.vectorise(change_tif, code, block)[0]
  return shapely.unary_union(parts)


def plot_change(
  change_tif: str | Path,
  change_gpkg: str | Path,
  out: str | Path,
  footprints=None,
  title: str = "",
  overwrite: bool = False,
  max_side: int = 2000,
) -> Path:
  """The change map: the area both surveys cover (light grey; decimated read of change.tif), the
  change polygons of change.gpkg filled by class, footprints outlined."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap
  from matplotlib.patches import Patch

  from demmae_jax.gis.figures import save_png
  from demmae_jax.gis.vector_io import read_polygons

  with open_raster(change_tif) as src:
    scale = max(1, int(np.ceil(max(src.height, src.width) / max_side)))
    codes = src.read(1, out_shape=(src.height // scale, src.width // scale))
    b, crs = src.bounds, src.crs
  img = np.ma.masked_equal((codes != NODATA).astype(np.uint8), 0)
  cmap = ListedColormap([(1, 1, 1), np.array(COLOURS[NONE][:3]) / 255]).with_extremes(bad="white")
  fig, ax = plt.subplots(figsize=(9, 9 * codes.shape[0] / codes.shape[1] + 0.5))
  ax.imshow(
    img,
    cmap=cmap,
    vmin=0,
    vmax=1,
    extent=(b.left, b.right, b.bottom, b.top),
    interpolation="nearest",
  )
  polys, attrs = read_polygons(change_gpkg, crs, None, ["change"])
  colour = {name: np.array(COLOURS[code]) / 255 for code, name in NAMES.items()}
  for g, name in zip(polys, attrs["change"]):
    for part in getattr(g, "geoms", [g]):
      ax.fill(*part.exterior.xy, color=colour[name], lw=0)
  handles = [Patch(color=colour[n], label=n) for n in NAMES.values()]
  for geoms, line, label in footprints or []:
    for g in geoms:
      for part in getattr(g, "geoms", [g]):
        ax.plot(*part.exterior.xy, color=line, lw=0.8)
    handles.append(Patch(facecolor="none", edgecolor=line, label=label))
  ax.legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.9)
  ax.set_title(title, fontsize=10)
  ax.set_xlabel("x (m)")
  ax.set_ylabel("y (m)")
  ax.set_xlim(b.left, b.right)
  ax.set_ylim(b.bottom, b.top)
  return save_png(fig, out, overwrite)


def main(argv=None) -> int:
  """python -m demmae_jax.gis.change --earlier DSM DTM CLASSES [LIDAR_CLASS] --later ... --out DIR
  [--footprints F --year_field bouwjaar --built_after 2010 --built_before 2013] [--png map.png]"""
  import argparse

  p = argparse.ArgumentParser(
    prog="python -m demmae_jax.gis.change",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--earlier", nargs="+", required=True, help="DSM DTM CLASSES [LIDAR_CLASS]")
  p.add_argument("--later", nargs="+", required=True, help="DSM DTM CLASSES [LIDAR_CLASS]")
  p.add_argument(
    "--out", required=True, help="folder for change.tif, dh.tif, change.gpkg, change.json"
  )
  p.add_argument("--dh_m", type=float, default=ChangeOptions.dh_m)
  p.add_argument("--min_area_m2", type=float, default=ChangeOptions.min_area_m2)
  p.add_argument(
    "--edge_m",
    type=float,
    default=0.0,
    help="do not compare cells this close to either survey's nodata (e.g. 5)",
  )
  p.add_argument(
    "--max_roughness_m",
    type=float,
    default=None,
    help="drop change polygons whose building surface is rougher (vegetation), e.g. 0.2",
  )
  p.add_argument("--footprints", default=None)
  p.add_argument("--layer", default=None)
  p.add_argument("--year_field", default="bouwjaar")
  p.add_argument("--built_after", type=int, default=None, help="the earlier survey's year")
  p.add_argument("--built_before", type=int, default=None, help="the later survey's year")
  p.add_argument("--png", default=None)
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  for name in ("earlier", "later"):
    if len(getattr(args, name)) not in (3, 4):
      p.error(f"--{name} wants DSM DTM CLASSES [LIDAR_CLASS]")
  if args.footprints and (args.built_after is None or args.built_before is None):
    p.error("--footprints needs --built_after and --built_before")
  from demmae_jax.train.cli import guarded

  return guarded("change", lambda: _run(args, argv))


def _run(args, argv) -> int:
  """The change command's work (main: arguments and the error contract)."""
  import json
  import sys

  from data_pipelines.atomic import atomic_file

  a, b = Survey(*args.earlier), Survey(*args.later)
  opts = ChangeOptions(
    dh_m=args.dh_m,
    min_area_m2=args.min_area_m2,
    max_roughness_m=args.max_roughness_m,
    edge_m=args.edge_m,
  )
  result = {"command": " ".join(["python -m demmae_jax.gis.change"] + list(argv or sys.argv[1:]))}
  result.update(write_change(a, b, args.out, opts, args.overwrite))
  out = Path(args.out)
  with open_raster(out / "change.tif") as src:
    crs = src.crs
  outlines = None
  if args.footprints:
    area = valid_area(out / "change.tif")
    result["footprints"] = footprint_check(
      out / "change.gpkg",
      args.footprints,
      crs,
      layer=args.layer,
      year_field=args.year_field,
      built_after=args.built_after,
      built_before=args.built_before,
      area=area,
    )
    from demmae_jax.gis.vector_io import read_polygons

    fp, fa = read_polygons(args.footprints, crs, args.layer, [args.year_field])
    year = np.asarray(fa[args.year_field], np.float64)
    sel = (year > args.built_after) & (year <= args.built_before)
    outlines = [(fp[sel], "black", f"{args.year_field} {args.built_after + 1}-{args.built_before}")]
  if args.png:
    counts = ", ".join(f"{k} {v['polygons']}" for k, v in result["changes"].items())
    rough = "" if opts.max_roughness_m is None else f"; roughness <= {opts.max_roughness_m:g} m"
    rough += f"; {opts.edge_m:g} m from nodata" if opts.edge_m else ""
    plot_change(
      out / "change.tif",
      out / "change.gpkg",
      args.png,
      outlines,
      overwrite=args.overwrite,
      title=f"building change (offset {result['offset']['median_m']:+.2f} m removed; "
      f"|dh| > {opts.dh_m:g} m; >= {opts.min_area_m2:g} m2{rough}):\n{counts}",
    )
  text = json.dumps(result, indent=1)
  with atomic_file(out / "change.json", args.overwrite) as tmp:
    Path(tmp).write_text(text + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
