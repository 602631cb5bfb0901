"""One-call preparation of tile sets, for the CLI, the demo and the trainers.

`prepare_delft(out_dir, task="buildings" | "roads")` runs LAZ -> rasters -> labels -> tiles on the
shared Delft set, `prepare_alexandria(out_dir)` GeoTIFF DSM/DTM + footprints -> tiles,
`prepare_gothenburg(out_dir, task)` DSM/DEM + land cover -> tiles (Amsterdam: amsterdam.py; all
areas by name: areas.py); each returns the manifest path, and the whole `out_dir` appears
atomically.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

from data_pipelines.atomic import atomic_dir
from data_pipelines.errors import DataError
from data_pipelines.labels import (
  LabelLayer,
  hide_under_canopy,
  labels_from_class_raster,
  mask_label_conflicts,
  rasterize_labels,
  unknown_eaves,
)
from data_pipelines.lidar import las_to_rasters
from data_pipelines.resample import resample_raster
from data_pipelines.shared_data import shared_file
from data_pipelines.tile_writer import DEFAULT_FRACTIONS, MANIFEST, write_tiles

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


def prepare_delft(
  out_dir: str | Path,
  task: str = "buildings",
  *,
  cell_size: float = 0.5,
  tile_size: int = 64,
  stride: int | None = 32,
  block_px: int | None = None,
  dtype: str = "float16",
  label_source: str = "bgt",
  min_valid: float = 0.75,
  min_labelled: float = 0.25,
  seed: int = 0,
  overwrite: bool = False,
  progress: bool = True,
  fractions: Mapping[str, float] | None = None,
  max_density: float | None = None,
) -> Path:
  """Delft AHN3 LiDAR + BGT polygons -> `out_dir`/{rasters, labels, tiles}; returns the manifest.

  Labels: task "buildings" from BGT pand (label_source="bgt") or LiDAR class 6 ("lidar");
  task "roads" from BGT wegdeel with `function` in DELFT_ROAD_FUNCTIONS. With BGT labels, pixels
  outside the convex hull of both BGT layers (the crop's mapped area, ~56 % of the LiDAR block)
  are 255 = ignore. Tiles carry elevation (DSM), validity, label, and DTM/nDSM channels.
  `min_valid` is 0.75 because at 0.5 m ~6 % of cells get no return (scan gaps, interpolated but
  marked invalid) besides the canal's; 0.9 would drop a quarter of the tiles. `max_density`
  thins the 14.6 points/m2 survey first (lidar.las_to_rasters), e.g. to Amsterdam's 3.4.
  """
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  if label_source not in ("bgt", "lidar") or (task == "roads" and label_source != "bgt"):
    raise ValueError(f"label_source must be 'bgt' (or 'lidar' for buildings), got {label_source!r}")
  out_dir = Path(out_dir)
  with named_target(out_dir):
    return _prepare_delft(
      out_dir,
      task,
      cell_size,
      tile_size,
      stride,
      block_px,
      dtype,
      label_source,
      min_valid,
      min_labelled,
      seed,
      overwrite,
      progress,
      fractions,
      max_density,
    )


@contextlib.contextmanager
def named_target(out_dir: Path):
  """A DataError about a file in the temporary folder names `out_dir` instead (the temporary
  folder is gone by the time the user reads the message)."""
  try:
    yield
  except DataError as e:
    if ".tmp" not in e.path:
      raise
    raise DataError(out_dir, e.problem) from e


def _prepare_delft(
  out_dir,
  task,
  cell_size,
  tile_size,
  stride,
  block_px,
  dtype,
  label_source,
  min_valid,
  min_labelled,
  seed,
  overwrite,
  progress,
  fractions,
  max_density,
) -> Path:
  with atomic_dir(out_dir, overwrite) as tmp:
    rasters = las_to_rasters(
      [shared_file(p) for p in DELFT_LAZ],
      tmp / "rasters",
      cell_size=cell_size,
      crs=DELFT_CRS,
      progress=progress,
      max_density=max_density,
    )
    label_tif = tmp / "labels" / f"{task}.tif"
    conflicts = None
    coverage = [LabelLayer(shared_file(DELFT_BUILDINGS)), LabelLayer(shared_file(DELFT_ROADS))]
    if task == "roads":
      layer = LabelLayer(shared_file(DELFT_ROADS), field="function", values=DELFT_ROAD_FUNCTIONS)
      rasterize_labels(rasters["dsm"], [layer], label_tif, coverage=coverage)
    elif label_source == "bgt":
      rasterize_labels(
        rasters["dsm"], [LabelLayer(shared_file(DELFT_BUILDINGS))], label_tif, coverage=coverage
      )
      conflicts = mask_label_conflicts(label_tif, rasters["class"])
    else:
      labels_from_class_raster(
        rasters["class"], label_tif, classes=(6,), valid_path=rasters["valid"]
      )
    write_tiles(
      rasters["dsm"],
      tmp / "tiles",
      label=label_tif,
      valid=rasters["valid"],
      extras={"dtm": rasters["dtm"], "ndsm": rasters["ndsm"]},
      tile_size=tile_size,
      stride=stride,
      block_px=block_px,
      min_valid=min_valid,
      min_labelled=min_labelled,
      seed=seed,
      dtype=dtype,
      label_names={0: "background", 1: task[:-1]},
      progress=progress,
      fractions=fractions or DEFAULT_FRACTIONS,
      extra_manifest={
        "preset": {
          "name": "delft",
          "place": "delft",
          "task": task,
          "label_source": label_source,
          "laz": list(DELFT_LAZ),
          "crs": DELFT_CRS,
          "max_density": max_density,
          "label_conflicts_ignored": conflicts,
          "road_functions": list(DELFT_ROAD_FUNCTIONS) if task == "roads" else None,
          "labelled_area": (
            "convex hull of bgt_pand + bgt_wegdeel" if label_source == "bgt" else "LiDAR returns"
          ),
        }
      },
    )
  return out_dir / "tiles" / MANIFEST


ALEXANDRIA_DSM = "alexandria/dsm.tif"
ALEXANDRIA_DTM = "alexandria/dtm.tif"
ALEXANDRIA_BUILDINGS = "alexandria/buildings.geojson"  # EPSG:4326, reprojected onto the DEM
ALEXANDRIA_CELL = 2.0


def height_above_ground(
  dsm: str | Path, dtm: str | Path, out: str | Path, overwrite: bool = False
) -> Path:
  """nDSM = max(DSM - DTM, 0) on the DSM's grid; NaN where either is nodata."""
  import numpy as np

  from data_pipelines.raster_io import open_raster, read_band, write_band

  with open_raster(dsm) as a, open_raster(dtm) as b:
    if a.crs != b.crs or a.transform != b.transform or a.shape != b.shape:
      raise DataError(dtm, f"grid or CRS differs from {dsm}")
    top, ground = (read_band(r, masked=True).astype(np.float32) for r in (a, b))
    profile = a.profile
  ndsm = np.ma.maximum(top - ground, 0).filled(np.nan)
  return write_band(out, ndsm, {**profile, "dtype": "float32", "nodata": np.nan}, overwrite)


def with_canopy(dsm: str | Path, dem: str | Path, canopy: str | Path, out: str | Path) -> Path:
  """A DSM as LiDAR sees it, from UMEP's vegetation-free DSM: max(DSM, DEM + canopy height)
  where the canopy raster has vegetation. Without trees in the input a model never sees a raised
  object that is not a building (issue 12: tree crowns were the held-out areas' false positives)."""
  import numpy as np

  from data_pipelines.raster_io import open_raster, read_band, write_band

  with open_raster(dsm) as a, open_raster(dem) as b, open_raster(canopy) as c:
    for r, path in ((b, dem), (c, canopy)):
      if r.crs != a.crs or r.transform != a.transform or r.shape != a.shape:
        raise DataError(path, f"grid or CRS differs from {dsm}")
    top, ground, trees = (read_band(r, masked=True).astype(np.float32) for r in (a, b, c))
    profile = a.profile
  crowns = np.ma.where(trees > 0, ground + trees, -np.inf)
  out_dsm = np.ma.maximum(top, crowns).filled(np.nan)
  return write_band(out, out_dsm, {**profile, "dtype": "float32", "nodata": np.nan})


def prepare_alexandria(
  out_dir: str | Path,
  task: str = "buildings",
  *,
  cell_size: float = 2.0,
  tile_size: int = 64,
  stride: int | None = 32,
  block_px: int | None = None,
  dtype: str = "float16",
  min_valid: float = 0.9,
  min_labelled: float = 0.25,
  seed: int = 0,
  overwrite: bool = False,
  progress: bool = True,
  fractions: Mapping[str, float] | None = None,
) -> Path:
  """Alexandria DSM/DTM (2 m, EPSG:26918) + footprints -> building tiles; returns the manifest.

  Footprints cover a central subset only: outside their convex hull labels are 255 = ignore.
  Another `cell_size` resamples DSM and DTM (resample.py: bilinear to finer cells) and burns the
  footprints straight onto the new grid (sharper than resampling 2 m labels).
  """
  if task != "buildings":
    raise ValueError(f"Alexandria has building labels only, got task {task!r}")
  out_dir = Path(out_dir)
  with named_target(out_dir), atomic_dir(out_dir, overwrite) as tmp:
    dsm, dtm = shared_file(ALEXANDRIA_DSM), shared_file(ALEXANDRIA_DTM)
    if cell_size != ALEXANDRIA_CELL:
      dsm = resample_raster(dsm, tmp / "rasters" / "dsm.tif", cell_size)
      dtm = resample_raster(dtm, tmp / "rasters" / "dtm.tif", cell_size)
    ndsm = height_above_ground(dsm, dtm, tmp / "rasters" / "ndsm.tif")
    label_tif = tmp / "labels" / "buildings.tif"
    rasterize_labels(dsm, [LabelLayer(shared_file(ALEXANDRIA_BUILDINGS))], label_tif)
    write_tiles(
      dsm,
      tmp / "tiles",
      label=label_tif,
      extras={"dtm": dtm, "ndsm": ndsm},
      tile_size=tile_size,
      stride=stride,
      block_px=block_px,
      min_valid=min_valid,
      min_labelled=min_labelled,
      seed=seed,
      dtype=dtype,
      label_names={0: "background", 1: "building"},
      progress=progress,
      fractions=fractions or DEFAULT_FRACTIONS,
      extra_manifest={
        "preset": {
          "name": "alexandria",
          "place": "alexandria",
          "task": "buildings",
          "crs": "EPSG:26918",
          "native_cell_size": ALEXANDRIA_CELL,
          "labelled_area": "convex hull of the footprints",
        }
      },
    )
  return out_dir / "tiles" / MANIFEST


GOTHENBURG_DSM = "gothenburg/DSM_KRbig.tif"  # ground + buildings, vegetation removed (UMEP)
GOTHENBURG_DEM = "gothenburg/DEM_KRbig.tif"  # ground
GOTHENBURG_CANOPY = "gothenburg/CDSM_KRbig.tif"  # vegetation height above ground, 0 = none
GOTHENBURG_COVER = "gothenburg/landcover.tif"  # 1 paved, 2 building, 5 grass, 7 water
GOTHENBURG_CELL = 1.0
GOTHENBURG_CLASSES = {"buildings": 2, "roads": 1}  # "roads" = paved: streets, pavements, squares


def prepare_gothenburg(
  out_dir: str | Path,
  task: str = "buildings",
  *,
  cell_size: float = 1.0,
  tile_size: int = 64,
  stride: int | None = 32,
  block_px: int | None = None,
  dtype: str = "float16",
  min_valid: float = 0.9,
  min_labelled: float = 0.25,
  seed: int = 0,
  overwrite: bool = False,
  progress: bool = True,
  fractions: Mapping[str, float] | None = None,
  eave_m: float = 0.0,
) -> Path:
  """Gothenburg DSM/DEM (1 m, EPSG:3007) + land cover -> tiles of buildings (class 2) or of
  paved surfaces (class 1, the road-like class: task "roads"); returns the manifest. The land
  cover labels the whole raster; other classes are background. The raster is 234 x 223 px:
  the default 128 px blocks are only 4 (train gets 2, val and test 1 each), but 64 px blocks
  lose more tiles to straddling (18 / 2 / 3 tiles instead of 18 / 9 / 6). Another `cell_size`
  resamples DSM/DEM (bilinear or average) and the labels (nearest or mode). The DSM gets its
  trees back from the canopy raster (`with_canopy`), as a LiDAR DSM has them. The building
  labels outline roofs; `eave_m` > 0 makes the band of each building within that width of its
  outline unknown (`labels.unknown_eaves`), for training beside wall-line footprints.
  """
  if task not in GOTHENBURG_CLASSES:
    raise ValueError(f"task must be one of {tuple(GOTHENBURG_CLASSES)}, got {task!r}")
  out_dir = Path(out_dir)
  with named_target(out_dir), atomic_dir(out_dir, overwrite) as tmp:
    dem = shared_file(GOTHENBURG_DEM)
    dsm = with_canopy(
      shared_file(GOTHENBURG_DSM),
      dem,
      shared_file(GOTHENBURG_CANOPY),
      tmp / "rasters" / "dsm_canopy.tif",
    )
    label_tif = tmp / "labels" / f"{task}.tif"
    labels_from_class_raster(
      shared_file(GOTHENBURG_COVER), label_tif, classes=(GOTHENBURG_CLASSES[task],)
    )
    hidden = hide_under_canopy(label_tif, shared_file(GOTHENBURG_CANOPY))
    eaves = unknown_eaves(label_tif, eave_m) if eave_m > 0 and task == "buildings" else 0
    if cell_size != GOTHENBURG_CELL:
      dsm = resample_raster(dsm, tmp / "rasters" / "dsm.tif", cell_size)
      dem = resample_raster(dem, tmp / "rasters" / "dtm.tif", cell_size)
      native, label_tif = label_tif, tmp / "labels" / f"{task}_{cell_size:g}m.tif"
      resample_raster(native, label_tif, cell_size, kind="label")
    ndsm = height_above_ground(dsm, dem, tmp / "rasters" / "ndsm.tif")
    write_tiles(
      dsm,
      tmp / "tiles",
      label=label_tif,
      extras={"dtm": dem, "ndsm": ndsm},
      tile_size=tile_size,
      stride=stride,
      block_px=block_px,
      min_valid=min_valid,
      min_labelled=min_labelled,
      seed=seed,
      dtype=dtype,
      label_names={0: "background", 1: task[:-1]},
      progress=progress,
      fractions=fractions or DEFAULT_FRACTIONS,
      extra_manifest={
        "preset": {
          "name": "gothenburg",
          "place": "gothenburg",
          "task": task,
          "crs": "EPSG:3007",
          "native_cell_size": GOTHENBURG_CELL,
          "labels": f"{GOTHENBURG_COVER} class {GOTHENBURG_CLASSES[task]}",
          "dsm": f"max({GOTHENBURG_DSM}, DEM + {GOTHENBURG_CANOPY})",
          "hidden_under_canopy": hidden,
          "outline": ("roof, eaves unknown" if eaves else "roof") if task == "buildings" else None,
          "eaves_unknown": {"eave_m": eave_m, "cells": eaves},
          "labelled_area": "the whole raster",
        }
      },
    )
  return out_dir / "tiles" / MANIFEST
