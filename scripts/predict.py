"""Predict a finetuned segmenter over an elevation GeoTIFF (or a LAS/LAZ point cloud) of any size.

  python scripts/predict.py --workdir runs/buildings --input dsm.tif --output buildings.tif \
      [--probabilities p.tif] [--uncertainty u.tif] [--polygons buildings.gpkg] [--png preview.png]

Sliding windows of the model's tile size with --overlap, blended with a 2-D Hann weight, read and
written block by block (memory does not grow with the raster: benchmarks/predict_memory.py),
batched over the devices. Rasters are Cloud-Optimized GeoTIFFs (docs/gis_outputs.md). The classes
GeoTIFF has the input's CRS, transform and size, uint8 with
255 = nodata (where the input is nodata/NaN), deflate-compressed and tiled. A LAS/LAZ input is
first rasterised to a DSM at the model's cell size (data_pipelines.lidar; --crs when the header
has none). Refused with a clear error (`predict: error: <file>: <problem>`, exit 2), before any
work: an output that is an input (also through a symlink or hard link) or a file of the workdir,
an output folder that cannot be written, a multi-band raster without --band, a raster without CRS
without --crs, a geographic CRS (degrees; reproject, or give --cell_size_m), a cell size other
than the model's in metres (unless --allow_other_cell_size), and any existing output unless
--overwrite. A raster with no valid pixel is an error; one more than half nodata, a warning.
Outputs are written atomically; SIGTERM removes the temporaries and says what was written.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Finetuning workdir (scripts/finetune.py).")
_INPUT = flags.DEFINE_string("input", None, "Elevation GeoTIFF, or a .las/.laz point cloud.")
_OUTPUT = flags.DEFINE_string("output", None, "Classes GeoTIFF to write.")
_PROBS = flags.DEFINE_string("probabilities", None, "Also write class probabilities (GeoTIFF).")
_POLYGONS = flags.DEFINE_string(
  "polygons",
  None,
  "Also write polygons of the positive class "
  "(.gpkg or .geojson) with area, perimeter, mean probability, source, "
  "model and, for buildings, height above ground (docs/gis_outputs.md).",
)
_REGULARISE = flags.DEFINE_bool("regularise", False, "Polygons with right angles (holes kept).")
_SIMPLIFY = flags.DEFINE_float("simplify_m", 0.0, "Simplify polygons with this tolerance (m).")
_MIN_AREA = flags.DEFINE_float("min_area_m2", 0.0, "Drop polygons smaller than this (m2).")
_DTM = flags.DEFINE_string(
  "dtm",
  None,
  "Terrain model on the input's grid. A DSM input with an nDSM "
  "model is predicted on DSM - DTM; building heights = DSM - DTM (default: "
  "the input itself for an nDSM model, else estimated from the DSM alone).",
)
_UNCERTAINTY = flags.DEFINE_string(
  "uncertainty",
  None,
  "Also write the per-pixel uncertainty (normalised "
  "entropy of the probabilities, 0 sure .. 1 unsure; COG). Best with --tta.",
)
_STAC = flags.DEFINE_string(
  "stac",
  None,
  "Also write a STAC Item (JSON) describing the outputs, "
  "the model and the source (demmae_jax/gis/stac.py).",
)
_PNG = flags.DEFINE_string("png", None, "Also write a preview PNG (DEM | classes), decimated.")
_OUTLINE = flags.DEFINE_enum(
  "outline",
  "wall",
  ["wall", "roof"],
  "Building outlines as the training "
  "labels draw them (wall: cadastral footprints) or as roof edges with "
  "their eaves (roof: grown by --eave_m; demmae_jax/inference/outline.py).",
)
_EAVE = flags.DEFINE_float(
  "eave_m", 1.0, "Eave width for --outline roof (m; 1 m measured on AHN3)."
)
_MIN_HEIGHT = flags.DEFINE_float(
  "min_height_m",
  None,
  "Building models on height above ground: cells lower than this are background whatever the "
  "network says (default 2 m, demmae_jax/inference/segmenter.py; 0 turns it off).",
)
_MAX_DENSITY = flags.DEFINE_float(
  "max_density",
  None,
  "LAS/LAZ input: thin a denser survey to this many points per m2 before rasterising, to the "
  "density the model learnt from (a dense survey draws tree crowns smoother; off by default: "
  "docs/gis_outputs.md).",
)
_STEP = flags.DEFINE_string("step", "best", "Checkpoint: best, latest, or a step number.")
_BAND = flags.DEFINE_integer("band", None, "Band holding the elevation (required if several).")
_CRS = flags.DEFINE_string("crs", None, "CRS of an input without one, e.g. EPSG:28992.")
_WINDOW = flags.DEFINE_integer(
  "window",
  None,
  "Window side in pixels (default: the training tile). "
  "A UNet reads larger windows (e.g. 256): more surroundings per pixel.",
)
_TTA = flags.DEFINE_bool(
  "tta", False, "Average the 8 square symmetries (8x the compute, steadier maps)."
)
_OVERLAP = flags.DEFINE_integer("overlap", None, "Window overlap in pixels (default window / 4).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Windows per device batch (x device count).")
_BLOCK = flags.DEFINE_integer("block", 1024, "Output block side in pixels (sets the memory).")
_OTHER_CELL = flags.DEFINE_bool(
  "allow_other_cell_size",
  False,
  "Predict even if the input's cell size differs from the training tiles' (results will suffer).",
)
_CELL_M = flags.DEFINE_float(
  "cell_size_m",
  None,
  "The input's cell size in metres, when its CRS does not say (geographic or local CRSs).",
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing outputs.")
flags.mark_flags_as_required(["workdir", "input", "output"])


def _outputs():
  from demmae_jax.predict import Outputs

  return Outputs(
    classes=_OUTPUT.value,
    probabilities=_PROBS.value,
    uncertainty=_UNCERTAINTY.value,
    polygons=_POLYGONS.value,
    png=_PNG.value,
    stac=_STAC.value,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from demmae_jax import predict
  from demmae_jax.gis.polygons import PolygonOptions

  options = predict.Options(
    step=_STEP.value,
    band=_BAND.value,
    crs=_CRS.value,
    cell_size_m=_CELL_M.value,
    allow_other_cell_size=_OTHER_CELL.value,
    dtm=_DTM.value,
    window=_WINDOW.value,
    overlap=_OVERLAP.value,
    tta=_TTA.value,
    batch_size=_BATCH.value,
    block=_BLOCK.value,
    outline=_OUTLINE.value,
    eave_m=_EAVE.value,
    min_height_m=_MIN_HEIGHT.value,
    max_density=_MAX_DENSITY.value,
    polygon=PolygonOptions(
      simplify_m=_SIMPLIFY.value, regularise=_REGULARISE.value, min_area_m2=_MIN_AREA.value
    ),
    overwrite=_OVERWRITE.value,
  )
  summary = predict.predict(_WORKDIR.value, _INPUT.value, _outputs(), options)
  if predict.nodata_share(summary) > 0.5:
    print(
      f"predict: warning: {predict.nodata_share(summary):.0%} of {_INPUT.value} is nodata "
      f"(nodata value, NaN or inf): those pixels are nodata (255) in {_OUTPUT.value}",
      file=sys.stderr,
    )
  print(json.dumps(summary, indent=1))
  print(f"predict: wrote {', '.join(_outputs().paths())}")
  return 0


def on_terminate(before: dict) -> str:
  """What a SIGTERM left: outputs are committed only at the end, so usually none."""
  from demmae_jax.predict import fingerprint

  outputs = _outputs().paths()
  written = [p for p in outputs if fingerprint(p) != before.get(p)]
  if not written:
    return (
      "no output was written or changed (" + ", ".join(outputs) + "); temporaries were "
      "removed. Rerun the same command to predict"
    )
  return (
    f"written before the signal: {', '.join(written)}; not written: "
    f"{', '.join(p for p in outputs if p not in written) or 'none'}; temporaries were removed"
  )


def guarded_main(argv):
  """main, reporting on SIGTERM which outputs were (not) written."""
  from demmae_jax.predict import fingerprint
  from demmae_jax.train import cli

  before = {p: fingerprint(p) for p in _outputs().paths()}
  try:
    with cli.sigterm_raises():
      return main(argv)
  except cli.Terminated:
    print(f"predict: stopped by SIGTERM: {on_terminate(before)}", file=sys.stderr, flush=True)
    return cli.EXIT_SIGTERM


if __name__ == "__main__":
  from demmae_jax.train import cli

  cli.run(guarded_main)
