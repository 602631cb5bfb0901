"""Amsterdam (Jordaan): AHN3 or AHN2 LiDAR + BAG footprints -> building tiles, both surveys on
one grid with one spatial split.

The two surveys cover the same place, so a model trained on one survey's training blocks must
never be tested on the other survey's training blocks. Guarantee: both are rasterised on the grid
of the whole 4 x 4 unit block of `ahn_index.geojson` (whatever the survey's own extent), and the
split of every block is a pure function of that grid, the unit polygons, `block_px`, `seed` and
`fractions` (`amsterdam_block_split`), never of the LiDAR. Blocks touching the AHN3 units are
drawn first, so AHN3 gets its 70 / 15 / 15 shares, then the rest for AHN2.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import rasterio
import rasterio.crs
import rasterio.features
import shapely

from data_pipelines.atomic import atomic_dir
from data_pipelines.labels import (
  LabelLayer,
  mask_label_conflicts,
  rasterize_labels,
  read_geometries,
)
from data_pipelines.lidar import las_to_rasters
from data_pipelines.prepare import named_target
from data_pipelines.shared_data import shared_file
from data_pipelines.tile_writer import DEFAULT_FRACTIONS, MANIFEST, write_tiles
from data_pipelines.tiles import assign_blocks_nested

CRS = "EPSG:28992"  # RD New; the LAZ headers carry no CRS
INDEX = "amsterdam/ahn_index.geojson"
BAG = "amsterdam/bag_pand.gpkg"
BAG_LAYER = "pandactueelbestaand"
SURVEY_UNITS = {"ahn3": (2, 3, 4, 6, 7, 10, 14), "ahn2": tuple(range(1, 17))}
ALL_UNITS = SURVEY_UNITS["ahn2"]


def _units(units) -> LabelLayer:
  return LabelLayer(shared_file(INDEX), field="unit", values=[f"25gn1_{u}" for u in units])


def block_bounds() -> tuple[float, float, float, float]:
  """xmin, ymin, xmax, ymax of the whole unit block: the grid extent of both surveys."""
  units = read_geometries(_units(ALL_UNITS), rasterio.crs.CRS.from_string(CRS))
  return tuple(float(v) for v in shapely.total_bounds(units))


def amsterdam_block_split(
  dem_path: str | Path,
  block_px: int,
  seed: int = 0,
  fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
) -> np.ndarray:
  """The split of every `block_px` block of `dem_path`'s grid: weights are pixels inside the AHN3
  units (drawn first) and inside all units, so the result does not depend on the survey."""
  with rasterio.open(dem_path) as dem:
    grid = dict(out_shape=dem.shape, transform=dem.transform)
    crs = dem.crs
  nb = (-(-grid["out_shape"][0] // block_px), -(-grid["out_shape"][1] // block_px))

  def weights(units):
    inside = rasterio.features.rasterize(
      read_geometries(_units(units), crs), fill=0, default_value=1, dtype=np.uint8, **grid
    ).astype(np.int64)
    padded = np.zeros((nb[0] * block_px, nb[1] * block_px), np.int64)
    padded[: inside.shape[0], : inside.shape[1]] = inside
    return padded.reshape(nb[0], block_px, nb[1], block_px).sum(axis=(1, 3))

  return assign_blocks_nested(
    weights(SURVEY_UNITS["ahn3"]), weights(ALL_UNITS), dict(fractions), seed
  )


def prepare_amsterdam(
  out_dir: str | Path,
  task: str = "buildings",
  *,
  survey: str = "ahn3",
  cell_size: float = 1.0,
  tile_size: int = 64,
  stride: int | None = 32,
  block_px: int | None = None,
  dtype: str = "float16",
  min_valid: float = 0.75,
  min_labelled: float = 0.25,
  seed: int = 0,
  overwrite: bool = False,
  progress: bool = True,
  fractions: Mapping[str, float] | None = None,
) -> Path:
  """Amsterdam `survey` LiDAR + BAG footprints -> `out_dir`/{rasters, labels, tiles}; returns the
  manifest. Labelled area: the survey's units (outside them 255 = ignore; the footprints cover
  the whole block). Canals have no returns: their cells are invalid (valid = 0, no DSM value
  beyond 4 cells from a return), never ground. 1 m cells by default: ~3.4 points/m2 hit 86 %
  of 1 m cells but 57 % of 0.5 m cells.
  """
  if task != "buildings":
    raise ValueError(f"Amsterdam has building labels only, got task {task!r}")
  if survey not in SURVEY_UNITS:
    raise ValueError(f"survey must be one of {tuple(SURVEY_UNITS)}, got {survey!r}")
  block_px = block_px or 2 * tile_size
  fractions = dict(fractions or DEFAULT_FRACTIONS)
  out_dir = Path(out_dir)
  units = SURVEY_UNITS[survey]
  laz = [shared_file(f"amsterdam/{survey}/unit_25gn1_{u}.laz") for u in units]
  with named_target(out_dir), atomic_dir(out_dir, overwrite) as tmp:
    rasters = las_to_rasters(
      laz, tmp / "rasters", cell_size=cell_size, crs=CRS, bounds=block_bounds(), progress=progress
    )
    label_tif = tmp / "labels" / "buildings.tif"
    rasterize_labels(
      rasters["dsm"], [LabelLayer(shared_file(BAG), layer=BAG_LAYER)], label_tif, area=_units(units)
    )
    # AHN3 classifies buildings: footprints it contradicts over a whole object are unknown
    conflicts = mask_label_conflicts(label_tif, rasters["class"]) if survey == "ahn3" else None
    split = amsterdam_block_split(rasters["dsm"], block_px, seed, fractions)
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
      label_names={0: "background", 1: "building"},
      progress=progress,
      block_split=split,
      fractions=fractions,
      extra_manifest={
        "preset": {
          "name": f"amsterdam_{survey}",
          "place": "amsterdam",
          "task": task,
          "survey": survey,
          "units": list(units),
          "crs": CRS,
          "labels": f"{BAG} layer {BAG_LAYER}",
          "label_conflicts_ignored": conflicts,
          "labelled_area": f"the {survey.upper()} units of {INDEX}",
          "split": "amsterdam_block_split: shared by ahn2 and ahn3 at equal cell_size, "
          "block_px and seed",
        }
      },
    )
  return out_dir / "tiles" / MANIFEST
