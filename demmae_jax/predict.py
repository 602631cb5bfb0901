"""The predict stage: a finetuned segmenter over an elevation GeoTIFF (or a LAS/LAZ point cloud)
of any size, to the GIS products a user opens (classes, probabilities, uncertainty, polygons,
preview, STAC Item).

  from demmae_jax import predict
  summary = predict.predict("runs/buildings", "dsm.tif",
                            predict.Outputs(classes="buildings.tif", polygons="buildings.gpkg"),
                            predict.Options(tta=True))

`scripts/predict.py` is its command line. Sliding windows and block-wise I/O are
`inference.raster.predict_raster`; this module checks the inputs before any slow work, prepares
the model's input raster (a point cloud rasterised, an nDSM from DSM - DTM) in a scratch folder
beside the output, and writes the products. Every check raises before the model loads:
an output that is an input (also through links) or a file of the workdir, an output folder that
cannot be written, an existing output without `overwrite`, a multi-band raster without `band`, a
raster without CRS without `crs`, a geographic CRS without `cell_size_m`, a cell size other than
the model's (unless `allow_other_cell_size`). A raster with no valid pixel is an error. Outputs
are written atomically.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from demmae_jax.gis.polygons import PolygonOptions


@dataclasses.dataclass(frozen=True)
class Outputs:
  """Where to write each product; only `classes` is required."""

  classes: str
  probabilities: str | None = None  # class probabilities (COG)
  uncertainty: str | None = None  # normalised entropy, 0 sure .. 1 unsure (COG)
  polygons: str | None = None  # the positive class as polygons with attributes (.gpkg/.geojson)
  png: str | None = None  # preview: elevation | classes, decimated
  stac: str | None = None  # a STAC Item describing the other outputs

  def paths(self) -> list[str]:
    return [str(p) for p in dataclasses.astuple(self) if p]


@dataclasses.dataclass(frozen=True)
class Options:
  step: str | int = "best"  # checkpoint: best, latest or a step number (int or its digits)
  band: int | None = None  # the band holding the elevation (required if several)
  crs: str | None = None  # CRS of an input without one
  cell_size_m: float | None = None  # the input's cell size when its CRS does not say
  allow_other_cell_size: bool = False
  dtm: str | None = None  # terrain model on the input's grid (nDSM models; building heights)
  window: int | None = None  # window side in pixels (default: the training tile)
  overlap: int | None = None  # window overlap in pixels (default window / 4)
  tta: bool = False  # average the 8 square symmetries
  batch_size: int = 16  # windows per device batch
  block: int = 1024  # output block side in pixels (sets the memory)
  outline: str = "wall"  # building outlines as wall lines (the labels') or roof edges ("roof")
  eave_m: float = 1.0  # eave width for outline="roof" (1 m measured on AHN3)
  # building models on nDSM: cells lower than this above ground are background (None: the model's
  # segmenter.min_height_m, 2 m; 0: off)
  min_height_m: float | None = None
  # LAS/LAZ input: thin a denser survey to this many points per m2 before rasterising (None: all
  # points; data_pipelines/lidar.py says why)
  max_density: float | None = None
  polygon: PolygonOptions = PolygonOptions()
  overwrite: bool = False


def predict(
  workdir: str | Path, source: str | Path, outputs: Outputs, options: Options = Options()
) -> dict:
  """Predict `workdir`'s model over `source` and write `outputs`; returns a summary (pixels per
  class, nodata pixels, the outputs written, the checkpoint step)."""
  from data_pipelines.atomic import check_outputs, scratch_dir
  from demmae_jax.inference import raster
  from demmae_jax.inference.apply import make_apply
  from demmae_jax.inference.restore import load_trained
  from demmae_jax.inference.segmenter import (
    check_window,
    input_normalise,
    input_raster_name,
    min_height_m,
    read_spec,
  )

  o = options
  workdir, source = Path(workdir), str(source)
  paths = outputs.paths()
  # before any (slow) work: no output may be an input (also through links), all must be writable
  check_outputs(paths, [source, o.dtm, workdir, *workdir.glob("*.json"), workdir / "checkpoints"])
  if outputs.polygons:
    from demmae_jax.gis.vector_io import check_vector_path

    check_vector_path(outputs.polygons)
  existing = [p for p in paths if Path(p).exists()]
  if existing and not o.overwrite:
    raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")
  if not Path(source).exists():
    raise FileNotFoundError(2, "No such file or directory", source)
  if o.outline not in ("wall", "roof"):
    raise ValueError(f"outline must be 'wall' or 'roof', not {o.outline!r}")
  spec = read_spec(workdir)
  if o.outline == "roof" and spec["class_names"][1] != "building":
    raise ValueError(
      f"{workdir}: --outline roof is for building models, this one maps {spec['class_names'][1]!r}"
    )
  gate = min_height_m(spec)
  if o.min_height_m is not None:
    if o.min_height_m < 0:
      raise ValueError(f"--min_height_m must be >= 0 (0 turns the gate off), not {o.min_height_m}")
    if o.min_height_m and gate is None:
      raise ValueError(
        f"{workdir}: --min_height_m is for building models on height above ground; this one "
        f"maps {spec['class_names'][1]!r} from {spec['normalisation']['mode']!r} input"
      )
    gate = o.min_height_m or None
  point_cloud = Path(source).suffix.lower() in (".las", ".laz")
  if o.max_density is not None and not point_cloud:
    raise ValueError(f"--max_density thins a LAS/LAZ point cloud; {source} is a raster")
  if not point_cloud:  # the raster checked before the model loads
    src, _ = raster.open_elevation(source, o.band, o.crs)
    src.close()
    check_cell_size(source, spec, o.allow_other_cell_size, o.crs, o.cell_size_m)
    if input_raster_name(spec) == "ndsm" and not o.dtm:  # a DSM would map as all "tall"
      raster.check_height_above_ground(source, o.band)
  model, spec, step = load_trained(workdir, o.step if o.step in ("best", "latest") else int(o.step))
  tile = o.window or spec["tile_size"]
  check_window(spec, tile)
  opts = raster.PredictOptions(
    tile=tile,
    overlap=tile // 4 if o.overlap is None else o.overlap,
    batch_size=o.batch_size,
    block=o.block,
    band=o.band,
    class_names=tuple(spec["class_names"]),
    min_height=gate,
  )
  model_name = f"{workdir} step {step}"
  with scratch_dir(outputs.classes) as scratch:
    source_used, band, dtm = source, o.band, o.dtm
    if point_cloud:
      from data_pipelines.lidar import inspect_las, las_to_rasters
      from data_pipelines.raster_io import metres_per_unit

      unit = metres_per_unit(inspect_las(source, o.crs).crs, source, "--cell_size_m")
      rasters = las_to_rasters(
        [source],
        scratch,
        cell_size=spec["cell_size"] / unit,
        crs=o.crs,
        max_density=o.max_density,
      )
      # an nDSM model reads height above the LiDAR's own ground
      source_used = str(rasters["ndsm" if input_raster_name(spec) == "ndsm" else "dsm"])
      dtm = str(rasters["dtm"])  # building heights above the LiDAR's own ground
      band = None
    elif input_raster_name(spec) == "ndsm" and dtm:  # an nDSM model reads DSM - DTM
      from data_pipelines.prepare import height_above_ground

      source_used = str(height_above_ground(source, dtm, scratch / "ndsm.tif"))
      band = None
    opts = dataclasses.replace(opts, band=band)  # a raster made here has one band
    check_cell_size(source_used, spec, o.allow_other_cell_size, o.crs, o.cell_size_m)
    probs = outputs.probabilities or (
      scratch / "probabilities.tif" if outputs.uncertainty or outputs.polygons else None
    )
    summary = raster.predict_raster(
      source_used,
      outputs.classes,
      make_apply(model, o.batch_size, o.tta),
      input_normalise(spec),
      opts,
      probabilities_path=probs,
      crs=o.crs,
      overwrite=o.overwrite,
    )
    if o.outline == "roof":
      from demmae_jax.inference.outline import convert_raster

      counts = convert_raster(outputs.classes, outputs.classes, o.eave_m)
      summary["pixels_per_class"] = {n: int(counts[i]) for i, n in enumerate(spec["class_names"])}
      summary["outline"] = f"roof (walls grown by {o.eave_m:g} m)"
    if outputs.uncertainty:
      from demmae_jax.gis.uncertainty import write_uncertainty

      summary["uncertainty"] = str(write_uncertainty(probs, outputs.uncertainty, o.overwrite))
    summary["probabilities"] = outputs.probabilities
    if outputs.polygons:
      summary["polygons"] = _write_polygons(
        source_used, Path(source).name, spec, probs, outputs, model_name, dtm, o
      )
    if outputs.png:
      preview(source_used, band or 1, outputs.classes, Path(outputs.png), o.overwrite)
    if outputs.stac:
      from demmae_jax.gis.stac import write_item

      write_item(
        outputs.stac,
        {
          "classes": outputs.classes,
          "probabilities": outputs.probabilities,
          "uncertainty": outputs.uncertainty,
          "polygons": outputs.polygons,
          "png": outputs.png,
        },
        class_names=spec["class_names"],
        source=source,
        model=model_name,
        overwrite=o.overwrite,
        properties={"demmae:tta": o.tta, "demmae:window": tile},
      )
      summary["stac"] = outputs.stac
  summary.update(workdir=str(workdir), step=step, input=source, png=outputs.png)
  return summary


def nodata_share(summary: dict) -> float:
  """The share of the input's pixels that were nodata (nodata value, NaN or inf)."""
  total = sum(summary["pixels_per_class"].values()) + summary["nodata_pixels"]
  return summary["nodata_pixels"] / total if total else 0.0


def check_cell_size(
  path: str, spec: dict, allow: bool, crs=None, given_m: float | None = None
) -> float:
  """The input's cell size in metres (data_pipelines.raster_io.cell_size_m: a geographic CRS is
  refused, feet are converted), refused if it is not the model's unless `allow`."""
  from data_pipelines.errors import DataError
  from data_pipelines.raster_io import cell_size_m, open_raster

  with open_raster(path) as src:
    size = cell_size_m(src, crs, given_m, flag="--cell_size_m")
  want = spec["cell_size"]
  if not allow and abs(size - want) > 0.01 * want:
    raise DataError(
      path,
      f"cell size {size:g} m but the model was trained on {want:g} m tiles; "
      f"resample the raster (gdalwarp -tr ...) to {want:g} m cells or pass "
      f"--allow_other_cell_size",
    )
  return size


def preview(
  dem_path: str, band: int, classes_path: str, out: Path, overwrite: bool, max_side: int = 1500
) -> None:
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


def _write_polygons(
  source: str,
  source_name: str,
  spec: dict,
  probs,
  outputs: Outputs,
  model: str,
  dtm: str | None,
  o: Options,
) -> dict:
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
  try:
    return polygons.write_class_polygons(
      outputs.classes,
      outputs.polygons,
      value=1,
      name=name,
      opts=o.polygon,
      probabilities=probs,
      heights=heights,
      source=source_name,
      model=model,
      overwrite=o.overwrite,
    )
  finally:
    if heights is not None:
      heights.close()


def fingerprint(path) -> tuple | None:
  """(inode, mtime, size) of a file, None if absent: tells which outputs a stopped run wrote."""
  try:
    st = os.stat(path)
  except OSError:
    return None
  return st.st_ino, st.st_mtime_ns, st.st_size
