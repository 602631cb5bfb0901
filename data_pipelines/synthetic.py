"""Procedural DEMs with buildings and roads, for unit tests only (never evidence of a result).

Terrain is smooth noise; roads are straight strips sunk 0.1 m into it; buildings are boxes of
known height standing off the roads. Labels: 0 background, 1 building, 2 road.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.ndimage


@dataclasses.dataclass
class SyntheticScene:
  dsm: np.ndarray  # float32 [H, W], metres
  dtm: np.ndarray  # float32 [H, W]
  label: np.ndarray  # uint8 [H, W]: 0 background, 1 building, 2 road
  buildings: list[tuple[int, int, int, int, float]]  # row0, col0, row1, col1 (exclusive), height


def synthetic_scene(
  height: int = 256,
  width: int = 256,
  seed: int = 0,
  n_buildings: int = 12,
  n_roads: int = 3,
  relief_m: float = 5.0,
  base_m: float = 100.0,
) -> SyntheticScene:
  rng = np.random.default_rng(seed)
  noise = scipy.ndimage.gaussian_filter(
    rng.normal(size=(height, width)), sigma=min(height, width) / 8
  )
  dtm = base_m + relief_m * (noise - noise.min()) / max(np.ptp(noise), 1e-9)
  label = np.zeros((height, width), np.uint8)
  for _ in range(n_roads):
    w = int(rng.integers(4, 9))
    if rng.random() < 0.5:
      r = int(rng.integers(0, height - w))
      label[r : r + w, :] = 2
    else:
      c = int(rng.integers(0, width - w))
      label[:, c : c + w] = 2
  dsm = np.where(label == 2, dtm - 0.1, dtm)
  buildings = []
  for _ in range(50 * n_buildings):
    if len(buildings) == n_buildings:
      break
    big = max(4, min(30, height // 3, width // 3))  # small scenes get small buildings
    h, w = (int(v) for v in rng.integers(min(8, big - 1), big, size=2))
    r, c = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
    if (label[max(r - 2, 0) : r + h + 2, max(c - 2, 0) : c + w + 2] != 0).any():
      continue  # keep buildings apart from roads and each other
    top = float(rng.uniform(3, 25))
    dsm[r : r + h, c : c + w] = dtm[r : r + h, c : c + w].max() + top
    label[r : r + h, c : c + w] = 1
    buildings.append((r, c, r + h, c + w, top))
  return SyntheticScene(dsm.astype(np.float32), dtm.astype(np.float32), label, buildings)


def write_scene_geotiffs(
  scene: SyntheticScene,
  folder,
  crs: str = "EPSG:32631",
  origin: tuple[float, float] = (500_000.0, 5_000_000.0),
  cell_size: float = 1.0,
  label_value: int | None = None,
) -> dict:
  """The scene as GeoTIFFs (dsm, dtm, ndsm, label) on one grid; `label_value` keeps one class as
  a binary label (e.g. 1 buildings). Returns {name: path}."""
  from pathlib import Path

  import rasterio
  import rasterio.transform

  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  label = scene.label if label_value is None else (scene.label == label_value).astype(np.uint8)
  arrays = {"dsm": scene.dsm, "dtm": scene.dtm, "ndsm": scene.dsm - scene.dtm, "label": label}
  transform = rasterio.transform.from_origin(origin[0], origin[1], cell_size, cell_size)
  paths = {}
  for name, a in arrays.items():
    paths[name] = folder / f"{name}.tif"
    with rasterio.open(
      paths[name],
      "w",
      driver="GTiff",
      width=a.shape[1],
      height=a.shape[0],
      count=1,
      dtype=a.dtype,
      crs=crs,
      transform=transform,
      nodata=np.nan if a.dtype.kind == "f" else None,
    ) as dst:
      dst.write(a, 1)
  return paths


def write_las(path, xyz: np.ndarray, classes: np.ndarray, crs: str | None = None) -> None:
  """Points as a LAS/LAZ file (format by extension), with a CRS VLR only when `crs` is given."""
  import laspy
  import rasterio.crs

  header = laspy.LasHeader(point_format=1, version="1.4")
  header.offsets = np.floor(xyz.min(axis=0))
  header.scales = np.array([0.001, 0.001, 0.001])
  if crs is not None:  # the WKT VLR, written without pyproj
    header.global_encoding.wkt = True
    header.vlrs.append(
      laspy.vlrs.known.WktCoordinateSystemVlr(rasterio.crs.CRS.from_user_input(crs).to_wkt())
    )
  las = laspy.LasData(header)
  las.x, las.y, las.z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
  las.classification = classes.astype(np.uint8)
  las.write(str(path))
