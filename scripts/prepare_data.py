#!/usr/bin/env python
"""Turn LiDAR / elevation rasters and vector labels into tile sets for demmae-jax.

Subcommands (each refuses to replace an existing output unless --overwrite, and an output that
is one of its inputs or holds one, also through links; errors are `error: <file>: <problem>`,
exit 2, with the traceback under --debug):
  lidar      LAS/LAZ files -> dsm/dtm/ndsm/class/valid GeoTIFFs (one mosaic)
  labels     vector layer(s) -> uint8 label GeoTIFF on a DEM's grid (255 outside the labelled area)
  tiles      DEM (+ label, validity, extra channels) -> TFRecord shards + manifest.json
  delft      the whole chain on the shared Delft set, for buildings and/or roads
  area       the whole chain on any labelled area of the shared data (data_pipelines/areas.py)
  check      decode every record of a tile set against its manifest; names the first bad file
  corpus     the high-resolution pretraining corpus (DSM + nDSM per source, held-out blocks NaN)
  corpus-beam  LAZ / COPC / GeoTIFF / HGT files (local or gs://) -> TFRecord tile shards + manifest,
             an Apache Beam pipeline (data_pipelines/corpus_beam.py); extra --flags go to Beam
  normalisation-report   how each normalisation mode separates roads from buildings (Delft)

Examples:
  scripts/prepare_data.py delft --out data/delft --task both
  scripts/prepare_data.py area amsterdam_ahn3 --cell-size 1 --out data/areas/amsterdam_ahn3
  scripts/prepare_data.py corpus --out data/corpus --cell-size 1
  scripts/prepare_data.py corpus-beam 'ahn/*.laz' --crs EPSG:28992 --source 'ign/*.copc.laz' \
      --source 'dem/*.tif' --out data/corpus_tiles --direct_num_workers=2 --direct_running_mode=multi_processing
  scripts/prepare_data.py lidar a.laz b.laz --crs EPSG:28992 --cell-size 0.5 --out rasters/
  scripts/prepare_data.py labels --dem rasters/dsm.tif --vector roads.gpkg --field function \\
      --values "rijbaan lokale weg" parkeervlak --out labels/roads.tif
  scripts/prepare_data.py tiles --dem rasters/dsm.tif --label labels/roads.tif \\
      --valid rasters/valid.tif --extra ndsm=rasters/ndsm.tif --tile-size 64 --stride 32 --out tiles/
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _tiling_flags(
  p: argparse.ArgumentParser, tile_size: int, stride: int | None, dtype: str, min_valid: float
) -> None:
  p.add_argument(
    "--tile-size", type=int, default=tile_size, help=f"tile side in pixels (default {tile_size})"
  )
  p.add_argument(
    "--stride",
    type=int,
    default=stride,
    help="step between tiles in pixels (default: tile size; smaller = overlapping tiles)",
  )
  p.add_argument(
    "--block-px",
    type=int,
    default=None,
    help="side of the blocks splits are drawn by "
    "(default 2 x tile size); tiles never straddle two splits",
  )
  p.add_argument(
    "--min-valid",
    type=float,
    default=min_valid,
    help=f"minimum fraction of valid pixels per tile (default {min_valid})",
  )
  p.add_argument(
    "--min-labelled", type=float, default=0.25, help="minimum fraction of labelled (not 255) pixels"
  )
  p.add_argument("--dtype", choices=("float32", "float16"), default=dtype, help="elevation storage")
  p.add_argument(
    "--seed", type=int, default=0, help="seed of the split and of the few-label subsets"
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("lidar", help="LAS/LAZ -> DSM, DTM, nDSM, class and validity GeoTIFFs")
  p.add_argument("inputs", nargs="+", help="LAS/LAZ files forming one mosaic")
  p.add_argument(
    "--out", required=True, help="output folder (dsm.tif, dtm.tif, ndsm.tif, class.tif, valid.tif)"
  )
  p.add_argument(
    "--cell-size", type=float, default=0.5, help="cell size in CRS units (default 0.5)"
  )
  p.add_argument(
    "--crs", help="CRS when the headers carry none, e.g. EPSG:28992 (must match if they do)"
  )
  p.add_argument(
    "--window-px", type=int, default=2048, help="output window processed at once (memory bound)"
  )
  p.add_argument(
    "--max-density",
    type=float,
    default=None,
    help="thin denser files to this many points per m2 first (a fixed, coordinate-hashed "
    "subset), e.g. 3.4 to match the Amsterdam surveys the study's models learnt crowns from",
  )
  p.add_argument("--overwrite", action="store_true")

  p = sub.add_parser("labels", help="vector layers -> label GeoTIFF on a DEM grid")
  p.add_argument("--dem", required=True, help="GeoTIFF whose grid the labels take")
  p.add_argument(
    "--vector",
    required=True,
    nargs="+",
    help="GeoPackage/SQLite/Shapefile/GeoJSON layer(s), value 1",
  )
  p.add_argument("--layer", help="layer name inside the vector file(s)")
  p.add_argument("--field", help="attribute to filter on, e.g. function")
  p.add_argument("--values", nargs="+", help="attribute values kept (with --field)")
  p.add_argument(
    "--area", help="polygon layer of the labelled area (default: convex hull of --coverage)"
  )
  p.add_argument(
    "--coverage", nargs="+", help="layers whose hull is the labelled area (default: --vector)"
  )
  p.add_argument("--crs", help="CRS of vector files that carry none, e.g. EPSG:28992")
  p.add_argument("--out", required=True, help="output GeoTIFF")
  p.add_argument("--overwrite", action="store_true")

  p = sub.add_parser("tiles", help="rasters -> TFRecord tile shards + manifest.json")
  p.add_argument("--dem", required=True, help="elevation GeoTIFF (DSM, DEM, .hgt)")
  p.add_argument("--label", help="uint8 label GeoTIFF on the same grid (255 = ignore)")
  p.add_argument("--valid", help="validity GeoTIFF on the same grid (0 = invalid)")
  p.add_argument(
    "--extra", nargs="*", default=[], metavar="NAME=PATH", help="extra channels, e.g. ndsm=ndsm.tif"
  )
  p.add_argument(
    "--band", type=int, help="band of --dem holding the elevation (required if it has several)"
  )
  p.add_argument(
    "--cell-size-m",
    type=float,
    help="cell size in metres, when the CRS does not say (geographic or local CRSs)",
  )
  p.add_argument("--tiles-per-shard", type=int, default=1024)
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--overwrite", action="store_true")
  _tiling_flags(p, 224, None, "float32", 0.9)

  p = sub.add_parser(
    "delft", help="the shared Delft LiDAR + BGT set into building and road tile sets"
  )
  p.add_argument("--out", required=True, help="output folder; gets <task>/{rasters,labels,tiles}")
  p.add_argument("--task", choices=("buildings", "roads", "both"), default="both")
  p.add_argument("--cell-size", type=float, default=0.5)
  p.add_argument(
    "--label-source",
    choices=("bgt", "lidar"),
    default="bgt",
    help="buildings from BGT footprints or LiDAR class 6",
  )
  p.add_argument("--overwrite", action="store_true")
  _tiling_flags(p, 64, 32, "float16", 0.75)

  p = sub.add_parser("area", help="a labelled area of the shared data into tile sets, one per task")
  p.add_argument(
    "name",
    help="an area of data_pipelines/areas.py: delft, alexandria, amsterdam_ahn3, "
    "amsterdam_ahn2, gothenburg",
  )
  p.add_argument("--out", required=True, help="output folder; gets <task>/{rasters,labels,tiles}")
  p.add_argument(
    "--task", nargs="+", help="buildings and/or roads (default: all of the area's tasks)"
  )
  p.add_argument(
    "--cell-size",
    type=float,
    help="grid spacing in metres (default: the area's native one; 1 puts every area on one grid)",
  )
  p.add_argument(
    "--holdout",
    action="store_true",
    help="every tile in test (the held-out area of leave-one-area-out)",
  )
  p.add_argument("--overwrite", action="store_true")
  _tiling_flags(p, 64, 32, "float16", None)  # min_valid None: the area's own

  p = sub.add_parser(
    "corpus",
    help="every LiDAR survey / DSM of the shared data as pretraining rasters, "
    "val/test blocks of the evaluation splits NaN (data_pipelines/pretrain_corpus.py)",
  )
  p.add_argument(
    "--out",
    required=True,
    help="output folder (corpus.json, SOURCE/{dsm,ndsm}.tif); an unfinished one is completed",
  )
  p.add_argument(
    "--cell-size",
    type=float,
    default=1.0,
    help="finest cell in metres (default 1; "
    "sources that cannot support it keep their own: Amsterdam 1, Alexandria and IGN 2)",
  )
  p.add_argument(
    "--paper-splits", action="store_true", help="also mask configs/experiments.py:paper's splits"
  )
  p.add_argument(
    "--exclude",
    nargs="+",
    default=[],
    metavar="PLACE",
    help="leave whole places out, e.g. gothenburg (leave-one-area-out pretraining)",
  )

  p = sub.add_parser(
    "corpus-beam",
    help="LiDAR / DEM files -> TFRecord tile shards + corpus_manifest.json "
    "(Apache Beam; unknown --flags are Beam pipeline options, e.g. --direct_num_workers=2)",
  )
  p.add_argument(
    "inputs", nargs="*", help="paths or globs (local or gs://) of .las/.laz/.tif/.hgt files"
  )
  p.add_argument("--crs", help="CRS of the positional inputs whose headers carry none")
  p.add_argument(
    "--source",
    nargs="+",
    action="append",
    default=[],
    metavar=("PATTERN", "CRS"),
    help="an input with its own options: PATTERN [CRS [CELL_SIZE [ROLE]]] (CRS '-' = the "
    "header's; ROLE train or eval)",
  )
  p.add_argument(
    "--shared-data",
    action="store_true",
    help="add the shared real data (the sources of "
    "data_pipelines/pretrain_corpus.py; La Rochelle as eval)",
  )
  p.add_argument(
    "--srtm", action="store_true", help="with --shared-data: the SRTM tiles too (N44W072 as eval)"
  )
  p.add_argument(
    "--out", required=True, help="output folder (local or gs://); an unfinished one is completed"
  )
  p.add_argument(
    "--cell-size",
    type=float,
    default=1.0,
    help="LiDAR cell in metres (default 1; "
    "--shared-data sources keep the finest their density supports)",
  )
  p.add_argument("--tile-size", type=int, default=224)
  p.add_argument("--stride", type=int, default=None, help="default: the tile size")
  p.add_argument(
    "--max-nodata", type=float, default=0.1, help="largest share of cells without a value"
  )
  p.add_argument("--min-relief", type=float, default=1.0, help="metres of relief a tile needs")
  p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
  p.add_argument("--tiles-per-shard", type=int, default=256)
  p.add_argument(
    "--window-px", type=int, default=2048, help="LiDAR output window (the memory bound)"
  )
  p.add_argument(
    "--lidar-products", nargs="+", default=["dsm", "ndsm"], choices=("dsm", "ndsm", "dtm")
  )
  p.add_argument(
    "--held-out",
    default="corpus",
    help="'corpus' (the evaluation splits of "
    "data_pipelines/pretrain_corpus.py; prepared once into OUT/splits), 'none', or a JSON file "
    '[{"crs": ..., "rects": [[xmin, ymin, xmax, ymax], ...]}]',
  )

  p = sub.add_parser(
    "check", help="read and decode every record of a tile set against its manifest"
  )
  p.add_argument("manifest")

  p = sub.add_parser(
    "normalisation-report", help="road vs building separation per normalisation mode (Delft)"
  )
  p.add_argument("--tile-sizes", type=int, nargs="+", default=[64, 224])
  p.add_argument("--cell-size", type=float, default=0.5)
  p.add_argument(
    "--scale-m", type=float, default=30.0, help="metres mapped to 1 by relative / ndsm"
  )
  p.add_argument("--json", help="also write the numbers to this JSON file")
  p.add_argument("--overwrite", action="store_true")

  for p in sub.choices.values():
    p.add_argument("--debug", action="store_true", help="on an error, also print the traceback")
  a, beam_args = parser.parse_known_args(argv)
  if beam_args and a.command != "corpus-beam":
    parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
  a.beam_args = beam_args
  from demmae_jax.train import cli  # the scripts' one error contract (imports absl only)

  return cli.guarded("prepare_data", lambda: _run(a), debug=a.debug)


def _run(a: argparse.Namespace) -> int:
  from data_pipelines.atomic import check_outputs

  if a.command == "lidar":
    from data_pipelines.lidar import PRODUCTS, las_to_rasters

    check_outputs([Path(a.out) / f"{p}.tif" for p in PRODUCTS], a.inputs)
    out = las_to_rasters(
      a.inputs,
      a.out,
      cell_size=a.cell_size,
      crs=a.crs,
      window_px=a.window_px,
      overwrite=a.overwrite,
      max_density=a.max_density,
    )
    print("\n".join(f"{k}: {v}" for k, v in out.items()))
  elif a.command == "labels":
    from data_pipelines.labels import LabelLayer, rasterize_labels

    check_outputs([a.out], [a.dem, *a.vector, a.area, *(a.coverage or [])])
    layers = [
      LabelLayer(v, layer=a.layer, field=a.field, values=a.values, crs=a.crs) for v in a.vector
    ]
    coverage = [LabelLayer(c, crs=a.crs) for c in a.coverage] if a.coverage else None
    counts = rasterize_labels(
      a.dem, layers, a.out, area=a.area, coverage=coverage, overwrite=a.overwrite, vector_crs=a.crs
    )
    print(f"{a.out}: pixel counts {counts}")
  elif a.command == "tiles":
    from data_pipelines.tile_writer import write_tiles

    bad = [e for e in a.extra if "=" not in e]
    if bad:
      raise ValueError(f"--extra takes NAME=PATH, got {bad}")
    extras = dict(e.split("=", 1) for e in a.extra)
    check_outputs([a.out], [a.dem, a.label, a.valid, *extras.values()])
    m = write_tiles(
      a.dem,
      a.out,
      label=a.label,
      valid=a.valid,
      extras=extras,
      tile_size=a.tile_size,
      stride=a.stride,
      block_px=a.block_px,
      min_valid=a.min_valid,
      min_labelled=a.min_labelled,
      dtype=a.dtype,
      seed=a.seed,
      tiles_per_shard=a.tiles_per_shard,
      overwrite=a.overwrite,
      band=a.band,
      cell_size_m=a.cell_size_m,
    )
    _summary(m)
  elif a.command == "delft":
    from data_pipelines.prepare import prepare_delft

    check_outputs([a.out], [])
    for task in ("buildings", "roads") if a.task == "both" else (a.task,):
      m = prepare_delft(
        Path(a.out) / task,
        task,
        cell_size=a.cell_size,
        tile_size=a.tile_size,
        stride=a.stride,
        block_px=a.block_px,
        dtype=a.dtype,
        label_source=a.label_source,
        min_valid=a.min_valid,
        min_labelled=a.min_labelled,
        seed=a.seed,
        overwrite=a.overwrite,
      )
      _summary(m)
  elif a.command == "area":
    from data_pipelines.areas import get_area, prepare_area

    optional = {} if a.min_valid is None else {"min_valid": a.min_valid}
    for task in a.task or get_area(a.name).tasks:
      m = prepare_area(
        a.name,
        Path(a.out) / task,
        task,
        a.cell_size,
        a.tile_size,
        a.stride,
        block_px=a.block_px,
        holdout=a.holdout,
        dtype=a.dtype,
        min_labelled=a.min_labelled,
        seed=a.seed,
        overwrite=a.overwrite,
        **optional,
      )
      _summary(m)
  elif a.command == "corpus":
    from data_pipelines.pretrain_corpus import CORPUS_JSON, build_corpus

    c = build_corpus(a.out, a.cell_size, paper=a.paper_splits, exclude=tuple(a.exclude))
    for s in c["sources"]:
      print(
        f"{s['name']:16s} {s['role']:5s} {s['cell_size']:g} m  kept {s['km2']['kept']:.3f} km2  "
        f"masked {s['km2']['masked']:.3f} km2"
      )
    print(
      f"{Path(a.out) / CORPUS_JSON}: train {c['km2']['train']['kept']:.3f} km2 kept, "
      f"{c['km2']['train']['masked']:.3f} km2 masked; eval {c['km2']['eval']['kept']:.3f} km2"
    )
  elif a.command == "corpus-beam":
    _corpus_beam(a)
  elif a.command == "check":
    from data_pipelines.reader import check_tile_set

    counts = check_tile_set(a.manifest)
    print(
      f"{a.manifest}: every record of every shard decodes as the manifest says: "
      + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
  elif a.command == "normalisation-report":
    from data_pipelines.atomic import atomic_file
    from data_pipelines.normalisation_report import normalisation_report, report_markdown

    check_outputs([a.json], [])
    report = normalisation_report(tuple(a.tile_sizes), a.cell_size, a.scale_m)
    print(report_markdown(report))
    if a.json:
      with atomic_file(a.json, a.overwrite) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
  return 0


def _corpus_beam(a: argparse.Namespace) -> None:
  from data_pipelines import corpus_beam as cb

  inputs = [cb.CorpusInput(p, a.crs) for p in a.inputs]
  for spec in a.source:
    if len(spec) > 4:
      raise ValueError(f"--source takes PATTERN [CRS [CELL_SIZE [ROLE]]], got {spec}")
    pattern, crs, cell, role = [*spec, None, None, None][:4]
    inputs.append(
      cb.CorpusInput(
        pattern, None if crs in (None, "-") else crs, float(cell) if cell else None, role or "train"
      )
    )
  if a.shared_data:
    inputs += cb.shared_inputs(a.cell_size, srtm=a.srtm)
  if not inputs:
    raise ValueError("no inputs: give paths/globs, --source or --shared-data")
  if (
    a.held_out == "corpus"
  ):  # the splits are prepared locally: in the output, or beside the project for gs://
    cache = (
      str(Path(__file__).resolve().parent.parent / "runs" / "held_out_splits")
      if "://" in a.out
      else a.out
    )
    held_out = cb.held_out_from_corpus(cache, a.cell_size)
  else:
    held_out = () if a.held_out == "none" else cb.held_out_from_file(a.held_out)
  opts = cb.BuildOptions(
    out_dir=a.out,
    cell_size=a.cell_size,
    tile_size=a.tile_size,
    stride=a.stride,
    max_nodata=a.max_nodata,
    min_relief=a.min_relief,
    dtype=a.dtype,
    tiles_per_shard=a.tiles_per_shard,
    window_px=a.window_px,
    lidar_products=tuple(a.lidar_products),
    held_out=held_out,
  )
  m = cb.build_corpus_beam(inputs, opts, a.beam_args)
  t = m["totals"]
  print(
    f"{a.out}/{cb.MANIFEST}: {t['tiles']} tiles from {t['sources']} sources ({t['km2']:.3f} km2); "
    f"skipped {t['skipped']}; {t['quarantined']} quarantined"
  )
  for q in m["quarantined"]:
    print(f"  quarantined: {q['reason']}")  # the reason starts with the file


def _summary(manifest_path: Path) -> None:
  m = json.loads(Path(manifest_path).read_text())
  counts = ", ".join(f"{s} {v['count']}" for s, v in m["splits"].items())
  subsets = ", ".join(f"{s} {v['count']}" for s, v in m["subsets"].items()) or "none"
  print(
    f"{manifest_path}: {m['tile_size']} px tiles at {m['cell_size']:g} m: {counts}; "
    f"few-label subsets: {subsets}; skipped {m['skipped']}"
  )


if __name__ == "__main__":
  from demmae_jax.train import cli

  cli.exit(main())
