"""One-call preparation of tile sets, for the CLI, the demo and the trainers.

`prepare_delft(out_dir, task="buildings" | "roads")` runs LAZ -> rasters -> labels -> tiles on the
shared Delft set, `prepare_alexandria(out_dir)` GeoTIFF DSM/DTM + footprints -> tiles; both return
the manifest path, and the whole `out_dir` appears atomically.
"""
from __future__ import annotations

from pathlib import Path

from data_pipelines.atomic import atomic_dir
from data_pipelines.errors import DataError
from data_pipelines.labels import LabelLayer, labels_from_class_raster, rasterize_labels
from data_pipelines.lidar import las_to_rasters
from data_pipelines.shared_data import shared_file
from data_pipelines.tile_writer import MANIFEST, write_tiles

DELFT_LAZ = ("delft/ahn3_cropped_1.laz", "delft/ahn3_cropped_2.laz")
DELFT_CRS = "EPSG:28992"  # RD New; the LAZ headers carry no CRS
DELFT_BUILDINGS = "delft/bgt_pand.sqlite"
DELFT_ROADS = "delft/bgt_wegdeel.sqlite"
# Paved traffic areas at street level count as road: carriageway, parking, footpath, pedestrian
# area. From 0.5 m elevation a pavement is indistinguishable from the carriageway beside it (a
# ~0.1 m kerb), so calling it background would teach noise. Stairs ("voetpad op trap") are left
# out: they are not at street level.
DELFT_ROAD_FUNCTIONS = ("rijbaan lokale weg", "parkeervlak", "voetpad", "voetgangersgebied")
TASKS = ("buildings", "roads")


def prepare_delft(out_dir: str | Path, task: str = "buildings", *, cell_size: float = 0.5,
                  tile_size: int = 64, stride: int | None = 32, block_px: int | None = None,
                  dtype: str = "float16", label_source: str = "bgt", min_valid: float = 0.75,
                  min_labelled: float = 0.25, seed: int = 0, overwrite: bool = False,
                  progress: bool = True) -> Path:
  """Delft AHN3 LiDAR + BGT polygons -> `out_dir`/{rasters, labels, tiles}; returns the manifest.

  Labels: task "buildings" from BGT pand (label_source="bgt") or LiDAR class 6 ("lidar");
  task "roads" from BGT wegdeel with `function` in DELFT_ROAD_FUNCTIONS. With BGT labels, pixels
  outside the convex hull of both BGT layers (the crop's mapped area, ~56 % of the LiDAR block)
  are 255 = ignore. Tiles carry elevation (DSM), validity, label, and DTM/nDSM channels.
  `min_valid` is 0.75 because at 0.5 m ~6 % of cells get no return (scan gaps, interpolated but
  marked invalid) besides the canal's; 0.9 would drop a quarter of the tiles.
  """
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  if label_source not in ("bgt", "lidar") or (task == "roads" and label_source != "bgt"):
    raise ValueError(f"label_source must be 'bgt' (or 'lidar' for buildings), got {label_source!r}")
  out_dir = Path(out_dir)
  try:
    return _prepare_delft(out_dir, task, cell_size, tile_size, stride, block_px, dtype, label_source,
                          min_valid, min_labelled, seed, overwrite, progress)
  except DataError as e:
    if ".tmp" not in e.path:
      raise
    raise DataError(out_dir, e.problem) from e  # the temporary folder is gone: name the target


def _prepare_delft(out_dir, task, cell_size, tile_size, stride, block_px, dtype, label_source, min_valid,
                   min_labelled, seed, overwrite, progress) -> Path:
  with atomic_dir(out_dir, overwrite) as tmp:
    rasters = las_to_rasters([shared_file(p) for p in DELFT_LAZ], tmp / "rasters", cell_size=cell_size,
                             crs=DELFT_CRS, progress=progress)
    label_tif = tmp / "labels" / f"{task}.tif"
    coverage = [LabelLayer(shared_file(DELFT_BUILDINGS)), LabelLayer(shared_file(DELFT_ROADS))]
    if task == "roads":
      layer = LabelLayer(shared_file(DELFT_ROADS), field="function", values=DELFT_ROAD_FUNCTIONS)
      rasterize_labels(rasters["dsm"], [layer], label_tif, coverage=coverage)
    elif label_source == "bgt":
      rasterize_labels(rasters["dsm"], [LabelLayer(shared_file(DELFT_BUILDINGS))], label_tif, coverage=coverage)
    else:
      labels_from_class_raster(rasters["class"], label_tif, classes=(6,), valid_path=rasters["valid"])
    write_tiles(rasters["dsm"], tmp / "tiles", label=label_tif, valid=rasters["valid"],
                extras={"dtm": rasters["dtm"], "ndsm": rasters["ndsm"]}, tile_size=tile_size,
                stride=stride, block_px=block_px, min_valid=min_valid, min_labelled=min_labelled,
                seed=seed, dtype=dtype, label_names={0: "background", 1: task[:-1]}, progress=progress,
                extra_manifest={"preset": {
                    "name": "delft", "task": task, "label_source": label_source,
                    "laz": list(DELFT_LAZ), "crs": DELFT_CRS,
                    "road_functions": list(DELFT_ROAD_FUNCTIONS) if task == "roads" else None,
                    "labelled_area": "convex hull of bgt_pand + bgt_wegdeel" if label_source == "bgt" else "LiDAR returns"}})
  return out_dir / "tiles" / MANIFEST


ALEXANDRIA_DSM = "alexandria/dsm.tif"
ALEXANDRIA_DTM = "alexandria/dtm.tif"
ALEXANDRIA_BUILDINGS = "alexandria/buildings.geojson"  # EPSG:4326, reprojected onto the DEM


def height_above_ground(dsm: str | Path, dtm: str | Path, out: str | Path, overwrite: bool = False) -> Path:
  """nDSM = max(DSM - DTM, 0) on the DSM's grid; NaN where either is nodata."""
  import numpy as np
  import rasterio
  from data_pipelines.atomic import atomic_file
  from data_pipelines.errors import DataError
  from data_pipelines.raster_io import open_raster, read_band
  with open_raster(dsm) as a, open_raster(dtm) as b:
    if a.crs != b.crs or a.transform != b.transform or a.shape != b.shape:
      raise DataError(dtm, f"grid or CRS differs from {dsm}")
    top, ground = (read_band(r, masked=True).astype(np.float32) for r in (a, b))
    profile = a.profile
  ndsm = np.ma.maximum(top - ground, 0).filled(np.nan)
  profile.update(dtype="float32", nodata=np.nan, count=1)
  with atomic_file(out, overwrite) as tmp:
    with rasterio.open(tmp, "w", **profile) as sink:
      sink.write(ndsm, 1)
  return Path(out)


def prepare_alexandria(out_dir: str | Path, *, tile_size: int = 64, stride: int | None = 32,
                       block_px: int | None = None, dtype: str = "float16", min_valid: float = 0.9,
                       min_labelled: float = 0.25, seed: int = 0, overwrite: bool = False,
                       progress: bool = True) -> Path:
  """Alexandria DSM/DTM (2 m, EPSG:26918) + footprints -> building tiles; returns the manifest.

  Footprints cover a central subset only: outside their convex hull labels are 255 = ignore.
  """
  out_dir = Path(out_dir)
  with atomic_dir(out_dir, overwrite) as tmp:
    dsm, dtm = shared_file(ALEXANDRIA_DSM), shared_file(ALEXANDRIA_DTM)
    ndsm = height_above_ground(dsm, dtm, tmp / "rasters" / "ndsm.tif")
    label_tif = tmp / "labels" / "buildings.tif"
    rasterize_labels(dsm, [LabelLayer(shared_file(ALEXANDRIA_BUILDINGS))], label_tif)
    write_tiles(dsm, tmp / "tiles", label=label_tif, extras={"dtm": dtm, "ndsm": ndsm}, tile_size=tile_size,
                stride=stride, block_px=block_px, min_valid=min_valid, min_labelled=min_labelled, seed=seed,
                dtype=dtype, label_names={0: "background", 1: "building"}, progress=progress,
                extra_manifest={"preset": {"name": "alexandria", "task": "buildings",
                                           "labelled_area": "convex hull of the footprints"}})
  return out_dir / "tiles" / MANIFEST
