"""One-call preparation of tile sets, for the CLI, the demo and the trainers.

`prepare_delft(out_dir, task="buildings" | "roads")` runs LAZ -> rasters -> labels -> tiles on the
shared Delft set and returns the manifest path. The whole `out_dir` appears atomically.
"""
from __future__ import annotations

from pathlib import Path

from data_pipelines.atomic import atomic_dir
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
