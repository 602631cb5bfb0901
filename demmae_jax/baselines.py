"""Non-learned height rules for buildings and roads: what learning has to beat (issue 12).

What a GIS analyst would write on a DSM alone, with a handful of parameters tuned by grid search
on labelled training tiles (no learning otherwise):

- ground: a grey opening of the DSM with a square window of `window_m` metres (it removes every
  raised object narrower than the window); height = DSM - ground. With `height_source="ndsm"` the
  tiles' nDSM channel (DSM - LiDAR-ground DTM) is the height instead: more information than the
  models get, which see the DSM only.
- roughness: |DSM - its 3 x 3 median|, ~0 on any plane (flat or pitched roof, street) and large
  in tree crowns, then its median over 5 x 5 cells, so that a wall (a rough line one or two cells
  wide between two smooth surfaces) does not count as rough but a crown does.
- buildings: height > `height_m` and roughness <= `max_roughness_m` (rejects trees).
- roads: height <= `height_m` (at ground level), slope <= `max_slope_deg` (Horn's 3 x 3
  gradient), roughness <= `max_roughness_m` (asphalt is smoother than shrubs).
- then 8-connected objects smaller than `min_area_m2` are dropped and holes (background enclosed
  by an object, not touching the tile's or raster's edge) smaller than `max_hole_m2` filled.

Invalid cells (LiDAR gaps) take their nearest valid cell's height first. The rule runs on a stack
of tiles [B, H, W], each on its own as a model sees it, or on a whole raster [1, H, W] whose
prediction is then cropped at the tiles (`crop`): with 32 m tiles a 20-30 m window reaches
beyond the tile, so per tile it sees less ground than it needs. Tuning and evaluation count
exactly the pixels the models' evaluation counts (label != 255 and valid).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable

import numpy as np
import scipy.ndimage as ndi

from demmae_jax import metrics

TASKS = ("buildings", "roads")
HEIGHT_SOURCES = ("opening", "ndsm")
# Default grids: from simple to complex, so ties go to the simpler rule (None = test off).
GRIDS = {
  "buildings": dict(
    window_m=(10, 15, 20, 25, 30, 40, 60, 100),
    height_m=(1, 1.5, 2, 2.5, 3, 4, 5, 6),
    max_slope_deg=(None,),
    max_roughness_m=(None, 0.4, 0.2, 0.1, 0.05, 0.02),
    min_area_m2=(0, 5, 20, 50, 100),
    max_hole_m2=(0, 10, 50, 200),
  ),
  "roads": dict(
    window_m=(5, 10, 20, 30),
    height_m=(0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5),
    max_slope_deg=(None, 15, 8, 4),
    max_roughness_m=(None, 0.1, 0.05, 0.02),
    min_area_m2=(0, 5, 20, 50, 100),
    max_hole_m2=(0, 10, 50, 200),
  ),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """One rule's parameters (metres, square metres, degrees); None switches a test off."""

  task: str
  window_m: float = 25.0
  height_m: float = 2.5
  max_roughness_m: float | None = None
  min_area_m2: float = 0.0
  max_hole_m2: float = 0.0
  max_slope_deg: float | None = None  # roads only
  height_source: str = "opening"

  def __post_init__(self):
    if self.task not in TASKS or self.height_source not in HEIGHT_SOURCES:
      raise ValueError(
        f"task must be one of {TASKS} and height_source one of {HEIGHT_SOURCES}: "
        f"{self.task!r}, {self.height_source!r}"
      )
    if self.task == "buildings" and self.max_slope_deg is not None:
      raise ValueError("max_slope_deg is a road test; buildings have none (roofs are pitched)")


# ------------------------------------------------------------------------------ features
def _px(metres: float, cell_size: float) -> int:
  return max(1, int(round(metres / cell_size)))


def _plane(size: int, ndim: int) -> tuple:
  """A filter size acting within each [H, W] plane only (never across the batch axis)."""
  return (1,) * (ndim - 2) + (size, size)


def fill_invalid(z: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Each invalid cell takes its nearest valid cell's value, per plane of [B, H, W]."""
  out = np.array(z, np.float32)
  planes = (-1,) + z.shape[-2:]
  for plane, ok in zip(out.reshape(planes), np.asarray(valid, bool).reshape(planes)):
    if not ok.all():
      if not ok.any():
        raise ValueError("a tile without any valid cell cannot be filled")
      idx = ndi.distance_transform_edt(~ok, return_distances=False, return_indices=True)
      plane[...] = plane[tuple(idx)]
  return out


def height_above_opening(z: np.ndarray, window_px: int) -> np.ndarray:
  """DSM minus its grey opening with a `window_px` square: >= 0, 0 on open ground."""
  return z - ndi.grey_opening(z, size=_plane(window_px, z.ndim))


def roughness(z: np.ndarray) -> np.ndarray:
  """The 5 x 5 median of |z - 3 x 3 median of z| (m): zero on any plane (flat or pitched roof,
  street) and beside a wall, large in tree crowns."""
  return ndi.median_filter(
    np.abs(z - ndi.median_filter(z, size=_plane(3, z.ndim))), size=_plane(5, z.ndim)
  )


_HORN = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32) / 8


def slope_deg(z: np.ndarray, cell_size: float) -> np.ndarray:
  """Slope in degrees by Horn's (1981) 3 x 3 gradient, as GIS slope tools compute it."""
  k = _HORN.reshape(_plane(3, z.ndim))
  dx = ndi.correlate(z, k, mode="nearest") / cell_size
  dy = ndi.correlate(z, np.swapaxes(k, -1, -2), mode="nearest") / cell_size
  return np.degrees(np.arctan(np.hypot(dx, dy)))


def objects(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(8-connected object ids per pixel, 0 = none; pixel count per id), objects within a plane."""
  structure = np.zeros((3,) * mask.ndim, bool)
  structure[(1,) * (mask.ndim - 2)] = True  # the 3 x 3 square of the middle plane only
  ids, n = ndi.label(mask, structure)
  return ids, np.bincount(ids.ravel(), minlength=n + 1)


# ------------------------------------------------------------------------------ the rule
@dataclasses.dataclass
class Scene:
  """Elevation to run a rule on ([B, H, W] tiles, or [1, H, W] a whole raster), in metres."""

  dsm: np.ndarray
  valid: np.ndarray
  cell_size: float
  ndsm: np.ndarray | None = None

  def __post_init__(self):
    self.z = fill_invalid(self.dsm, self.valid)
    self._cache: dict = {}

  def height(self, source: str, window_m: float) -> np.ndarray:
    key = ("height", source, window_m if source == "opening" else None)
    if key not in self._cache:
      if source == "ndsm":
        if self.ndsm is None:
          raise ValueError("height_source 'ndsm' needs the nDSM channel")
        self._cache[key] = fill_invalid(self.ndsm, self.valid)
      else:
        self._cache[key] = height_above_opening(self.z, _px(window_m, self.cell_size))
    return self._cache[key]

  def feature(self, name: str) -> np.ndarray:
    if name not in self._cache:
      self._cache[name] = (
        roughness(self.z) if name == "roughness" else slope_deg(self.z, self.cell_size)
      )
    return self._cache[name]


def _pixels(scene: Scene, rule: Rule) -> np.ndarray:
  """The rule's per-pixel tests."""
  h = scene.height(rule.height_source, rule.window_m)
  mask = h > rule.height_m if rule.task == "buildings" else h <= rule.height_m
  if rule.max_slope_deg is not None:
    mask &= scene.feature("slope") <= rule.max_slope_deg
  if rule.max_roughness_m is not None:
    mask &= scene.feature("roughness") <= rule.max_roughness_m
  return mask


def _large(ids: np.ndarray, sizes: np.ndarray, min_area_m2: float, cell_size: float) -> np.ndarray:
  keep = sizes * cell_size**2 >= min_area_m2
  keep[0] = False  # id 0: not an object
  return keep[ids]


def _holes(ids: np.ndarray, sizes: np.ndarray, max_hole_m2: float, cell_size: float) -> np.ndarray:
  """Background objects (`objects(~mask)`) smaller than `max_hole_m2` that do not touch a plane's
  edge: holes to fill."""
  small = sizes * cell_size**2 < max_hole_m2
  for edge in (ids[..., 0, :], ids[..., -1, :], ids[..., :, 0], ids[..., :, -1]):
    small[edge] = False  # open to the edge: maybe not enclosed beyond it
  small[0] = False
  return small[ids]


def _post(mask: np.ndarray, rule: Rule, cell_size: float, cache: dict | None = None) -> np.ndarray:
  """The object tests: drop small objects, fill small holes. `cache` (per pixel mask) keeps the
  object labellings for rules that share them."""
  cache = {} if cache is None else cache
  if rule.min_area_m2 > 0:
    if "objects" not in cache:
      cache["objects"] = objects(mask)
    mask = _large(*cache["objects"], rule.min_area_m2, cell_size)
  if rule.max_hole_m2 > 0:
    key = ("background", rule.min_area_m2)
    if key not in cache:
      cache[key] = objects(~mask)
    mask = mask | _holes(*cache[key], rule.max_hole_m2, cell_size)
  return mask


def apply(rule: Rule, scene: Scene) -> np.ndarray:
  """The rule's bool mask, shaped like the scene."""
  return _post(_pixels(scene, rule), rule, scene.cell_size)


# ------------------------------------------------------------------------------ tuning
def crop(windows: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
  """[1, H, W] raster prediction -> [N, h, w] at the tiles' windows (col, row, width, height)."""
  windows = np.asarray(windows)
  size = int(windows[0, 2])
  rows = windows[:, 1, None] + np.arange(size)
  cols = windows[:, 0, None] + np.arange(size)
  return lambda pred: pred[0][rows[:, :, None], cols[:, None, :]]


def _iou_counter(label: np.ndarray, valid: np.ndarray, positive: int = 1):
  counted = (label != metrics.IGNORE_INDEX) & (valid > 0)
  truth = (label == positive)[counted]
  positives = int(truth.sum())

  def iou(pred: np.ndarray) -> float:
    p = pred[counted]
    tp = int(np.count_nonzero(p & truth))
    union = positives + int(np.count_nonzero(p)) - tp
    return tp / union if union else float("nan")

  return iou


def grid(task: str, height_source: str = "opening", **overrides) -> list[Rule]:
  """The rules of the task's grid (GRIDS, with `overrides` of its axes), simplest first."""
  axes = {**GRIDS[task], **overrides}
  if height_source == "ndsm":
    axes["window_m"] = (GRIDS[task]["window_m"][0],)  # unused: one value, not a search axis
  names = list(axes)
  return [
    Rule(task, height_source=height_source, **dict(zip(names, values)))
    for values in itertools.product(*(axes[n] for n in names))
  ]


def tune(
  scene: Scene,
  label: np.ndarray,
  valid: np.ndarray,
  rules: Iterable[Rule],
  to_tiles: Callable[[np.ndarray], np.ndarray] = lambda p: p,
) -> tuple[Rule, list[dict]]:
  """(the rule of highest IoU over the labelled valid pixels of `label` [N, h, w], every rule's
  row {parameters, iou} in the order given). `to_tiles` maps the scene's prediction onto the
  label's tiles. The first best rule wins ties. Rules that differ only in their object tests
  share the pixel tests and the labellings of objects."""
  rules = list(rules)
  iou_of = _iou_counter(label, valid)
  groups: dict[Rule, list[int]] = {}
  for i, rule in enumerate(rules):
    groups.setdefault(dataclasses.replace(rule, min_area_m2=0.0, max_hole_m2=0.0), []).append(i)
  ious = [0.0] * len(rules)
  for members in groups.values():
    mask, cache = _pixels(scene, rules[members[0]]), {}
    for i in members:
      ious[i] = iou_of(to_tiles(_post(mask, rules[i], scene.cell_size, cache)))
  best = max(range(len(rules)), key=lambda i: (np.nan_to_num(ious[i], nan=-1.0), -i))
  return rules[best], [{**dataclasses.asdict(r), "iou": v} for r, v in zip(rules, ious)]


# ------------------------------------------------------------------------------ evaluation
def evaluate(
  pred: np.ndarray,
  label: np.ndarray,
  valid: np.ndarray,
  cell_size: float,
  class_names=("background", "positive"),
  band_m: float = metrics.DEFAULT_BAND_M,
) -> dict:
  """The models' test summary (`metrics.summarize` with boundary IoU) of bool predictions
  [N, h, w] against tile labels."""
  pred = np.asarray(pred, np.int32)
  cm = np.asarray(metrics.confusion_matrix(pred, label, 2, valid))
  boundary = metrics.BoundaryIoU.in_metres(cell_size, band_m)
  boundary.update(pred, label, valid)
  return metrics.summarize(cm, positive=1, class_names=list(class_names), boundary=boundary)


# ------------------------------------------------------------------------------ data
def load_tiles(manifest_path: str, split: str, ndsm: bool = False) -> dict[str, np.ndarray]:
  """A split's tiles in file order (the order the experiment harness draws from), as stored:
  {dsm [N, H, W] m, valid, label, window [N, 4], tile_id [N]} (+ ndsm)."""
  import tensorflow as tf

  from data_pipelines.reader import read_manifest, split_files
  from data_pipelines.tile_records import decode_tile_numpy

  m = read_manifest(manifest_path)
  channels = ["elevation"] + (["ndsm"] if ndsm else [])
  if ndsm and "ndsm" not in m["channels"]:
    raise ValueError(f"{manifest_path}: the tiles have no nDSM channel")
  tiles = [
    decode_tile_numpy(r, channels, m["dtype"], m["tile_size"])
    for r in tf.data.TFRecordDataset(split_files(m, split)).as_numpy_iterator()
  ]
  if not tiles:
    raise ValueError(f"{manifest_path}: split {split!r} holds no tile")
  stack = lambda key: np.stack([t[key] for t in tiles])  # noqa: E731
  out = {
    "dsm": stack("elevation"),
    "valid": stack("valid"),
    "label": stack("label").astype(np.int32),
    "window": stack("window"),
    "tile_id": np.array([t["tile_id"] for t in tiles]),
  }
  if ndsm:
    out["ndsm"] = stack("ndsm")
  return out


def raster_scene(manifest_path: str, ndsm: bool = False) -> Scene:
  """The whole raster the tile set was cut from ([1, H, W]), valid where the DSM (the nDSM too
  when used) has data and the validity raster, if any, says so."""
  import os

  from data_pipelines.raster_source import read_elevation
  from data_pipelines.reader import read_manifest

  m = read_manifest(manifest_path)

  def path(name):
    found = os.path.normpath(os.path.join(m["_dir"], m["sources"][name]))
    if not os.path.exists(found):
      raise FileNotFoundError(
        f"{found}, the {name} raster {manifest_path} was cut from, is not "
        f"there (moved?); the per-tile mode needs only the tiles"
      )
    return found

  dsm = read_elevation(path("elevation"))
  valid = np.isfinite(dsm)
  if m["sources"].get("valid"):
    valid &= read_elevation(path("valid")) > 0
  height = None
  if ndsm:
    height = read_elevation(path("ndsm"))
    valid &= np.isfinite(height)
    height = height[None]
  return Scene(np.nan_to_num(dsm)[None], valid[None], float(m["cell_size"]), height)


def draw(windows: np.ndarray, n: int, seed: int) -> np.ndarray:
  """Indices (sorted) of the `n` training tiles the experiment harness gives its models for
  `seed` (demmae_jax.experiments.draws: disjoint-first draw with default_rng(1000 + seed))."""
  from demmae_jax.experiments.draws import draw_order

  if n > len(windows):
    raise ValueError(f"{n} tiles asked, the split holds {len(windows)}")
  return np.sort(draw_order([tuple(w) for w in windows], np.random.default_rng(1000 + seed))[:n])
