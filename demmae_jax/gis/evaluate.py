"""Measurements of a prediction's GIS outputs on a labelled area (numbers in docs/gis_outputs.md).

  python -m demmae_jax.gis.evaluate calibration --area delft=P.tif:LABELS.tif[:U.tif] [--area ...] \
      --png reliability.png
  python -m demmae_jax.gis.evaluate split-labels --manifest TILES/manifest.json --out test_labels.tif
  python -m demmae_jax.gis.evaluate objects --classes C.tif --labels LABELS.tif \
      --reference footprints.gpkg [--reference_height FIELD | --reference_ndsm NDSM.tif] \
      --ndsm NDSM.tif [--dsm DSM.tif] [--probabilities P.tif] [--polygons out.gpkg]

`objects` vectorises the buildings (gis/polygons.py), keeps predictions and footprints at least
half inside the labelled area, scores them at IoU >= 0.5 (gis/objects.py) and compares the matched
pairs' heights: predicted = median height above ground in the predicted polygon from the nDSM
(and, with --dsm, estimated from the DSM alone); reference = a footprint attribute or the median of
a reference nDSM in the footprint. With --dissolve_reference, touching footprints are merged into
building blocks first (a segmenter cannot split terraced houses that share walls). Prints one JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import shapely

from demmae_jax.gis import calibration, objects, polygons
from demmae_jax.gis.vector_io import read_polygons


def run_calibration(args) -> dict:
  curves, extra = {}, {}
  for spec in args.area:
    name, _, paths = spec.partition("=")
    probs, _, rest = paths.partition(":")
    labels, _, unc = rest.partition(":")
    if not name or not probs or not labels:
      raise SystemExit(
        f"--area wants NAME=PROBABILITIES.tif:LABELS.tif[:UNCERTAINTY.tif], got {spec!r}"
      )
    curves[name] = calibration.reliability_of_rasters(probs, labels, bins=args.bins)
    if unc:
      extra[name] = calibration.uncertainty_of_errors(probs, labels, unc)
  if args.png:
    calibration.plot_reliability(curves, args.png, args.overwrite)
  return {
    name: {
      **{k: v for k, v in r.summary().items() if k != "bins" or args.bins_out},
      **extra.get(name, {}),
    }
    for name, r in curves.items()
  }


def run_objects(args) -> dict:
  opts = polygons.PolygonOptions(
    regularise=args.regularise, simplify_m=args.simplify_m, min_area_m2=args.min_area_m2
  )
  geoms, crs = polygons.vectorise(args.classes, args.value)
  pred, _ = polygons.shape_polygons(geoms, opts, 1.0)
  fields = [args.reference_height] if args.reference_height else []
  ref, attrs = read_polygons(args.reference, crs, args.reference_layer, fields)
  ref = np.array([g for g in ref], dtype=object)
  if args.dissolve_reference:  # touching footprints (terraced houses) become one building block
    ref, attrs = objects.dissolve(ref, attrs)
  if args.clip:  # objects cut at the labelled area's edge (a spatial split's test blocks)
    area = shapely.unary_union(
      polygons.vectorise(args.labels, 0)[0] + polygons.vectorise(args.labels, 1)[0]
    )
    pred = [
      g
      for g in shapely.intersection(np.asarray(pred, dtype=object), area)
      if g.area >= args.min_area_m2
    ]
    pred = [
      p
      for g in pred
      for p in shapely.get_parts(g)
      if p.geom_type == "Polygon" and p.area >= args.min_area_m2
    ]
    ref = np.asarray(ref, dtype=object)
    clipped = shapely.intersection(ref, area)
    keep_r = shapely.area(clipped) >= np.minimum(args.min_area_m2, 0.5 * shapely.area(ref))
    ref = np.where(keep_r, clipped, ref)
    keep_p = np.ones(len(pred), bool)
  else:
    keep_p = objects.labelled_fraction(pred, args.labels) >= 0.5
    keep_r = objects.labelled_fraction(ref, args.labels) >= 0.5
  pred = list(np.asarray(pred, dtype=object)[keep_p])
  ref_kept = ref[keep_r]
  ref_attr = {k: v[keep_r] for k, v in attrs.items()}
  out = {}
  for iou_min in args.iou:
    s = objects.object_scores(pred, ref_kept, iou_min)
    out[f"iou>={iou_min:g}"] = {k: v for k, v in s.items() if k != "pairs"}
  pairs = objects.match(pred, ref_kept, 0.5)
  pi = [p for p, _, _ in pairs]
  ri = [r for _, r, _ in pairs]
  if args.reference_height:
    ref_h = np.asarray(ref_attr[args.reference_height], np.float64)[ri] * args.reference_scale
    ref_from = f"footprint attribute {args.reference_height} x {args.reference_scale:g}"
  elif args.reference_ndsm:
    src = polygons.HeightSource(ndsm=args.reference_ndsm)
    ref_h = np.array(
      [
        np.nanmedian(h) if np.isfinite(h).any() else np.nan
        for h in (src.heights(ref_kept[r]) for r in ri)
      ]
    )
    src.close()
    ref_from = f"median of {args.reference_ndsm} in the footprint"
  else:
    ref_h = None
  heights = {}
  sources = {"ndsm": dict(ndsm=args.ndsm)} if args.ndsm else {}
  if args.dsm:
    sources["dsm_only"] = dict(dsm=args.dsm)
  for name, kw in sources.items():
    src = polygons.HeightSource(**kw)
    attrs_p = polygons.polygon_attributes([pred[p] for p in pi], heights=src)
    src.close()
    if ref_h is not None:
      heights[name] = objects.height_errors(attrs_p["height_median_m"], ref_h)
  if ref_h is not None and args.heights_at_footprints:
    heights["at_footprints"] = _heights_at_footprints(args, ref_kept, ref_attr)
  if args.png:
    from demmae_jax.gis.figures import plot_outlines

    matched = {p for p, _, _ in pairs}
    plot_outlines(
      args.ndsm or args.classes,
      [
        (ref_kept, "#ffd700", "reference"),
        (
          [g for i, g in enumerate(pred) if i in matched],
          "#00c853",
          "predicted, matched (IoU >= 0.5)",
        ),
        ([g for i, g in enumerate(pred) if i not in matched], "#ff1744", "predicted, unmatched"),
      ],
      args.png,
      f"{Path(args.classes).parent.name}: object F1 {out['iou>=0.5']['f1']:.3f} at IoU 0.5"
      if "iou>=0.5" in out
      else "",
      args.overwrite,
    )
  if args.polygons:
    hs = polygons.HeightSource(ndsm=args.ndsm) if args.ndsm else None
    fields_out = {"class": ["building"] * len(pred)}
    fields_out.update(
      polygons.polygon_attributes(
        pred,
        heights=hs,
        probabilities=args.probabilities,
        band=args.value + 1,
        source=str(args.classes),
        model=args.model or "",
      )
    )
    from demmae_jax.gis.vector_io import write_polygons

    write_polygons(args.polygons, pred, fields_out, crs, "building", args.overwrite)
  out.update(
    kept={
      "predicted": int(keep_p.sum()),
      "of_predicted": int(len(keep_p)),
      "reference": int(keep_r.sum()),
      "of_reference": int(len(keep_r)),
    },
    polygon_options=opts.__dict__,
    dissolve_reference=args.dissolve_reference,
    clip=args.clip,
    heights={"reference": ref_from, **heights} if ref_h is not None else None,
  )
  return out


def run_split_labels(args) -> dict:
  """The tile set's label raster with every pixel outside its `split` blocks set to 255, so that
  calibration and object scores count only the blocks held out from training."""
  import rasterio

  from data_pipelines.atomic import atomic_file
  from data_pipelines.reader import read_manifest
  from demmae_jax.area_eval import source_path, test_area_mask

  manifest = read_manifest(args.manifest)
  with rasterio.open(source_path(manifest, "label")) as src:
    labels, profile = src.read(1), src.profile
  inside = test_area_mask(manifest, labels.shape, args.split)
  labels = np.where(inside, labels, 255).astype(np.uint8)
  with atomic_file(args.out, args.overwrite) as tmp:
    with rasterio.open(tmp, "w", **{**profile, "driver": "GTiff"}) as dst:
      dst.write(labels, 1)
  return {"labels": args.out, "split": args.split, "labelled_pixels": int((labels != 255).sum())}


def _heights_at_footprints(args, ref, ref_attr) -> dict:
  """Height estimation apart from outlines: for every footprint with at least half its cells
  predicted building, the median height of those cells (nDSM, and DSM alone with --dsm) against
  the reference height."""
  from data_pipelines.raster_io import open_raster
  from demmae_jax.gis.polygons import _window_mask

  if args.reference_height:
    ref_h = np.asarray(ref_attr[args.reference_height], np.float64) * args.reference_scale
  else:
    src = polygons.HeightSource(ndsm=args.reference_ndsm)
    ref_h = np.array(
      [np.nanmedian(h) if np.isfinite(h).any() else np.nan for h in map(src.heights, ref)]
    )
    src.close()
  out = {}
  sources = {"ndsm": dict(ndsm=args.ndsm)} if args.ndsm else {}
  if args.dsm:
    sources["dsm_only"] = dict(dsm=args.dsm)
  with open_raster(args.classes) as cls:
    predicted = []
    for g in ref:
      win, mask = _window_mask(g, cls.transform)
      c = cls.read(1, window=win, boundless=True, fill_value=255)[mask]
      predicted.append(c == args.value)
  found = np.array([p.size > 0 and p.mean() >= 0.5 for p in predicted])
  for name, kw in sources.items():
    src = polygons.HeightSource(**kw)
    pred_h = np.full(len(ref), np.nan)
    for i in np.flatnonzero(found):
      h = src.heights(ref[i])[predicted[i]]
      pred_h[i] = np.nanmedian(h) if np.isfinite(h).any() else np.nan
    src.close()
    out[name] = objects.height_errors(pred_h, ref_h)
  out["footprints_found"] = int(found.sum())
  out["footprints"] = int(len(ref))
  return out


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m demmae_jax.gis.evaluate",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("calibration", help="ECE and reliability plot of probability rasters")
  c.add_argument(
    "--area",
    action="append",
    required=True,
    help="NAME=PROBABILITIES.tif:LABELS.tif[:UNCERTAINTY.tif]",
  )
  c.add_argument("--bins", type=int, default=10)
  c.add_argument("--bins_out", action="store_true", help="also print the per-bin table")
  c.add_argument("--png", default=None)
  o = sub.add_parser("objects", help="object F1 at IoU thresholds and building height errors")
  o.add_argument("--classes", required=True)
  o.add_argument("--value", type=int, default=1, help="the building class in --classes")
  o.add_argument("--labels", required=True, help="label raster: 255 = outside the labelled area")
  o.add_argument("--reference", required=True, help="reference footprints (vector)")
  o.add_argument("--reference_layer", default=None)
  o.add_argument("--reference_height", default=None, help="footprint attribute holding heights")
  o.add_argument("--reference_scale", type=float, default=1.0, help="e.g. 0.3048 for feet")
  o.add_argument(
    "--reference_ndsm", default=None, help="nDSM whose median in a footprint is its height"
  )
  o.add_argument("--ndsm", default=None, help="nDSM the predicted heights are read from")
  o.add_argument("--dsm", default=None, help="also estimate heights from this DSM alone")
  o.add_argument("--probabilities", default=None)
  o.add_argument("--model", default=None)
  o.add_argument("--polygons", default=None, help="also write the scored polygons (.gpkg)")
  o.add_argument("--png", default=None, help="also draw the outlines over the nDSM")
  o.add_argument(
    "--dissolve_reference",
    action="store_true",
    help="score against blocks of touching footprints (attributes kept for blocks of one)",
  )
  o.add_argument(
    "--clip",
    action="store_true",
    help="cut predictions and footprints at the labelled area's edge (test blocks of a "
    "spatial split) instead of keeping those at least half inside it",
  )
  o.add_argument(
    "--heights_at_footprints",
    action="store_true",
    help="also compare heights at every footprint at least half predicted building "
    "(the predicted building cells inside it): height estimation apart from outlines",
  )
  o.add_argument("--iou", type=float, nargs="+", default=[0.5])
  o.add_argument("--regularise", action="store_true")
  o.add_argument("--simplify_m", type=float, default=0.0)
  o.add_argument("--min_area_m2", type=float, default=10.0)
  t = sub.add_parser("split-labels", help="a tile set's labels restricted to its test blocks")
  t.add_argument("--manifest", required=True)
  t.add_argument("--split", default="test")
  t.add_argument("--out", required=True)
  for sp in (c, o, t):
    sp.add_argument("--json", default=None, help="also write the result to this JSON file")
    sp.add_argument("--overwrite", action="store_true")
  return p


def main(argv=None) -> int:
  """Bad input is one line, `gis-evaluate: error: <file>: <problem>`, exit 2 (train/cli.py)."""
  from demmae_jax.train.cli import guarded

  args = parser().parse_args(argv)
  return guarded("gis-evaluate", lambda: _run(args, argv))


def _run(args, argv) -> int:
  result = {
    "calibration": run_calibration,
    "objects": run_objects,
    "split-labels": run_split_labels,
  }[args.command](args)
  result = {
    "command": " ".join(["python -m demmae_jax.gis.evaluate"] + list(argv or sys.argv[1:])),
    **result,
  }
  text = json.dumps(result, indent=1, default=float)
  if args.json:
    from data_pipelines.atomic import atomic_file

    with atomic_file(args.json, args.overwrite) as tmp:
      Path(tmp).write_text(text + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
