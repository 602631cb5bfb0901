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

import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Finetuning workdir (scripts/finetune.py).")
_INPUT = flags.DEFINE_string("input", None, "Elevation GeoTIFF, or a .las/.laz point cloud.")
_OUTPUT = flags.DEFINE_string("output", None, "Classes GeoTIFF to write.")
_PROBS = flags.DEFINE_string("probabilities", None, "Also write class probabilities (GeoTIFF).")
_POLYGONS = flags.DEFINE_string("polygons", None, "Also write polygons of the positive class "
                                "(.gpkg or .geojson) with area, perimeter, mean probability, source, "
                                "model and, for buildings, height above ground (docs/gis_outputs.md).")
_REGULARISE = flags.DEFINE_bool("regularise", False, "Polygons with right angles (holes kept).")
_SIMPLIFY = flags.DEFINE_float("simplify_m", 0.0, "Simplify polygons with this tolerance (m).")
_MIN_AREA = flags.DEFINE_float("min_area_m2", 0.0, "Drop polygons smaller than this (m2).")
_DTM = flags.DEFINE_string("dtm", None, "Terrain model on the input's grid. A DSM input with an nDSM "
                           "model is predicted on DSM - DTM; building heights = DSM - DTM (default: "
                           "the input itself for an nDSM model, else estimated from the DSM alone).")
_UNCERTAINTY = flags.DEFINE_string("uncertainty", None, "Also write the per-pixel uncertainty (normalised "
                                   "entropy of the probabilities, 0 sure .. 1 unsure; COG). Best with --tta.")
_STAC = flags.DEFINE_string("stac", None, "Also write a STAC Item (JSON) describing the outputs, "
                            "the model and the source (demmae_jax/gis/stac.py).")
_PNG = flags.DEFINE_string("png", None, "Also write a preview PNG (DEM | classes), decimated.")
_OUTLINE = flags.DEFINE_enum("outline", "wall", ["wall", "roof"], "Building outlines as the training "
                              "labels draw them (wall: cadastral footprints) or as roof edges with "
                              "their eaves (roof: grown by --eave_m; demmae_jax/inference/outline.py).")
_EAVE = flags.DEFINE_float("eave_m", 1.0, "Eave width for --outline roof (m; 1 m measured on AHN3).")
_STEP = flags.DEFINE_string("step", "best", "Checkpoint: best, latest, or a step number.")
_BAND = flags.DEFINE_integer("band", None, "Band holding the elevation (required if several).")
_CRS = flags.DEFINE_string("crs", None, "CRS of an input without one, e.g. EPSG:28992.")
_WINDOW = flags.DEFINE_integer("window", None, "Window side in pixels (default: the training tile). "
                                "A UNet reads larger windows (e.g. 256): more surroundings per pixel.")
_TTA = flags.DEFINE_bool("tta", False, "Average the 8 square symmetries (8x the compute, steadier maps).")
_OVERLAP = flags.DEFINE_integer("overlap", None, "Window overlap in pixels (default window / 4).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Windows per device batch (x device count).")
_BLOCK = flags.DEFINE_integer("block", 1024, "Output block side in pixels (sets the memory).")
_OTHER_CELL = flags.DEFINE_bool("allow_other_cell_size", False, "Predict even if the input's cell "
                                "size differs from the training tiles' (results will suffer).")
_CELL_M = flags.DEFINE_float("cell_size_m", None, "The input's cell size in metres, when its CRS "
                             "does not say (geographic or local CRSs).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing outputs.")
flags.mark_flags_as_required(["workdir", "input", "output"])


def check_cell_size(path: str, spec: dict, allow: bool, crs=None, given_m: float | None = None) -> float:
  """The input's cell size in metres (data_pipelines.raster_io.cell_size_m: a geographic CRS is
  refused, feet are converted), refused if it is not the model's unless `allow`."""
  from data_pipelines.errors import DataError
  from data_pipelines.raster_io import cell_size_m, open_raster
  with open_raster(path) as src:
    size = cell_size_m(src, crs, given_m, flag="--cell_size_m")
  want = spec["cell_size"]
  if not allow and abs(size - want) > 0.01 * want:
    raise DataError(path, f"cell size {size:g} m but the model was trained on {want:g} m tiles; "
                    f"resample the raster (gdalwarp -tr ...) to {want:g} m cells or pass "
                    f"--allow_other_cell_size")
  return size


def preview(dem_path: str, band: int, classes_path: str, out: Path, overwrite: bool,
            max_side: int = 1500) -> None:
  """DEM | classes, read decimated (rasterio out_shape) so memory stays small."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import rasterio
  from matplotlib.colors import ListedColormap

  from data_pipelines.atomic import atomic_file
  with rasterio.open(dem_path) as src:
    scale = max(1, int(np.ceil(max(src.height, src.width) / max_side)))
    shape = (src.height // scale or 1, src.width // scale or 1)
    dem = src.read(band, out_shape=shape, masked=True).astype(np.float32).filled(np.nan)
  with rasterio.open(classes_path) as src:
    classes = src.read(1, out_shape=shape).astype(np.float32)
  classes[classes == 255] = np.nan
  fig, axes = plt.subplots(1, 2, figsize=(12, 6 * shape[0] / shape[1] + 0.6))
  lo, hi = np.nanpercentile(dem, [1, 99])
  axes[0].imshow(dem, cmap="terrain", vmin=lo, vmax=hi, interpolation="nearest")
  cmap = ListedColormap(["#f2f2f2", "#e6194b", "#3cb44b", "#4363d8"])
  cmap.set_bad("0.55")
  axes[1].imshow(classes, cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
  for ax, title in zip(axes, ["elevation", "prediction (grey: nodata)"]):
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  with atomic_file(out, overwrite) as tmp:
    fig.savefig(tmp, dpi=100, format="png")
  plt.close(fig)


def write_polygons(source: str, spec: dict, probs, model: str, dtm: str | None) -> dict:
  """The positive class's polygons with their attributes (demmae_jax.gis.polygons)."""
  from demmae_jax.gis import polygons
  from demmae_jax.inference.segmenter import input_raster_name
  name = spec["class_names"][1]
  heights = None
  if name == "building":
    if input_raster_name(spec) == "ndsm":
      heights = polygons.HeightSource(ndsm=source)
    else:
      heights = polygons.HeightSource(dsm=source, dtm=dtm)
  opts = polygons.PolygonOptions(simplify_m=_SIMPLIFY.value, regularise=_REGULARISE.value,
                                 min_area_m2=_MIN_AREA.value)
  try:
    return polygons.write_class_polygons(
        _OUTPUT.value, _POLYGONS.value, value=1, name=name, opts=opts, probabilities=probs,
        heights=heights, source=Path(_INPUT.value).name, model=model, overwrite=_OVERWRITE.value)
  finally:
    if heights is not None:
      heights.close()


def _outputs() -> list[str]:
  return [p for p in (_OUTPUT.value, _PROBS.value, _POLYGONS.value, _UNCERTAINTY.value, _PNG.value,
                      _STAC.value) if p]


def _fingerprint(path) -> tuple | None:
  try:
    st = os.stat(path)
  except OSError:
    return None
  return st.st_ino, st.st_mtime_ns, st.st_size


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from data_pipelines.atomic import check_outputs, scratch_dir
  from demmae_jax.inference import raster as predict
  from demmae_jax.inference.apply import make_apply
  from demmae_jax.inference.restore import load_trained
  from demmae_jax.inference.segmenter import (
    check_window,
    input_normalise,
    input_raster_name,
    read_spec,
  )

  outputs = _outputs()
  workdir = Path(_WORKDIR.value)
  # before any (slow) work: no output may be an input (also through links), all must be writable
  check_outputs(outputs, [_INPUT.value, _DTM.value, workdir, *workdir.glob("*.json"),
                          workdir / "checkpoints"])
  if _POLYGONS.value:
    from demmae_jax.gis.vector_io import check_vector_path
    check_vector_path(_POLYGONS.value)
  existing = [p for p in outputs if Path(p).exists()]
  if existing and not _OVERWRITE.value:
    raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")
  if not Path(_INPUT.value).exists():
    raise FileNotFoundError(2, "No such file or directory", _INPUT.value)
  spec = read_spec(workdir)
  if _OUTLINE.value == "roof" and spec["class_names"][1] != "building":
    raise ValueError(f"{workdir}: --outline roof is for building models, this one maps "
                     f"{spec['class_names'][1]!r}")
  if Path(_INPUT.value).suffix.lower() not in (".las", ".laz"):  # the raster checked before the model loads
    src, _ = predict.open_elevation(_INPUT.value, _BAND.value, _CRS.value)
    src.close()
    check_cell_size(_INPUT.value, spec, _OTHER_CELL.value, _CRS.value, _CELL_M.value)
    if input_raster_name(spec) == "ndsm" and not _DTM.value:  # a DSM would map as all "tall"
      predict.check_height_above_ground(_INPUT.value, _BAND.value)
  model, spec, step = load_trained(workdir, _STEP.value if _STEP.value in ("best", "latest")
                                   else int(_STEP.value))
  tile = _WINDOW.value or spec["tile_size"]
  check_window(spec, tile)
  opts = predict.PredictOptions(
      tile=tile, overlap=tile // 4 if _OVERLAP.value is None else _OVERLAP.value,
      batch_size=_BATCH.value, block=_BLOCK.value, band=_BAND.value,
      class_names=tuple(spec["class_names"]))
  with scratch_dir(_OUTPUT.value) as scratch:
    source, band, dtm = _INPUT.value, _BAND.value, _DTM.value
    if Path(source).suffix.lower() in (".las", ".laz"):
      from data_pipelines.lidar import inspect_las, las_to_rasters
      from data_pipelines.raster_io import metres_per_unit
      unit = metres_per_unit(inspect_las(source, _CRS.value).crs, source, "--cell_size_m")
      rasters = las_to_rasters([source], scratch, cell_size=spec["cell_size"] / unit, crs=_CRS.value)
      # an nDSM model reads height above the LiDAR's own ground
      source = str(rasters["ndsm" if input_raster_name(spec) == "ndsm" else "dsm"])
      dtm = str(rasters["dtm"])  # building heights above the LiDAR's own ground
      band = None
    elif input_raster_name(spec) == "ndsm" and dtm:  # an nDSM model reads DSM - DTM
      from data_pipelines.prepare import height_above_ground
      source = str(height_above_ground(source, dtm, scratch / "ndsm.tif"))
      band = None
    opts = dataclasses.replace(opts, band=band)  # a raster made here has one band
    check_cell_size(source, spec, _OTHER_CELL.value, _CRS.value, _CELL_M.value)
    probs = _PROBS.value or (scratch / "probabilities.tif" if _UNCERTAINTY.value or _POLYGONS.value
                             else None)
    summary = predict.predict_raster(
        source, _OUTPUT.value, make_apply(model, _BATCH.value, _TTA.value),
        input_normalise(spec), opts,
        probabilities_path=probs, crs=_CRS.value,
        overwrite=_OVERWRITE.value)
    if _OUTLINE.value == "roof":
      from demmae_jax.inference.outline import convert_raster
      counts = convert_raster(_OUTPUT.value, _OUTPUT.value, _EAVE.value)
      summary["pixels_per_class"] = {n: int(counts[i]) for i, n in enumerate(spec["class_names"])}
      summary["outline"] = f"roof (walls grown by {_EAVE.value:g} m)"
    if _UNCERTAINTY.value:
      from demmae_jax.gis.uncertainty import write_uncertainty
      summary["uncertainty"] = str(write_uncertainty(probs, _UNCERTAINTY.value, _OVERWRITE.value))
    summary["probabilities"] = _PROBS.value
    if _POLYGONS.value:
      summary["polygons"] = write_polygons(source, spec, probs, f"{workdir} step {step}", dtm)
    if _PNG.value:
      preview(source, band or 1, _OUTPUT.value, Path(_PNG.value), _OVERWRITE.value)
    if _STAC.value:
      from demmae_jax.gis.stac import write_item
      write_item(_STAC.value, {"classes": _OUTPUT.value, "probabilities": _PROBS.value,
                               "uncertainty": _UNCERTAINTY.value, "polygons": _POLYGONS.value,
                               "png": _PNG.value}, class_names=spec["class_names"],
                 source=_INPUT.value, model=f"{workdir} step {step}", overwrite=_OVERWRITE.value,
                 properties={"demmae:tta": _TTA.value, "demmae:window": tile})
      summary["stac"] = _STAC.value
  total = sum(summary["pixels_per_class"].values()) + summary["nodata_pixels"]
  if summary["nodata_pixels"] > 0.5 * total:
    print(f"predict: warning: {summary['nodata_pixels'] / total:.0%} of {_INPUT.value} is nodata "
          f"(nodata value, NaN or inf): those pixels are nodata (255) in {_OUTPUT.value}",
          file=sys.stderr)
  summary.update(workdir=_WORKDIR.value, step=step, input=_INPUT.value, png=_PNG.value)
  print(json.dumps(summary, indent=1))
  print(f"predict: wrote {', '.join(outputs)}")
  return 0


def on_terminate(before: dict) -> str:
  """What a SIGTERM left: outputs are committed only at the end, so usually none."""
  outputs = _outputs()
  written = [p for p in outputs if _fingerprint(p) != before.get(p)]
  if not written:
    return ("no output was written or changed (" + ", ".join(outputs) + "); temporaries were "
            "removed. Rerun the same command to predict")
  return (f"written before the signal: {', '.join(written)}; not written: "
          f"{', '.join(p for p in outputs if p not in written) or 'none'}; temporaries were removed")


def guarded_main(argv):
  """main, reporting on SIGTERM which outputs were (not) written."""
  from demmae_jax.train import cli
  outputs = _outputs()
  before = {p: _fingerprint(p) for p in outputs}
  try:
    with cli.sigterm_raises():
      return main(argv)
  except cli.Terminated:
    print(f"predict: stopped by SIGTERM: {on_terminate(before)}", file=sys.stderr, flush=True)
    return cli.EXIT_SIGTERM


if __name__ == "__main__":
  from demmae_jax.train import cli
  cli.run(guarded_main)
