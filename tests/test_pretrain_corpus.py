"""The high-resolution pretraining corpus (data_pipelines/pretrain_corpus.py): the val/test blocks
of the labelled sets the experiments prepare are NaN in it, no RasterCrops crop overlaps them,
the held-out splits are those of configs/experiments.py and areas.py, the build resumes."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from data_pipelines import pretrain_corpus as pc
from data_pipelines.raster_source import RasterCrops, read_elevation


def test_rect_mask_takes_every_overlapped_cell_and_no_edge_neighbour():
  t = rasterio.transform.from_origin(100.0, 50.0, 1.0, 1.0)  # 1 m cells, x 100.., y ..50
  m = pc.rect_mask([(102.0, 43.0, 104.0, 47.0)], t, (10, 10))  # on cell edges
  want = np.zeros((10, 10), bool)
  want[3:7, 2:4] = True
  np.testing.assert_array_equal(m, want)
  # half-metre edges (a 0.5 m grid's block on a 1 m grid): the half-covered cells are taken
  m = pc.rect_mask([(102.5, 43.0, 103.5, 47.5)], t, (10, 10))
  want[:] = False
  want[2:7, 2:4] = True
  np.testing.assert_array_equal(m, want)
  # partly outside the grid: clipped, not wrapped
  assert pc.rect_mask([(95.0, 30.0, 101.0, 41.0)], t, (10, 10)).sum() == 1


def _load(path):
  spec = importlib.util.spec_from_file_location(
    Path(path).stem, Path(__file__).parent.parent / path
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_held_out_splits_are_the_protocols_ones():
  from data_pipelines.areas import AREAS

  cpu = _load("configs/experiments.py").PROTOCOLS["cpu"]
  specs = {(s.area, s.task, s.cell_size, s.tile_size, s.block_px) for s in pc.HELD_OUT}
  # the cpu protocol's Delft (0.5 m, prepare_delft's default) and Alexandria (2 m) sets
  for area, cell, tasks in (
    ("delft", 0.5, ("buildings", "roads")),
    ("alexandria", 2.0, ("buildings",)),
  ):
    for task in tasks:
      assert (area, task, cell, cpu["tile_size"], cpu["block_px"]) in specs
  # every labelled area at the leave-one-area-out cell size, with prepare_area's block_px
  for name, area in AREAS.items():
    if name == "amsterdam_ahn2":  # shares amsterdam_ahn3's split (amsterdam_block_split)
      continue
    for task in area.tasks:
      assert (name, task, 1.0, 64, None) in specs, name
  paper = _load("configs/experiments.py").PROTOCOLS["paper"]
  assert {(s.tile_size, s.block_px) for s in pc.PAPER_HELD_OUT} == {
    (paper["tile_size"], paper["block_px"])
  }
  # every labelled place's sources mask it; the unlabelled ones have nothing to mask
  for s in pc.SOURCES:
    labelled = s.place in {a.place for a in AREAS.values()}
    assert bool(s.masks) == labelled, s.name
    assert all(any(h.area == m for h in pc.HELD_OUT) for m in s.masks)
  assert [s.name for s in pc.SOURCES if s.role == "eval"] == ["ign_larochelle"]


def test_corpus_rasters_pick_the_product_and_keep_eval_apart(tmp_path):
  sources = [
    {"role": r, "files": {"dsm": f"{n}/dsm.tif", "ndsm": f"{n}/ndsm.tif"}}
    for n, r in (("a", "train"), ("b", "eval"), ("c", "train"))
  ]
  (tmp_path / pc.CORPUS_JSON).write_text(json.dumps({"sources": sources}))
  train, held = pc.corpus_rasters(tmp_path, "ndsm")
  assert train == [tmp_path / "a/ndsm.tif", tmp_path / "c/ndsm.tif"] and held == [
    tmp_path / "b/ndsm.tif"
  ]
  assert pc.corpus_rasters(tmp_path, "relative")[0][0] == tmp_path / "a/dsm.tif"
  with pytest.raises(FileNotFoundError, match="prepare_data.py corpus"):
    pc.corpus_rasters(tmp_path / "none", "ndsm")


# ---- real data: the labelled places' sources, built once per module ----

LABELLED = tuple(s for s in pc.SOURCES if s.name in ("delft", "gothenburg", "alexandria"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  out = tmp_path_factory.mktemp("corpus") / "c"
  return out, pc.build_corpus(out, 1.0, progress=False, sources=LABELLED)


def _held_out_cells(split, transform, shape):
  """Val/test cells of a split on a corpus grid, from corpus.json's block grid (not the rects
  build_corpus used)."""
  bp, blocks = split["block_px"], np.asarray(split["block_splits"])
  t = rasterio.Affine(*split["transform"])
  rects = []
  for br, bc in zip(*np.nonzero(blocks > 0)):
    r0, c0 = br * bp, bc * bp
    r1, c1 = min(r0 + bp, split["shape"][0]), min(c0 + bp, split["shape"][1])
    (x0, y1), (x1, y0) = t @ (c0, r0), t @ (c1, r1)
    rects.append((x0, y0, x1, y1))
  return pc.rect_mask(rects, transform, shape)


def _tile_rects(manifest_path, splits=("val", "test")):
  import tensorflow as tf

  from data_pipelines.reader import read_manifest, split_files
  from data_pipelines.tile_records import decode_tile_numpy

  m = read_manifest(str(manifest_path))
  with rasterio.open(Path(manifest_path).parent / m["sources"]["elevation"]) as src:
    t = src.transform
  rects = []
  for split in splits:
    for rec in tf.data.TFRecordDataset(split_files(m, split)).as_numpy_iterator():
      col, row, w, h = decode_tile_numpy(rec, [], m["dtype"], m["tile_size"])["window"]
      (x0, y1), (x1, y0) = t @ (col, row), t @ (col + w, row + h)
      rects.append((x0 + 1e-3, y0 + 1e-3, x1 - 1e-3, y1 - 1e-3))  # the tile's ground, not its edge
  return rects


@pytest.mark.realdata
@pytest.mark.slow
def test_val_and_test_tiles_of_the_experiments_sets_are_nan_in_the_corpus(corpus, tmp_path):
  from data_pipelines.areas import prepare_area
  from data_pipelines.prepare import prepare_alexandria, prepare_delft

  out, manifest = corpus
  by_name = {s["name"]: s for s in manifest["sources"]}
  cpu = _load("configs/experiments.py").PROTOCOLS["cpu"]
  kw = dict(tile_size=cpu["tile_size"], stride=32, block_px=cpu["block_px"], progress=False)
  sets = {  # prepared here as the experiments and leave-one-area-out prepare them (other stride)
    "delft": [
      prepare_delft(tmp_path / "d_cpu", "roads", **kw),
      prepare_area("delft", tmp_path / "d_loao", "buildings", 1.0, progress=False),
    ],
    "alexandria": [
      prepare_alexandria(tmp_path / "a_cpu", **kw),
      prepare_area("alexandria", tmp_path / "a_loao", "buildings", 1.0, progress=False),
    ],
    "gothenburg": [prepare_area("gothenburg", tmp_path / "g_loao", "roads", 1.0, progress=False)],
  }
  overlapped = 0
  for name, manifests in sets.items():
    rec = by_name[name]
    for product in ("dsm", "ndsm"):
      with rasterio.open(out / rec["files"][product]) as src:
        a, t = src.read(1), src.transform
      for m in manifests:
        rects = _tile_rects(m)
        assert rects, m
        # the trim may drop a held-out tile's ground from the raster: outside is unseen too
        hit = pc.rect_mask(rects, t, a.shape)
        assert np.isnan(a[hit]).all(), f"{name} {product}: a val/test tile of {m} is not NaN"
        overlapped += int(hit.sum())
        # training tiles are mostly kept (the mask is the union of the protocols' splits)
        train = pc.rect_mask(_tile_rects(m, ("train",)), t, a.shape)
        assert np.isfinite(a[train]).any()
  assert overlapped > 10_000  # the check had held-out ground to look at
  assert by_name["delft"]["km2"]["masked"] > 0.3 * by_name["delft"]["km2"]["data"]


@pytest.mark.realdata
@pytest.mark.parametrize("product", ["dsm", "ndsm"])
def test_no_crop_overlaps_a_held_out_block(corpus, product):
  out, manifest = corpus
  mode = "ndsm" if product == "ndsm" else "relative"
  train, held = pc.corpus_rasters(out, mode)
  assert held == [] and len(train) == 3
  src = RasterCrops.from_files(train, crop=32, global_batch=64, seed=5, normalisation=mode)
  splits = {s["key"]: s for s in manifest["held_out_splits"]}
  masks = []
  for rec in manifest["sources"]:
    with rasterio.open(out / rec["files"][product]) as f:
      t, shape = f.transform, f.shape
    m = np.zeros(shape, bool)
    for key in rec["masked_splits"]:
      m |= _held_out_cells(splits[key], t, shape)
    assert np.isnan(read_elevation(out / rec["files"][product])[m]).all()
    masks.append(m)
  assert sum(m.sum() for m in masks) > 10_000  # (Gothenburg's held-out half is trimmed away)
  seen = [np.zeros(m.shape, bool) for m in masks]
  for step in range(25):  # 1600 crops
    for j in range(64):
      w = src.window(step, j)
      assert not masks[w.raster][w.y : w.y + w.size, w.x : w.x + w.size].any(), (step, j, w)
      seen[w.raster][w.y : w.y + w.size, w.x : w.x + w.size] = True
  assert all(s.any() for s in seen)  # every source was drawn from
  image = src.batch(0)["image"]
  assert np.isfinite(image).all() and 0 <= image.min() and image.max() <= 1


@pytest.mark.realdata
def test_build_resumes_skipping_finished_sources(corpus, tmp_path, monkeypatch):
  out, first = corpus
  before = {p: p.stat().st_mtime_ns for p in out.rglob("*.tif")}
  again = pc.build_corpus(out, 1.0, progress=False, sources=LABELLED)
  assert again["sources"] == first["sources"]
  assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tif")} == before  # nothing rewritten
  with pytest.raises(ValueError, match="holds a corpus at 1.0 m"):
    pc.build_corpus(out, 0.5, progress=False, sources=LABELLED)
  # a build killed while writing its second source leaves the first complete, no trace of the second
  real = pc._write

  def dying(path, *a, **k):
    if "alexandria" in str(path.parent.name) and path.name == "ndsm.tif":
      raise RuntimeError("killed")
    return real(path, *a, **k)

  part = tmp_path / "part"
  monkeypatch.setattr(pc, "_write", dying)
  with pytest.raises(RuntimeError):
    pc.build_corpus(part, 1.0, progress=False, sources=LABELLED[1:])
  assert sorted(p.name for p in part.iterdir()) == ["gothenburg", "splits"]
  monkeypatch.setattr(pc, "_write", real)
  done = pc.build_corpus(part, 1.0, progress=False, sources=LABELLED[1:])
  drop = lambda r: {k: v for k, v in r.items() if k != "build_seconds"}  # noqa: E731
  assert [drop(s) for s in done["sources"]] == [
    drop(s) for s in first["sources"] if s["name"] != "delft"
  ]


@pytest.mark.realdata
@pytest.mark.slow
def test_cli_builds_a_corpus_that_pretrain_reads_with_eval_held_out(tmp_path):
  import subprocess
  import sys

  from demmae_jax.train.reporting import read_jsonl
  from test_train_support import ROOT, child_env

  def run(*args):
    return subprocess.run(
      [sys.executable, *args],
      cwd=ROOT,
      env=child_env(),
      capture_output=True,
      text=True,
      timeout=900,
    )

  corpus = tmp_path / "corpus"
  keep = ("gothenburg", "la_rochelle")  # one labelled place, the evaluation tile
  out = run(
    "scripts/prepare_data.py",
    "corpus",
    "--out",
    str(corpus),
    "--exclude",
    *sorted({s.place for s in pc.SOURCES} - set(keep)),
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "gothenburg" in out.stdout and "ign_larochelle   eval" in out.stdout
  manifest = json.loads((corpus / pc.CORPUS_JSON).read_text())
  assert [s["name"] for s in manifest["sources"]] == ["gothenburg", "ign_larochelle"]
  assert manifest["excluded_places"] and manifest["km2"]["train"]["masked"] > 0
  # Gothenburg's vegetation-free DSM gets its trees back, as the labelled sets' input has them:
  # its nDSM is at least the canopy height wherever the canopy raster has a crown
  from data_pipelines.prepare import GOTHENBURG_CANOPY
  from data_pipelines.shared_data import shared_file

  with rasterio.open(corpus / "gothenburg" / "ndsm.tif") as g:
    ndsm, bounds = g.read(1), g.bounds
  with rasterio.open(shared_file(GOTHENBURG_CANOPY)) as c:
    trees = c.read(1, window=c.window(*bounds)).astype(np.float32)
  crowns = np.isfinite(ndsm) & (trees > 2)
  assert ndsm.shape == trees.shape and crowns.sum() > 100
  assert (ndsm[crowns] >= trees[crowns] - 0.01).all()
  wd = tmp_path / "run"
  cfg = str(ROOT / "configs" / "dem_pretrain.py")
  out = run(
    "scripts/pretrain.py",
    f"--config={cfg}:tiny",
    f"--workdir={wd}",
    f"--config.data.corpus={corpus}",
    "--config.data.normalisation.mode=ndsm",
    "--config.data.normalisation.scale_m=10",
    "--config.total_steps=4",
    "--config.optim.warmup_steps=1",
    "--config.eval_every_steps=2",
    "--config.log.every_steps=1",
    "--config.log.progress=False",
    "--config.log.picture_every_steps=0",
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rows = read_jsonl(wd / "metrics.jsonl")
  assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
  assert all(np.isfinite(r["eval_loss"]) for r in rows if "eval_loss" in r)
  # nDSM without a corpus is refused before anything is written
  out = run(
    "scripts/pretrain.py",
    f"--config={cfg}:tiny",
    f"--workdir={tmp_path / 'no'}",
    "--config.data.normalisation.mode=ndsm",
  )
  assert out.returncode != 0 and "set --config.data.corpus" in out.stderr
  assert not (tmp_path / "no").exists()
