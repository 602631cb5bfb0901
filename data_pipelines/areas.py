"""The labelled areas of the shared data, by name, and the leave-one-area-out protocol's data.

    prepare_area("gothenburg", "data/areas/gothenburg/roads", task="roads", cell_size=1.0)
    leave_one_area_out("gothenburg", {name: manifest, ...}, "data/loao/gothenburg")

`place` groups areas that are the same ground (Amsterdam's AHN2 and AHN3 surveys): a held-out
place is never among the training areas. 1 m is the common cell size of the protocol: it is
Amsterdam's and Gothenburg's native one, Delft's LiDAR (~14.6 points/m2) supports it, and
Alexandria's 2 m rasters are resampled to it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from inspect import signature
from pathlib import Path

from data_pipelines.amsterdam import prepare_amsterdam
from data_pipelines.combine import combine_tile_sets
from data_pipelines.prepare import prepare_alexandria, prepare_delft, prepare_gothenburg

HOLDOUT = {"train": 0.0, "val": 0.0, "test": 1.0}  # every tile is test: no tile lost at split edges


@dataclasses.dataclass(frozen=True)
class Area:
  name: str
  place: str
  prepare: Callable[..., Path]  # (out_dir, task, *, cell_size, tile_size, stride, ...) -> manifest
  tasks: tuple[str, ...]
  native_cell_size: float  # what the source supports; the default
  crs: str
  labels: str
  # measured split blocks for (cell size, tile size) where 2 x tile size fails the area
  block_px: Mapping[tuple[float, int], int] = dataclasses.field(default_factory=dict)
  # what the building labels outline: "wall" (cadastral footprints) or "roof" (roof edges with
  # their eaves, e.g. land cover derived from a DSM): demmae_jax/inference/outline.py
  outline: str = "wall"


AREAS = {
  a.name: a
  for a in (
    Area(
      "delft",
      "delft",
      prepare_delft,
      ("buildings", "roads"),
      0.5,
      "EPSG:28992",
      "BGT pand footprints; BGT wegdeel carriageway, parking, footpath, pedestrian area as road; "
      "255 outside the hull of the BGT layers (44 % of the LiDAR block)",
      # at 1 m Delft is 265 x 229 px: 128 px blocks make 6 blocks, test drew 3 (3 / 9 / 16 tiles)
      block_px={(1.0, 64): 96},
    ),
    Area(
      "alexandria",
      "alexandria",
      prepare_alexandria,
      ("buildings",),
      2.0,
      "EPSG:26918",
      "84 footprints (buildings.geojson); 255 outside their convex hull",
    ),
    Area(
      "amsterdam_ahn3",
      "amsterdam",
      functools.partial(prepare_amsterdam, survey="ahn3"),
      ("buildings",),
      1.0,
      "EPSG:28992",
      "BAG pand footprints over the 7 AHN3 units; 255 outside them",
    ),
    Area(
      "amsterdam_ahn2",
      "amsterdam",
      functools.partial(prepare_amsterdam, survey="ahn2"),
      ("buildings",),
      1.0,
      "EPSG:28992",
      "BAG pand footprints over all 16 units (AHN2 has no building class)",
    ),
    Area(
      "gothenburg",
      "gothenburg",
      prepare_gothenburg,
      ("buildings", "roads"),
      1.0,
      "EPSG:3007",
      "land cover: class 2 buildings; class 1 paved (streets, pavements, squares) as road; "
      "the whole raster is labelled",
      outline="roof",
    ),
  )
}


def get_area(name: str) -> Area:
  if name not in AREAS:
    raise ValueError(f"unknown area {name!r}; known: {', '.join(AREAS)}")
  return AREAS[name]


def prepare_area(
  name: str,
  out_dir: str | Path,
  task: str = "buildings",
  cell_size: float | None = None,
  tile_size: int = 64,
  stride: int | None = 32,
  *,
  block_px: int | None = None,
  holdout: bool = False,
  wall_lines: bool = False,
  **kwargs,
) -> Path:
  """Prepare area `name` for `task` into `out_dir`; returns the manifest. `cell_size` None = the
  area's native one; `holdout=True` puts every tile in test (the held-out area of
  leave-one-area-out); other keywords (dtype, min_valid, min_labelled, seed, overwrite,
  progress) go to the area's prepare function. `wall_lines=True` trains beside wall-line
  footprints: on an area whose building labels outline roofs, the eave band becomes unknown
  (`labels.unknown_eaves`)."""
  area = get_area(name)
  if task not in area.tasks:
    raise ValueError(f"area {name!r} has no {task!r} labels; its tasks: {', '.join(area.tasks)}")
  cell_size = area.native_cell_size if cell_size is None else float(cell_size)
  block_px = block_px or area.block_px.get((cell_size, tile_size))
  if (
    kwargs.get("max_density") is not None
    and "max_density" not in signature(area.prepare).parameters
  ):
    raise ValueError(f"area {name!r} cannot be thinned: max_density needs its LiDAR points")
  if holdout:
    kwargs["fractions"] = HOLDOUT
  if wall_lines and area.outline == "roof" and task == "buildings":
    from data_pipelines.labels import EAVE_M

    kwargs["eave_m"] = EAVE_M
  return area.prepare(
    out_dir,
    task,
    cell_size=cell_size,
    tile_size=tile_size,
    stride=stride,
    block_px=block_px,
    **kwargs,
  )


def leave_one_area_out(
  held_out: str, manifests: Mapping[str, str | Path], out_dir: str | Path, **kwargs
) -> Path:
  """One tile set: train / val from every area in `manifests` (name -> manifest) except those at
  `held_out`'s place, test = every tile of `held_out` (prepare it with holdout=True to keep the
  tiles a split would drop). Keywords go to combine_tile_sets."""
  place = get_area(held_out).place
  if held_out not in manifests:
    raise ValueError(f"no prepared tile set for the held-out area {held_out!r}")
  train = [manifests[n] for n in manifests if get_area(n).place != place]
  return combine_tile_sets(train, out_dir, test_sets=[manifests[held_out]], **kwargs)
