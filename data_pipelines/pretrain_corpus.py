"""The high-resolution pretraining corpus: every LiDAR survey and DSM of the shared data at
0.5-2 m cells (no SRTM), as a DSM and an nDSM GeoTIFF per source, with the validation and test
blocks of the evaluation splits in HELD_OUT set to NaN.

    build_corpus("runs/corpus")   # -> corpus.json + SOURCE/{dsm,ndsm}.tif (+ splits/*.json)

Why a held-out block is never seen in pretraining:
- Each split in HELD_OUT is taken from a tile set prepared by the labelled set's own function
  (`areas.prepare_area` -> prepare_delft, prepare_alexandria, ..., which the experiments and
  leave-one-area-out call) with that protocol's cell size, tile size, block size and seed: the
  manifest's `split` (blocks of `block_px` on the grid of the set's elevation raster) is the
  split, not a re-derivation of it.
- Every val/test block becomes a rectangle in the area's CRS; on a corpus grid every cell that
  overlaps one by any area is NaN in both the DSM and the nDSM (a test tile lies wholly inside
  test blocks, so all of its ground is NaN).
- `RasterCrops` redraws every crop that touches a NaN, so no training crop overlaps a masked cell
  (tests/test_pretrain_corpus.py draws crops and checks their windows).
The DSM and nDSM of a source are NaN at the same cells, so "relative" (DSM) and "ndsm" (nDSM)
pretraining draw from the same ground. One IGN tile (La Rochelle) is role "eval": held-out
crops for the pretraining loss, never trained on.

Resumable: a source whose folder exists is complete (each appears atomically) and is skipped;
prepared splits are cached in splits/*.json; corpus.json is rewritten at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
import rasterio.crs

from data_pipelines.atomic import atomic_dir, atomic_file
from data_pipelines.shared_data import shared_file

CORPUS_JSON = "corpus.json"
PRODUCTS = ("dsm", "ndsm")
SEED = 0  # every protocol's split seed (configs/experiments.py and areas.py leave it at 0)


@dataclasses.dataclass(frozen=True)
class HeldOutSplit:
  """A split whose val/test blocks the corpus masks: `areas.prepare_area(area, task, cell_size,
  tile_size, block_px=...)`; block_px None = prepare_area's own choice (the area's registry
  entry, else 2 x tile size). cell_size None = the corpus cell size."""

  area: str
  task: str
  cell_size: float | None
  tile_size: int
  block_px: int | None
  used_by: str

  def key(self, corpus_cell: float) -> str:
    cell = self.cell_size or corpus_cell
    return f"{self.area}_{self.task}_{cell:g}m_t{self.tile_size}_b{self.block_px or 'auto'}_s{SEED}"


# The splits models are evaluated on here (tests/test_pretrain_corpus.py checks them against
# configs/experiments.py and areas.py). Buildings and roads of one area are drawn on the same
# labelled area, so their splits agree; both are taken anyway. Seed 0 everywhere.
_EXP = "configs/experiments.py"
_LOAO = "areas.py at 1 m (leave-one-area-out; its block_px)"
HELD_OUT = (
  *(
    HeldOutSplit(
      "delft", t, 0.5, 64, 128, f"{_EXP}:cpu (delft_{t}); prepare_delft's defaults at 0.5 m"
    )
    for t in ("buildings", "roads")
  ),
  *(HeldOutSplit("delft", t, 1.0, 64, None, _LOAO) for t in ("buildings", "roads")),
  *(
    HeldOutSplit("delft", t, None, 64, None, "the Delft set areas.py makes at the corpus cell size")
    for t in ("buildings", "roads")
  ),
  HeldOutSplit("alexandria", "buildings", 2.0, 64, 128, f"{_EXP}:cpu (alexandria_buildings)"),
  HeldOutSplit("alexandria", "buildings", 1.0, 64, None, _LOAO),
  *(HeldOutSplit("gothenburg", t, 1.0, 64, None, _LOAO) for t in ("buildings", "roads")),
  # amsterdam_block_split: AHN2 and AHN3 share it (same grid, block_px, seed), so AHN3's is both
  HeldOutSplit("amsterdam_ahn3", "buildings", 1.0, 64, None, _LOAO + "; the AHN2 set shares it"),
)
# configs/experiments.py:paper (224 px tiles and blocks at 0.5 m / 2 m): a protocol for
# accelerators; masking it too masks 71 % of Delft instead of 41 % (build_corpus(paper=True)).
PAPER_HELD_OUT = (
  *(
    HeldOutSplit("delft", t, 0.5, 224, 224, f"{_EXP}:paper (delft_{t})")
    for t in ("buildings", "roads")
  ),
  HeldOutSplit("alexandria", "buildings", 2.0, 224, 224, f"{_EXP}:paper (alexandria_buildings)"),
)


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  kind: str  # "lidar": LAZ files -> las_to_rasters; "raster": (DSM, DTM) GeoTIFFs
  files: tuple[str, ...]  # relative to the shared data folder
  crs: str | None  # for LAZ headers without one
  min_cell: float  # the finest cell the data supports (point density, native grid)
  masks: tuple[str, ...]  # HeldOutSplit.area values whose val/test blocks are masked
  what: str
  place: str  # build_corpus(exclude=...) leaves a place out (leave-one-area-out pretraining)
  role: str = "train"  # "eval": held-out pretraining evaluation, never trained on
  bounds: Callable[[], tuple[float, float, float, float]] | None = None
  # raster sources: a canopy-height raster whose trees go back into a vegetation-free DSM
  # (prepare.with_canopy), so pretraining sees the trees the labelled sets' input has
  canopy: str | None = None


def _amsterdam_bounds():
  from data_pipelines.amsterdam import block_bounds

  return block_bounds()


def _ign(*tiles):
  return tuple(
    f"pretrain/test_semis_{t}_IGN69{'_cropped' if t.startswith('2021') else ''}.laz" for t in tiles
  )


SOURCES = (
  Source(
    "amsterdam_ahn2",
    "lidar",
    tuple(f"amsterdam/ahn2/unit_25gn1_{u}.laz" for u in range(1, 17)),
    "EPSG:28992",
    1.0,
    ("amsterdam_ahn3",),
    "Amsterdam Jordaan, AHN2 (2008-2010), 16 units, ~3.3 points/m2",
    "amsterdam",
    bounds=_amsterdam_bounds,
  ),
  Source(
    "amsterdam_ahn3",
    "lidar",
    tuple(f"amsterdam/ahn3/unit_25gn1_{u}.laz" for u in (2, 3, 4, 6, 7, 10, 14)),
    "EPSG:28992",
    1.0,
    ("amsterdam_ahn3",),
    "Amsterdam Jordaan, AHN3 (2014-2019), 7 units, ~3.4 points/m2",
    "amsterdam",
    bounds=_amsterdam_bounds,
  ),
  Source(
    "delft",
    "lidar",
    ("delft/ahn3_cropped_1.laz", "delft/ahn3_cropped_2.laz"),
    "EPSG:28992",
    0.5,
    ("delft",),
    "Delft, AHN3, ~14.6 points/m2",
    "delft",
  ),
  Source(
    "gothenburg",
    "raster",
    ("gothenburg/DSM_KRbig.tif", "gothenburg/DEM_KRbig.tif"),
    None,
    1.0,
    ("gothenburg",),
    "Gothenburg centre, UMEP DSM with its trees put back (CDSM) / DEM, 1 m",
    "gothenburg",
    canopy="gothenburg/CDSM_KRbig.tif",
  ),
  Source(
    "alexandria",
    "raster",
    ("alexandria/dsm.tif", "alexandria/dtm.tif"),
    None,
    2.0,
    ("alexandria",),
    "Alexandria VA, LiDAR DSM / DTM, 2 m",
    "alexandria",
  ),
  Source(
    "ign_brittany",
    "lidar",
    _ign("2023_0299_6802_LA93", "2023_0300_6802_LA93"),
    None,
    2.0,
    (),
    "IGN LiDAR HD, Brittany, 2 km2 mostly rural, ~0.25 points/m2",
    "brittany",
  ),
  Source(
    "ign_lamballe",
    "lidar",
    _ign("2023_0292_6833_LA93"),
    None,
    2.0,
    (),
    "IGN LiDAR HD near Lamballe, 1 km2, ~0.29 points/m2",
    "lamballe",
  ),
  Source(
    "ign_larochelle",
    "lidar",
    _ign("2021_0382_6565_LA93"),
    None,
    2.0,
    (),
    "IGN LiDAR HD south of La Rochelle, 0.75 km2, ~0.29 points/m2: held-out evaluation only",
    "la_rochelle",
    role="eval",
  ),
)


def _log(progress: bool, msg: str) -> None:
  if progress:
    print(f"corpus: {msg}", flush=True)


def held_out_split(spec: HeldOutSplit, out_dir: Path, corpus_cell: float) -> dict:
  """The split of `spec` as prepared by its labelled set, cached in out_dir/splits/KEY.json:
  grid (crs, transform, shape), block_px, block_splits, and the val/test blocks as rectangles."""
  from data_pipelines.areas import prepare_area

  key = spec.key(corpus_cell)
  path = out_dir / "splits" / f"{key}.json"
  if path.exists():
    return json.loads(path.read_text())
  cell = spec.cell_size or corpus_cell
  (out_dir / "splits").mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=f".{key}.", dir=out_dir / "splits") as tmp:
    # stride = tile size: the split does not depend on the stride, and fewer tiles are written
    manifest_path = prepare_area(
      spec.area,
      Path(tmp) / "set",
      spec.task,
      cell,
      spec.tile_size,
      spec.tile_size,
      block_px=spec.block_px,
      seed=SEED,
      progress=False,
    )
    manifest = json.loads(Path(manifest_path).read_text())
    # the grid the split's blocks are on: the tile set's elevation raster
    with rasterio.open(Path(manifest_path).parent / manifest["sources"]["elevation"]) as dsm:
      crs, transform, shape = dsm.crs.to_string(), dsm.transform, dsm.shape
  split = manifest["split"]
  bp, blocks = int(split["block_px"]), np.asarray(split["block_splits"])
  rects = {}
  for name, index in (("val", 1), ("test", 2)):
    rects[name] = []
    for br, bc in zip(*np.nonzero(blocks == index)):
      r0, c0 = int(br) * bp, int(bc) * bp
      r1, c1 = min(r0 + bp, shape[0]), min(c0 + bp, shape[1])
      x0, y1 = transform @ (c0, r0)  # (col, row) -> (x, y): top-left corner
      x1, y0 = transform @ (c1, r1)
      rects[name].append([float(x0), float(y0), float(x1), float(y1)])
  record = {
    "key": key,
    **dataclasses.asdict(spec),
    "cell_size": cell,
    "seed": SEED,
    "block_px": bp,
    "fractions": split["fractions"],
    "block_splits": blocks.tolist(),
    "crs": crs,
    "transform": list(transform)[:6],
    "shape": list(shape),
    "tiles": {s: v["count"] for s, v in manifest["splits"].items()},
    "rects": rects,
  }
  with atomic_file(path) as tmp_json:
    tmp_json.write_text(json.dumps(record, indent=1))
  return record


def rect_mask(rects, transform: rasterio.Affine, shape: tuple[int, int]) -> np.ndarray:
  """True at every cell of the north-up grid (transform, shape) overlapping a rectangle
  (xmin, ymin, xmax, ymax) by a positive area."""
  mask = np.zeros(shape, bool)
  cell, x_origin, y_origin = transform.a, transform.c, transform.f
  tol = 1e-6  # in cells: a rectangle edge on a cell edge must not take the neighbouring cell
  for x0, y0, x1, y1 in rects:
    c0 = max(0, math.floor((x0 - x_origin) / cell + tol))
    c1 = min(shape[1], math.ceil((x1 - x_origin) / cell - tol))
    r0 = max(0, math.floor((y_origin - y1) / cell + tol))
    r1 = min(shape[0], math.ceil((y_origin - y0) / cell - tol))
    if c1 > c0 and r1 > r0:
      mask[r0:r1, c0:c1] = True
  return mask


def _read(path) -> tuple[np.ndarray, dict]:
  from data_pipelines.raster_io import read_band

  with rasterio.open(path) as src:
    return read_band(src, masked=True).astype(np.float32).filled(np.nan), src.profile


def _source_rasters(src: Source, cell: float, scratch: Path) -> tuple[np.ndarray, np.ndarray, dict]:
  """(DSM, nDSM, profile) of a source at `cell`, NaN where either is missing."""
  if src.kind == "lidar":
    from data_pipelines.lidar import las_to_rasters

    out = las_to_rasters(
      [shared_file(f) for f in src.files],
      scratch,
      cell_size=cell,
      crs=src.crs,
      progress=False,
      bounds=src.bounds() if src.bounds else None,
    )
    dsm_path, ndsm_path = out["dsm"], out["ndsm"]
  else:
    from data_pipelines.prepare import height_above_ground
    from data_pipelines.resample import resample_raster

    dsm_path, dtm_path = (shared_file(f) for f in src.files)
    if src.canopy:
      from data_pipelines.prepare import with_canopy

      dsm_path = with_canopy(
        dsm_path, dtm_path, shared_file(src.canopy), scratch / "dsm_canopy.tif"
      )
    with rasterio.open(dsm_path) as s:
      native = s.res[0]
    if abs(native - cell) > 1e-9:
      dsm_path = resample_raster(dsm_path, scratch / "dsm.tif", cell)
      dtm_path = resample_raster(dtm_path, scratch / "dtm.tif", cell)
    ndsm_path = height_above_ground(dsm_path, dtm_path, scratch / "ndsm.tif")
  dsm, profile = _read(dsm_path)
  ndsm, _ = _read(ndsm_path)
  missing = ~(np.isfinite(dsm) & np.isfinite(ndsm))
  dsm[missing], ndsm[missing] = np.nan, np.nan
  return dsm, ndsm, profile


def _write(path: Path, array: np.ndarray, profile: dict, transform) -> None:
  from data_pipelines.raster_io import write_band

  write_band(
    path,
    array.astype(np.float32),
    dict(
      driver="GTiff",
      width=array.shape[1],
      height=array.shape[0],
      dtype="float32",
      nodata=np.nan,
      crs=profile["crs"],
      transform=transform,
      tiled=True,
      blockxsize=256,
      blockysize=256,
      compress="deflate",
    ),
  )


def build_source(
  src: Source, out_dir: Path, cell_size: float, splits: list[dict], progress: bool
) -> dict:
  """out_dir/NAME/{dsm,ndsm}.tif + source.json (atomically); returns the source record."""
  t = time.time()
  cell = max(cell_size, src.min_cell)
  with atomic_dir(out_dir / src.name) as tmp:
    dsm, ndsm, profile = _source_rasters(src, cell, tmp / "scratch")
    transform = profile["transform"]
    if profile["crs"] is None or abs(transform.a - cell) > 1e-9:
      raise ValueError(
        f"{src.name}: expected a {cell} m grid with a CRS, got {transform.a} m, {profile['crs']}"
      )
    data = np.isfinite(dsm)
    masked = np.zeros(dsm.shape, bool)
    for s in splits:
      if rasterio.crs.CRS.from_string(s["crs"]) != profile["crs"]:
        raise ValueError(
          f"{src.name}: split {s['key']} is in {s['crs']}, the source in {profile['crs']}"
        )
      masked |= rect_mask(s["rects"]["val"] + s["rects"]["test"], transform, dsm.shape)
    dsm[masked], ndsm[masked] = np.nan, np.nan
    # trim to the cells that hold data: fewer all-NaN crop positions to redraw
    rows, cols = np.nonzero(np.isfinite(dsm).any(1))[0], np.nonzero(np.isfinite(dsm).any(0))[0]
    if rows.size == 0:
      raise ValueError(f"{src.name}: nothing left after masking")
    win = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    trimmed = transform @ rasterio.Affine.translation(int(cols[0]), int(rows[0]))
    for name, array in (("dsm", dsm), ("ndsm", ndsm)):
      _write(tmp / f"{name}.tif", array[win], profile, trimmed)
    shutil.rmtree(tmp / "scratch", ignore_errors=True)
    km2 = cell * cell / 1e6
    record = {
      "name": src.name,
      "role": src.role,
      "what": src.what,
      "inputs": list(src.files),
      "files": {p: f"{src.name}/{p}.tif" for p in PRODUCTS},
      "crs": profile["crs"].to_string(),
      "cell_size": cell,
      "shape": list(dsm[win].shape),
      "transform": list(trimmed)[:6],
      "km2": {
        "data": round(float(data.sum()) * km2, 4),
        "masked": round(float((data & masked).sum()) * km2, 4),
        "kept": round(float(np.isfinite(dsm).sum()) * km2, 4),
      },
      "masked_splits": [s["key"] for s in splits],
      "build_seconds": round(time.time() - t, 1),
    }
    (tmp / "source.json").write_text(json.dumps(record, indent=1))
  _log(
    progress,
    f"{src.name}: {cell:g} m, {record['km2']['kept']} km2 kept, {record['km2']['masked']} masked "
    f"({record['build_seconds']} s)",
  )
  return record


def build_corpus(
  out_dir: str | Path,
  cell_size: float = 1.0,
  progress: bool = True,
  *,
  paper: bool = False,
  exclude: tuple[str, ...] = (),
  sources: tuple[Source, ...] = SOURCES,
  held_out: tuple[HeldOutSplit, ...] | None = None,
) -> dict:
  """Build (or finish building) the corpus in `out_dir`; returns the corpus.json dict.

  `cell_size` is the finest cell: sources whose point density or native grid cannot support it
  keep their own (Amsterdam 1 m, Alexandria and the IGN tiles 2 m; Delft reaches 0.5 m).
  `paper` also masks configs/experiments.py:paper's splits; `exclude` leaves whole places out
  (e.g. ("gothenburg",) for pretraining a leave-one-area-out run that tests on all of it)."""
  out_dir = Path(out_dir)
  cell_size = float(cell_size)
  if not cell_size > 0:
    raise ValueError(f"cell_size must be positive, got {cell_size}")
  held_out = (
    tuple(HELD_OUT + (PAPER_HELD_OUT if paper else ())) if held_out is None else tuple(held_out)
  )
  unknown = set(exclude) - {s.place for s in sources}
  if unknown:
    raise ValueError(
      f"unknown places {sorted(unknown)}; known: {sorted({s.place for s in sources})}"
    )
  out_dir.mkdir(parents=True, exist_ok=True)
  previous = out_dir / CORPUS_JSON
  if previous.exists() and json.loads(previous.read_text())["cell_size"] != cell_size:
    raise ValueError(
      f"{out_dir} holds a corpus at {json.loads(previous.read_text())['cell_size']} m; "
      f"asked for {cell_size} m (use another folder)"
    )
  t = time.time()
  records, split_records = [], {}
  for src in sources:
    if src.place in exclude:
      continue
    specs = [spec for spec in held_out if spec.area in src.masks]
    if src.masks and not specs:
      raise ValueError(
        f"{src.name}: no held-out split of {src.masks} given; refusing to build it unmasked"
      )
    keys = list(dict.fromkeys(spec.key(cell_size) for spec in specs))
    done = out_dir / src.name / "source.json"
    if done.exists():
      record = json.loads(done.read_text())
      if record["cell_size"] != max(cell_size, src.min_cell) or record["masked_splits"] != keys:
        raise ValueError(
          f"{done}: built at {record['cell_size']} m masking {record['masked_splits']}, not at "
          f"{max(cell_size, src.min_cell)} m masking {keys}: use another folder"
        )
      _log(progress, f"{src.name}: already built, skipped")
    else:
      for spec in specs:
        key = spec.key(cell_size)
        if key not in split_records:
          _log(progress, f"split {key}: preparing its labelled set")
          split_records[key] = held_out_split(spec, out_dir, cell_size)
      record = build_source(src, out_dir, cell_size, [split_records[k] for k in keys], progress)
    records.append(record)
  keys = list(dict.fromkeys(k for r in records for k in r["masked_splits"]))
  splits_used = [json.loads((out_dir / "splits" / f"{k}.json").read_text()) for k in keys]
  total = lambda role, what: round(sum(r["km2"][what] for r in records if r["role"] == role), 4)  # noqa: E731
  corpus = {
    "cell_size": cell_size,
    "products": {
      "dsm": "surface heights (m): normalisation 'relative' / 'minmax'",
      "ndsm": "height above ground (m): normalisation 'ndsm'",
    },
    "nodata": "NaN: no data, or a validation/test block of a held-out split",
    "excluded_places": sorted(exclude),
    "sources": records,
    "km2": {
      role: {w: total(role, w) for w in ("data", "masked", "kept")} for role in ("train", "eval")
    },
    "held_out_splits": [
      {
        k: s[k]
        for k in (
          "key",
          "area",
          "task",
          "cell_size",
          "tile_size",
          "block_px",
          "seed",
          "used_by",
          "block_splits",
          "crs",
          "transform",
          "shape",
          "tiles",
        )
      }
      for s in splits_used
    ],
    "build_seconds_this_call": round(time.time() - t, 1),
  }
  with atomic_file(previous, overwrite=True) as tmp:
    tmp.write_text(json.dumps(corpus, indent=1))
  _log(
    progress,
    f"{out_dir / CORPUS_JSON}: train {corpus['km2']['train']['kept']} km2 kept "
    f"({corpus['km2']['train']['masked']} masked), eval {corpus['km2']['eval']['kept']} km2",
  )
  return corpus


def corpus_rasters(corpus_dir: str | Path, normalisation: str) -> tuple[list[Path], list[Path]]:
  """(training, evaluation) rasters of a built corpus for a normalisation mode: nDSMs for
  "ndsm", DSMs otherwise."""
  corpus_dir = Path(corpus_dir)
  path = corpus_dir / CORPUS_JSON
  if not path.exists():
    raise FileNotFoundError(
      f"{path} not found: build the corpus with scripts/prepare_data.py corpus --out {corpus_dir}"
    )
  product = "ndsm" if normalisation == "ndsm" else "dsm"
  sources = json.loads(path.read_text())["sources"]
  return tuple(
    [corpus_dir / s["files"][product] for s in sources if s["role"] == role]
    for role in ("train", "eval")
  )
