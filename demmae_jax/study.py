"""The product's model study (issue 12): which segmentation model to recommend, measured on areas
it never trained on, beside today's models.

Two groups of runs, each resumable (a run whose result file exists is skipped, nothing written
earlier is replaced):
- `delft`: N labelled tiles of Delft (the draws, validation and test areas of
  `configs/experiments.py:cpu`, so the numbers sit beside docs/results.md), per task and seed;
- `loao`: leave-one-area-out at 1 m: train on every labelled area but one (all their training
  tiles), test on the whole held-out area (`data_pipelines.areas`).

Every run is scored twice: per test tile, alone (the paper's protocol) and over the test area as
`predict_raster` maps it (`demmae_jax.area_eval`: windows with their surroundings, the user's
view). The arms are `configs/finetune.py` presets plus overrides (`ARMS`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from data_pipelines.atomic import atomic_file, atomic_write_text
from demmae_jax import config_files

# `make model`'s recipe (train_recommended): ~5x the study's steps, as the pooled areas hold ~20x
# the tiles of 10-tile runs
MODEL_RECIPE = {
  "total_steps": 1500,
  "eval_every_steps": 100,
  "checkpoint.every_steps": 100,
  "optim.warmup_steps": 50,
}
# arm -> (configs/finetune.py preset, overrides); {task} is buildings or roads.
ARMS = {
  # docs/results.md's best model at 10 tiles: the UNet on per-tile min-max heights
  "unet_minmax": ("cpu_unet_{task}", {}),
  # the same UNet on height above ground (nDSM / 30 m): heights mean the same in every tile
  "unet_ndsm": ("cpu_unet_{task}", {"data.normalisation.mode": "ndsm"}),
  # ... with `make model`'s recipe: what the recommended model gives where it never trained
  "unet_ndsm_model": ("cpu_unet_{task}", {"data.normalisation.mode": "ndsm", **MODEL_RECIPE}),
  # ... trained with half its tiles shown as a 2x coarser source would give them (data.coarsen)
  "unet_ndsm_coarsen": (
    "cpu_unet_{task}",
    {"data.normalisation.mode": "ndsm", "data.coarsen": 0.5},
  ),
  "unet_ndsm_coarsen_model": (
    "cpu_unet_{task}",
    {"data.normalisation.mode": "ndsm", "data.coarsen": 0.5, **MODEL_RECIPE},
  ),
  # ... trained with half its tiles shown as a denser survey draws them (data.densify: crowns
  # without the pits of a sparse survey; Delft's 14.6 points/m2 against the others' <= 3.4)
  "unet_ndsm_densify_model": (
    "cpu_unet_{task}",
    {"data.normalisation.mode": "ndsm", "data.densify": 0.5, **MODEL_RECIPE},
  ),
  # the paper's head (Feature2Pyramid + UperNet) on a frozen encoder, as `make demo` trained it
  # until now; random encoder weights: docs/results.md measured the DEM-pretrained one no better
  "upernet_frozen": ("cpu_{task}", {}),
  # ... on height above ground, random or DEM-pretrained (DEM_ENCODER): the encoder is the only
  # path from the input to the head, as in the few-label probe
  "upernet_frozen_ndsm": ("cpu_{task}", {"data.normalisation.mode": "ndsm"}),
  "upernet_frozen_ndsm_dem": (
    "cpu_{task}",
    {"data.normalisation.mode": "ndsm", "init": "{encoder}"},
  ),
  # the ViT-UNet (models/hybrid.py), encoder finetuned, from random weights ...
  "hybrid_random": (
    "cpu_hybrid_{task}",
    {"data.normalisation.mode": "ndsm", "freeze_backbone": False},
  ),
  # ... and from the encoder pretrained on the high-resolution corpus (configs/dem_pretrain.py:
  # cpu_hr, exported to DEM_ENCODER): the same architecture and recipe
  "hybrid_dem": (
    "cpu_hybrid_{task}",
    {"data.normalisation.mode": "ndsm", "freeze_backbone": False, "init": "{encoder}"},
  ),
  # the same two encoders kept frozen (the stem and decoder learn): what the encoder's features
  # give without finetuning washing them out, as the few-label probe measures them
  "hybrid_frozen_random": ("cpu_hybrid_{task}", {"data.normalisation.mode": "ndsm"}),
  "hybrid_frozen_dem": (
    "cpu_hybrid_{task}",
    {"data.normalisation.mode": "ndsm", "init": "{encoder}"},
  ),
}
DEM_ENCODER = "runs/dem_mae_hr"
ARM_NAMES = {
  "unet_minmax": "UNet, per-tile min-max input (today's best, docs/results.md)",
  "unet_ndsm": "UNet, nDSM input (recommended)",
  "unet_ndsm_model": "UNet, nDSM input, `make model`'s recipe (1,500 steps)",
  "unet_ndsm_coarsen": "UNet, nDSM input, half the training tiles 2x coarsened",
  "unet_ndsm_coarsen_model": "UNet, nDSM input, 2x coarsened half, `make model`'s recipe",
  "unet_ndsm_densify_model": "UNet, nDSM input, half the tiles densified, `make model`'s recipe",
  "upernet_frozen": "frozen encoder + UperNet (the paper's arm; `make demo` until now)",
  "upernet_frozen_ndsm": "frozen random encoder + UperNet, nDSM",
  "upernet_frozen_ndsm_dem": "frozen DEM-pretrained encoder + UperNet, nDSM",
  "hybrid_random": "ViT-UNet, nDSM, random encoder (finetuned)",
  "hybrid_dem": "ViT-UNet, nDSM, DEM-pretrained encoder (finetuned)",
  "hybrid_frozen_random": "ViT-UNet, nDSM, random encoder (frozen)",
  "hybrid_frozen_dem": "ViT-UNet, nDSM, DEM-pretrained encoder (frozen)",
  "height_rule": "height rule, no learning (tuned on the training tiles)",
}
RECOMMENDED = "unet_ndsm"
# `make model`'s arm per task (trained with MODEL_RECIPE). Buildings also learn from tiles shown
# as a 2x coarser source would give them: leave one area out, 3 seeds each, Alexandria's 2 m
# source 42.7 -> 48.8 and the others within a seed's spread (Delft 67.8 -> 67.8, Amsterdam
# 83.4 -> 82.6, Gothenburg 90.4 -> 89.8; docs/results_product.md). Roads: not measured with it.
MODEL_ARMS = {"buildings": "unet_ndsm_coarsen", "roads": "unet_ndsm"}
RECIPE = {
  "total_steps": 300,
  "eval_every_steps": 50,
  "checkpoint.every_steps": 50,
  "optim.warmup_steps": 30,
  "global_batch": 8,
}
# How the area score predicts: 256 px windows (the UNet is fully convolutional) and the 8
# square symmetries averaged, as `scripts/predict.py --window 256 --tta` does.
AREA_PREDICT = {"window": 256, "tta": True}


def area_predict(spec: dict) -> dict:
  """AREA_PREDICT, with the training tile as the window when the model's normalisation depends
  on the window (per-tile min-max: segmenter.check_window)."""
  from demmae_jax.inference.segmenter import WINDOW_FREE_NORMALISATIONS

  modes = spec["normalisation"]["mode"].split("+")
  if spec["kind"] != "unet" or any(m not in WINDOW_FREE_NORMALISATIONS for m in modes):
    return {**AREA_PREDICT, "window": int(spec["tile_size"])}
  return dict(AREA_PREDICT)


def repredict(out: Path, arm: str, log=print) -> int:
  """Score the finished runs of `arm` over their test areas again with `area_predict` (after
  the window rule changed); no training."""
  from demmae_jax import area_eval
  from demmae_jax.inference.restore import load_trained

  n = 0
  for path in sorted((Path(out) / "results").rglob(f"{arm}/*.json")):
    rec = json.loads(path.read_text())
    workdir = Path(out) / "workdirs" / rec["id"]
    model, spec, _ = load_trained(workdir)
    if rec.get("area_predict") == area_predict(spec):
      continue
    rec["area"] = area_eval.evaluate_area(
      workdir,
      rec["area_manifest"],
      model=(model, spec),
      keep_prediction=workdir / "test_area_classes.tif",
      **area_predict(spec),
    )
    rec["area_iou"], rec["area_predict"] = rec["area"]["iou"], area_predict(spec)
    atomic_write_text(path, json.dumps(rec, indent=1), overwrite=True)
    log(f"{rec['id']}: area IoU {rec['area_iou']:.3f} with {area_predict(spec)}")
    n += 1
  return n


LOAO_AREAS = {
  "buildings": ("delft", "alexandria", "amsterdam_ahn2", "gothenburg"),
  "roads": ("delft", "gothenburg"),
}
# trained on whenever their place is not held out, never held out themselves: Amsterdam is tested
# on AHN2 (the whole block); AHN3 is the newer, denser survey of it, with trees in its DSM
LOAO_TRAIN_ONLY = {"buildings": ("amsterdam_ahn3",), "roads": ()}
LOAO_CELL, LOAO_TILE, LOAO_STRIDE = 1.0, 64, 32
# Training areas whose building labels outline roofs (Gothenburg) lose their eave band to
# "unknown", so the models learn one convention, the cadastres' wall lines (areas.prepare_area
# wall_lines). Held-out areas keep their labels. runs/study_v2 (docs) was prepared without.
WALL_LINES = True


def finetune_config(arm: str, task: str, manifest: str | Path, seed: int, **overrides):
  preset, arm_overrides = ARMS[arm]
  arm_overrides = {
    k: v.format(encoder=DEM_ENCODER) if isinstance(v, str) else v for k, v in arm_overrides.items()
  }
  c = config_files.get_config(
    "finetune",
    preset.format(task=task),
    **{
      **RECIPE,
      **arm_overrides,
      "data.manifest": str(manifest),
      "seed": seed,
      "data.seed": seed,
      "log.progress": False,
      "log.tensorboard": False,
      **overrides,
    },
  )
  c.log.every_steps = 25
  return c


def result_path(out: Path, run_id: str) -> Path:
  """Where the result JSON of run `run_id` (e.g. delft/roads/unet_ndsm/n10_s0) is, once finished."""
  return Path(out) / "results" / f"{run_id}.json"


def run_one(
  run_id: str,
  arm: str,
  task: str,
  manifest: Path,
  area_manifest: Path,
  seed: int,
  out: Path,
  log=print,
) -> dict:
  """Train one arm on `manifest`'s train split (validation on its val split, best kept), score it
  per test tile and over `area_manifest`'s test area; the result JSON is written last."""
  from demmae_jax import area_eval
  from demmae_jax.inference.evaluate import evaluate_split
  from demmae_jax.inference.restore import load_trained
  from demmae_jax.inference.segmenter import min_height_m
  from demmae_jax.train import finetune

  path = result_path(out, run_id)
  if path.exists():
    return json.loads(path.read_text())
  workdir = out / "workdirs" / run_id
  t0 = time.time()
  result = finetune.run(finetune_config(arm, task, manifest, seed), workdir)
  if result.preempted:
    raise KeyboardInterrupt(f"{run_id} stopped by a signal; rerun to resume")
  model, spec, step = load_trained(workdir)
  tiles, _ = evaluate_split(model, spec, str(manifest), "test")
  area = area_eval.evaluate_area(
    workdir,
    area_manifest,
    model=(model, spec),
    keep_prediction=workdir / "test_area_classes.tif",
    **area_predict(spec),
  )
  rec = {
    "id": run_id,
    "arm": arm,
    "task": task,
    "seed": seed,
    "manifest": str(manifest),
    "area_manifest": str(area_manifest),
    "best_step": step,
    "tiles": tiles,
    "area": area,
    "tile_iou": tiles["iou"],
    "area_iou": area["iou"],
    "seconds": round(time.time() - t0, 1),
    "area_predict": area_predict(spec),
    "min_height_m": min_height_m(spec),
    "recipe": {**RECIPE, **{k: v for k, v in ARMS[arm][1].items() if k in MODEL_RECIPE}},
  }
  atomic_write_text(path, json.dumps(rec, indent=1))
  log(f"{run_id}: tile IoU {tiles['iou']:.3f}, area IoU {area['iou']:.3f} ({rec['seconds']:.0f} s)")
  return rec


def rule_one(
  run_id: str,
  task: str,
  train_manifests,
  area_manifest: Path,
  out: Path,
  raster_train: Path | None = None,
  log=print,
) -> dict:
  """The height rule (demmae_jax/baselines.py): parameters tuned on the training tiles of
  `train_manifests` (with `raster_train`, the base tile set whose raster they were cut from, the
  rule runs on that whole raster and is cropped at the tiles, as it runs at test time; otherwise
  per tile), then run on the whole raster of `area_manifest` and scored on its test blocks."""
  from data_pipelines.reader import read_manifest
  from demmae_jax import baselines

  path = result_path(out, run_id)
  if path.exists():
    return json.loads(path.read_text())
  t0 = time.time()
  tiles = [baselines.load_tiles(str(m), "train") for m in train_manifests]
  label = np.concatenate([t["label"] for t in tiles])
  valid = np.concatenate([t["valid"] for t in tiles])
  if raster_train is not None:
    scene = baselines.raster_scene(str(raster_train))
    to_tiles = baselines.crop(np.concatenate([t["window"] for t in tiles]))
  else:
    m0 = read_manifest(str(train_manifests[0]))
    scene = baselines.Scene(
      np.concatenate([t["dsm"] for t in tiles]), valid > 0, float(m0["cell_size"])
    )
    to_tiles = lambda p: p  # noqa: E731
  rule, _ = baselines.tune(scene, label, valid, baselines.grid(task), to_tiles)
  area_m = read_manifest(str(area_manifest))
  pred = baselines.apply(rule, baselines.raster_scene(str(area_manifest)))[0].astype(np.uint8)
  from demmae_jax import area_eval

  area = area_eval.score_area(pred, area_m, "test", area_m.get("label_names", {}).values() or None)
  rec = {
    "id": run_id,
    "arm": "height_rule",
    "task": task,
    "rule": dataclasses.asdict(rule),
    "area_manifest": str(area_manifest),
    "area": area,
    "area_iou": area["iou"],
    "tile_iou": None,
    "seconds": round(time.time() - t0, 1),
  }
  atomic_write_text(path, json.dumps(rec, indent=1))
  log(f"{run_id}: area IoU {area['iou']:.3f} ({rec['seconds']:.0f} s)")
  return rec


def rule_runs(
  out: Path, *, seeds: int = 3, tasks=("buildings", "roads"), groups=("delft", "loao"), log=print
) -> list[dict]:
  """The height rule beside every model run: tuned on the same training tiles."""
  from data_pipelines.areas import get_area
  from demmae_jax.experiments import draws, plan

  recs = []
  if "delft" in groups:
    cfg = config_files.get_config("experiments", "cpu")
    data = draws.Data(cfg, out / "data" / "delft", log)
    for seed in range(seeds):
      for task in tasks:
        dataset = f"delft_{task}"
        manifest, _ = data.manifest(plan.Run(dataset, "unet", 10, seed))
        base = Path(data.base(dataset)["_dir"]) / "manifest.json"
        recs.append(
          rule_one(
            f"delft/{task}/height_rule/n10_s{seed}",
            task,
            [manifest],
            base,
            out,
            raster_train=base,
            log=log,
          )
        )
  if "loao" in groups:
    for task in tasks:
      for held_out in LOAO_AREAS[task]:
        loao_data(out, task, held_out, log)
        root = out / "data" / "areas" / task
        place = get_area(held_out).place  # the held-out place is never trained on
        train = [
          root / a / "tiles" / "manifest.json"
          for a in LOAO_AREAS[task] + LOAO_TRAIN_ONLY[task]
          if get_area(a).place != place
        ]
        train = [m for m in train if m.exists()]
        recs.append(
          rule_one(
            f"loao/{task}/{held_out}/height_rule/s0",
            task,
            train,
            root / f"{held_out}_holdout" / "tiles" / "manifest.json",
            out,
            log=log,
          )
        )
  return recs


# ------------------------------------------------------------------------------ groups
def delft_runs(
  out: Path,
  *,
  sizes=(10,),
  seeds: int = 3,
  arms=("unet_minmax", "unet_ndsm"),
  tasks=("buildings", "roads"),
  log=print,
) -> list[dict]:
  """N labelled Delft tiles: the cpu protocol's draws (docs/results.md), validation and test."""
  from demmae_jax.experiments import draws, plan

  cfg = config_files.get_config("experiments", "cpu")
  data = draws.Data(cfg, out / "data" / "delft", log)
  recs = []
  for seed in range(seeds):
    for n in sizes:
      for task in tasks:
        dataset = f"delft_{task}"
        manifest, _ = data.manifest(plan.Run(dataset, "unet", n, seed))
        base = Path(data.base(dataset)["_dir"]) / "manifest.json"
        for arm in arms:
          recs.append(
            run_one(f"delft/{task}/{arm}/n{n}_s{seed}", arm, task, manifest, base, seed, out, log)
          )
  return recs


def prepared_area(area: str, folder: Path, task: str, log=print, **kwargs) -> Path:
  """The manifest of `area`'s tile set for `task` in the study's geometry (LOAO_CELL, LOAO_TILE,
  LOAO_STRIDE) under `folder`, prepared on first use; keywords go to areas.prepare_area."""
  from data_pipelines.areas import prepare_area

  manifest = Path(folder) / "tiles" / "manifest.json"
  if not manifest.exists():
    what = ", ".join(f"{k}={v}" for k, v in kwargs.items() if v)
    log(f"data: preparing {area} {task} at {LOAO_CELL:g} m" + (f" ({what})" if what else ""))
    prepare_area(
      area,
      folder,
      task,
      cell_size=LOAO_CELL,
      tile_size=LOAO_TILE,
      stride=LOAO_STRIDE,
      progress=False,
      **kwargs,
    )
  return manifest


def loao_data(out: Path, task: str, held_out: str, log=print) -> tuple[Path, Path]:
  """(combined manifest: train/val of the other areas, test = the held-out area; the held-out
  area's own manifest, every block test) at 1 m, prepared on first use."""
  from data_pipelines.areas import leave_one_area_out

  root = out / "data" / "areas"
  manifests = {}
  for area in LOAO_AREAS[task] + LOAO_TRAIN_ONLY[task]:
    holdout = area == held_out
    folder = root / task / (f"{area}_holdout" if holdout else area)
    manifests[area] = prepared_area(
      area, folder, task, log, holdout=holdout, wall_lines=WALL_LINES and not holdout
    )
  combined = root / task / f"loao_{held_out}"
  if not (combined / "manifest.json").exists():
    leave_one_area_out(held_out, manifests, combined)
  return combined / "manifest.json", manifests[held_out]


def loao_runs(
  out: Path,
  *,
  seeds: int = 3,
  arms=(RECOMMENDED,),
  tasks=("buildings", "roads"),
  held_out_areas=None,
  log=print,
) -> list[dict]:
  """Leave one area out: per seed, task and held-out area (all of LOAO_AREAS[task], or those of
  them in `held_out_areas`), every arm."""
  recs = []
  for seed in range(seeds):
    for task in tasks:
      for held_out in LOAO_AREAS[task]:
        if held_out_areas and held_out not in held_out_areas:
          continue
        manifest, area_manifest = loao_data(out, task, held_out, log)
        for arm in arms:
          recs.append(
            run_one(
              f"loao/{task}/{held_out}/{arm}/s{seed}",
              arm,
              task,
              manifest,
              area_manifest,
              seed,
              out,
              log,
            )
          )
  return recs


def rescore(out: Path, log=print) -> int:
  """Recompute the area scores of finished runs from their kept test-area maps (after the
  metrics gained boundary IoU): no training, the same pixels; returns how many were updated."""
  import rasterio

  from data_pipelines.reader import read_manifest
  from demmae_jax import area_eval

  n = 0
  for path in sorted((Path(out) / "results").rglob("*.json")):
    rec = json.loads(path.read_text())
    kept = Path(out) / "workdirs" / rec["id"] / "test_area_classes.tif"
    if "boundary_iou" in rec.get("area", {}) or not kept.exists():
      continue
    with rasterio.open(kept) as src:
      pred = src.read(1)
    m = read_manifest(rec["area_manifest"])
    rec["area"] = area_eval.score_area(pred, m, "test", rec["area"]["per_class"].keys())
    rec["area_iou"] = rec["area"]["iou"]
    atomic_write_text(path, json.dumps(rec, indent=1), overwrite=True)
    n += 1
  log(f"rescored {n} runs")
  return n


def outline_scores(out: Path, log=print) -> int:
  """For held-out areas whose building labels outline roofs (areas.Area.outline), the area score
  of every finished run (models from their kept maps, the rule rerun from its tuned parameters)
  after converting its wall-line map to roof outlines (inference.outline, the eave measured on
  training data): `area_outline`. No training; returns how many were added."""
  from data_pipelines.areas import get_area
  from data_pipelines.reader import read_manifest
  from demmae_jax import area_eval, baselines
  from demmae_jax.inference import outline

  n = 0
  for path in sorted((Path(out) / "results" / "loao" / "buildings").rglob("*.json")):
    rec = json.loads(path.read_text())
    area_name = rec["id"].split("/")[2]
    if "area_outline" in rec or get_area(area_name).outline != "roof":
      continue
    m = read_manifest(rec["area_manifest"])
    if rec["arm"] == "height_rule":
      scene = baselines.raster_scene(rec["area_manifest"])
      pred = baselines.apply(baselines.Rule(**rec["rule"]), scene)[0].astype(np.uint8)
      again = area_eval.score_area(pred, m, "test", rec["area"]["per_class"].keys())["iou"]
      if abs(again - rec["area_iou"]) > 1e-9:
        raise ValueError(
          f"{path}: the rule rerun scores {again:.4f}, not its {rec['area_iou']:.4f}"
        )
    else:
      pred = _kept_map(out, rec, m)
      if pred is None:
        continue
    rec["area_outline"] = _roof_outline_score(pred, m, rec["area"]["per_class"].keys())
    rec["outline"] = {"convention": "roof", "eave_m": outline.EAVE_M}
    atomic_write_text(path, json.dumps(rec, indent=1), overwrite=True)
    log(
      f"{rec['id']}: area IoU {rec['area_iou']:.3f} -> {rec['area_outline']['iou']:.3f} as roof outlines"
    )
    n += 1
  return n


def thinned_holdout(out: Path, held_out: str, max_density: float, task="buildings", log=print):
  """The finished leave-one-area-out runs of `held_out` (models and the rule, as trained and
  tuned) scored again on the held-out area rasterised from its points thinned to `max_density`
  points per m2 (lidar.las_to_rasters): how much of a score is the survey's density. The thinned
  rasters are only the input: the same pixels are scored against the same labels as before (the
  area's labels take unknown cells from LiDAR classes, which thinning would move). No training;
  results under OUT/thinned/d{max_density}/ (skipped once there); returns their records."""
  from data_pipelines.reader import read_manifest
  from demmae_jax import area_eval, baselines
  from demmae_jax.inference.restore import load_trained
  from demmae_jax.inference.segmenter import input_raster_name

  finished = sorted((Path(out) / "results" / "loao" / task / held_out).rglob("*.json"))
  if not finished:
    raise ValueError(f"no finished leave-one-area-out runs of {held_out} under {out}/results")
  folder = Path(out) / "data" / "areas" / task / f"{held_out}_holdout_d{max_density:g}"
  manifest = prepared_area(held_out, folder, task, log, holdout=True, max_density=max_density)
  thin = read_manifest(str(manifest))
  recs = []
  for path in finished:
    rec = json.loads(path.read_text())
    target = Path(out) / "thinned" / f"d{max_density:g}" / f"{rec['id']}.json"
    if target.exists():
      recs.append(json.loads(target.read_text()))
      continue
    if rec["arm"] == "height_rule":
      pred = baselines.apply(baselines.Rule(**rec["rule"]), baselines.raster_scene(str(manifest)))
      m = read_manifest(rec["area_manifest"])
      area = area_eval.score_area(
        pred[0].astype(np.uint8), m, "test", rec["area"]["per_class"].keys()
      )
    else:
      workdir = Path(out) / "workdirs" / rec["id"]
      model = load_trained(workdir)[:2]
      raster = area_eval.source_path(thin, input_raster_name(model[1]))
      area = area_eval.evaluate_area(
        workdir, rec["area_manifest"], model=model, raster=raster, **area_predict(model[1])
      )
    done = {
      "id": rec["id"],
      "arm": rec["arm"],
      "max_density": max_density,
      "input_manifest": str(manifest),
      "area_manifest": rec["area_manifest"],
      "area": area,
      "area_iou": area["iou"],
      "native_area_iou": rec["area_iou"],
    }
    atomic_write_text(target, json.dumps(done, indent=1))
    log(f"{rec['id']}: area IoU {rec['area_iou']:.3f} -> {area['iou']:.3f} at {max_density:g}/m2")
    recs.append(done)
  return recs


def thinned_table(recs: list[dict]) -> str:
  """Markdown: per arm, the held-out area's IoU as surveyed and thinned (mean ± std, runs)."""
  rows = ["| arm | as surveyed | thinned |", "|---|---|---|"]
  for arm in dict.fromkeys(r["arm"] for r in recs):
    mine = [r for r in recs if r["arm"] == arm]
    native, thin = (_cell([r[k] for r in mine]) for k in ("native_area_iou", "area_iou"))
    rows.append(f"| {ARM_NAMES.get(arm, arm)} | {native} | {thin} |")
  return "\n".join(rows)


def _roof_outline_score(pred: np.ndarray, manifest: dict, classes) -> dict:
  """The test-area score of a wall-line map converted to roof outlines (inference.outline)."""
  from demmae_jax import area_eval
  from demmae_jax.inference import outline

  roofs = outline.to_roof_outline(pred, float(manifest["cell_size"]))
  return area_eval.score_area(roofs, manifest, "test", classes)


def _kept_map(out: Path, rec: dict, manifest: dict) -> np.ndarray | None:
  """A finished model run's kept test-area map as its record scores it: with the height gate
  (`rec["min_height_m"]`) applied, which a map kept before the gate lacks (gating twice changes
  nothing). None when no map was kept."""
  import rasterio

  from demmae_jax.area_eval import source_path
  from demmae_jax.inference.raster import gate_classes
  from demmae_jax.inference.segmenter import input_raster_name, read_spec

  workdir = Path(out) / "workdirs" / rec["id"]
  kept = workdir / "test_area_classes.tif"
  if not kept.exists():
    return None
  with rasterio.open(kept) as src:
    pred = src.read(1)
  if rec.get("min_height_m"):
    name = input_raster_name(read_spec(workdir))
    with rasterio.open(source_path(manifest, name)) as src:
      pred = gate_classes(pred, src.read(1, masked=True), float(rec["min_height_m"]))
  return pred


def gate_scores(out: Path, log=print) -> int:
  """Score the finished model runs from before the predictor's height gate
  (segmenter.min_height_m) with it, from their kept maps: no training, the same pixels with the
  gate applied. The earlier scores stay as `area_ungated` (and `area_outline_ungated`); returns
  how many runs were updated."""
  from data_pipelines.reader import read_manifest
  from demmae_jax import area_eval
  from demmae_jax.inference.segmenter import min_height_m, read_spec

  n = 0
  for path in sorted((Path(out) / "results").rglob("*.json")):
    rec = json.loads(path.read_text())
    workdir = Path(out) / "workdirs" / rec["id"]
    if rec["arm"] == "height_rule" or "min_height_m" in rec or not workdir.exists():
      continue
    rec["min_height_m"] = min_height_m(read_spec(workdir))
    if rec["min_height_m"] is not None:
      m = read_manifest(rec["area_manifest"])
      pred = _kept_map(out, rec, m)
      if pred is None:
        continue
      classes = rec["area"]["per_class"].keys()
      rec["area_ungated"], rec["area"] = rec["area"], area_eval.score_area(pred, m, "test", classes)
      rec["area_iou"] = rec["area"]["iou"]
      if "area_outline" in rec:
        rec["area_outline_ungated"] = rec["area_outline"]
        rec["area_outline"] = _roof_outline_score(pred, m, classes)
      log(
        f"{rec['id']}: area IoU {rec['area_ungated']['iou']:.3f} -> {rec['area_iou']:.3f} with "
        f"the {rec['min_height_m']:g} m height gate"
      )
      n += 1
    atomic_write_text(path, json.dumps(rec, indent=1), overwrite=True)
  return n


# ------------------------------------------------------------------------------ report
def load_results(out: Path) -> list[dict]:
  return [json.loads(p.read_text()) for p in sorted((Path(out) / "results").rglob("*.json"))]


def _cell(values) -> str:
  v = 100 * np.asarray([x for x in values if x is not None], np.float64)
  if not len(v):
    return ""
  return f"{v.mean():.1f}" + (f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else "") + f" ({len(v)})"


BEGIN, END = (
  "<!-- BEGIN GENERATED by scripts/run_study.py --report_only -->",
  "<!-- END GENERATED -->",
)


def write_into(doc: Path, text: str) -> None:
  """Replace what lies between the doc's BEGIN/END markers by `text`; the rest is kept."""
  page = Path(doc).read_text()
  if BEGIN not in page or END not in page:
    raise ValueError(f"{doc} has no {BEGIN} ... {END} block")
  head, rest = page.split(BEGIN, 1)
  page = head + BEGIN + "\n" + text.strip() + "\n" + END + rest.split(END, 1)[1]
  atomic_write_text(doc, page, overwrite=True)


def report(out: Path) -> str:
  """Markdown tables of every result under `out`: mean ± std over seeds (n)."""
  results = load_results(out)
  lines = []
  delft = [r for r in results if r["id"].startswith("delft/")]
  if delft:
    lines += [
      "### Delft, 10 labelled tiles (test IoU %: per tile | over the test area)",
      "",
      "| task | arm | per tile | test area | area boundary IoU |",
      "|---|---|---|---|---|",
    ]
    for task in ("buildings", "roads"):
      for arm in ARM_NAMES:
        rs = [r for r in delft if r["task"] == task and r["arm"] == arm]
        if rs:
          lines.append(
            f"| {task} | {ARM_NAMES[arm]} | {_cell(r['tile_iou'] for r in rs)} | "
            f"{_cell(r['area_iou'] for r in rs)} | "
            f"{_cell(r['area'].get('boundary_iou') for r in rs)} |"
          )
    lines.append("")
  loao = [r for r in results if r["id"].startswith("loao/")]
  if loao:
    lines += [
      "### Leave one area out, 1 m (test IoU % over the whole held-out area)",
      "",
      "| task | held-out area | arm | per tile | test area | area boundary IoU | test area, "
      "roof outlines* |",
      "|---|---|---|---|---|---|---|",
    ]
    for task in ("buildings", "roads"):
      for area in LOAO_AREAS[task]:
        for arm in ARM_NAMES:
          rs = [r for r in loao if r["task"] == task and r["arm"] == arm and f"/{area}/" in r["id"]]
          if rs:
            lines.append(
              f"| {task} | {area} | {ARM_NAMES[arm]} | {_cell(r['tile_iou'] for r in rs)} | "
              f"{_cell(r['area_iou'] for r in rs)} | "
              f"{_cell(r['area'].get('boundary_iou') for r in rs)} | "
              f"{_cell(r['area_outline']['iou'] for r in rs if 'area_outline' in r)} |"
            )
    lines += [
      "",
      "*Where the held-out labels outline roofs (Gothenburg), the map converted from "
      "wall lines to roof outlines first (`inference.outline`: grown by the 1 m eave "
      "measured on the training areas; `run_study.py --rescore`). The models learnt wall "
      "lines from cadastral footprints; the height rule thresholds height, so its own map "
      "already follows roof edges and converting it overshoots them: compare the models' "
      "converted maps with the rule's own.",
      "",
    ]
  return "\n".join(lines)


# ------------------------------------------------------------------------------ the product model
MODEL_STEPS = MODEL_RECIPE["total_steps"]


def train_recommended(
  out: Path,
  task: str,
  *,
  arm: str | None = None,
  steps: int = MODEL_STEPS,
  seed: int = 0,
  log=print,
) -> Path:
  """The recommended model for `task` (MODEL_ARMS[task], or another arm of ARMS) trained on
  every labelled area of the shared data at 1 m (their training blocks; validation on their
  validation blocks), scored on each area's test blocks over the area as `predict` maps it.
  Writes OUT/<task> (a finetuning workdir for `scripts/predict.py --workdir`) and
  OUT/<task>/test_areas.json; resumable."""
  from data_pipelines.combine import combine_tile_sets
  from demmae_jax import area_eval
  from demmae_jax.inference.restore import load_trained
  from demmae_jax.train import finetune

  out = Path(out)
  arm = arm or MODEL_ARMS[task]
  manifests = {}
  for area in LOAO_AREAS[task] + LOAO_TRAIN_ONLY[task]:
    if area == "amsterdam_ahn2":
      continue  # Amsterdam once: AHN3 (a train-only area) is the newer survey of the same place
    manifests[area] = prepared_area(
      area, out / "data" / task / area, task, log, wall_lines=WALL_LINES
    )
  pooled = out / "data" / task / "all"
  if not (pooled / "manifest.json").exists():
    combine_tile_sets(list(manifests.values()), pooled)
  workdir = out / task
  if (workdir / "test_areas.json").exists():  # finished: a rerun reports, never overwrites
    done = json.loads((workdir / "test_areas.json").read_text())
    for area, sc in done["scores"].items():
      log(f"{task} model on {area}'s test blocks: IoU {sc['iou']:.3f} (finished earlier)")
    return workdir
  config = finetune_config(
    arm,
    task,
    pooled / "manifest.json",
    seed,
    **{**MODEL_RECIPE, "total_steps": steps},
  )
  config.log.progress = True
  t0 = time.time()
  result = finetune.run(config, workdir)
  if result.preempted:
    raise KeyboardInterrupt(f"{workdir}: stopped by a signal; rerun to resume")
  model = load_trained(workdir)[:2]
  predict = area_predict(model[1])
  scores = {
    area: area_eval.evaluate_area(workdir, m, model=model, **predict)
    for area, m in manifests.items()
  }
  atomic_write_text(
    workdir / "test_areas.json",
    json.dumps(
      {
        "seconds": round(time.time() - t0),
        "arm": arm,
        "steps": steps,
        "area_predict": predict,
        "scores": scores,
      },
      indent=1,
    ),
  )
  for area, s in scores.items():
    log(f"{task} model on {area}'s test blocks: IoU {s['iou']:.3f}")
  return workdir


# ASPRS classes of the top return in the LiDAR areas' class rasters (data_pipelines/lidar.py)
LIDAR_CLASSES = {
  0: "no return",
  1: "unclassified (trees)",
  2: "ground",
  6: "building",
  9: "water",
  26: "civil structure",
}


def _by_class(top: np.ndarray) -> str:
  counts = np.bincount(top, minlength=256)
  return ", ".join(
    f"{LIDAR_CLASSES.get(c, c)} {counts[c]}" for c in np.argsort(-counts) if counts[c]
  )


def errors_by_lidar_class(out: Path, runs: list[str]) -> str:
  """Markdown: for each finished run held out on a LiDAR area, its false positive and false
  negative cells on the test area by the class of the cell's highest return (the class raster
  beside the area's DSM): trees called buildings show as false positives on class 1. The map is
  the kept one as its record scores it (the height gate applied)."""
  import rasterio

  from data_pipelines.reader import read_manifest
  from demmae_jax.area_eval import scored_pixels, source_path

  rows = ["| run | IoU | false positives by top-return class | false negatives by class |"]
  rows.append("|---|---|---|---|")
  for run_id in runs:
    if not result_path(out, run_id).exists():
      raise ValueError(f"{run_id}: not finished under {Path(out) / 'results'}")
    rec = json.loads(result_path(out, run_id).read_text())
    m = read_manifest(rec["area_manifest"])
    classes = source_path(m, "elevation").parent / "class.tif"
    if not classes.exists():
      raise ValueError(f"{run_id}: its area has no LiDAR class raster ({classes})")
    pred = _kept_map(out, rec, m)
    if pred is None:
      raise ValueError(f"{run_id}: no test-area map was kept")
    label, scored = scored_pixels(pred, m)
    with rasterio.open(classes) as src:
      top = src.read(1)
    fp, fn = scored & (pred == 1) & (label == 0), scored & (pred != 1) & (label == 1)
    cells = [_by_class(top[mask]) for mask in (fp, fn)]
    rows.append(f"| {run_id} | {100 * rec['area_iou']:.1f} | {cells[0]} | {cells[1]} |")
  return "\n".join(rows)


def figure(out: Path, path: Path, runs: list[str]) -> Path:
  """For each run id: its held-out area's DSM with the label's outlines (cyan) and the
  prediction's (red), and the prediction against the label (true positive white, false positive
  red, false negative blue, unlabelled grey). A run not finished under `out` is a ValueError."""
  missing = [r for r in runs if not result_path(out, r).exists()]
  if not runs or missing:
    raise ValueError(
      f"a figure needs finished runs under {Path(out) / 'results'}"
      + (f"; not finished: {missing}" if missing else "")
    )
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import rasterio

  from data_pipelines.reader import read_manifest
  from demmae_jax.area_eval import source_path

  fig, axes = plt.subplots(len(runs), 2, figsize=(12, 6 * len(runs)), squeeze=False)
  for row, run_id in zip(axes, runs):
    rec = json.loads(result_path(out, run_id).read_text())
    m = read_manifest(rec["area_manifest"])
    pred = _kept_map(out, rec, m)  # as its record scores it (the height gate applied)
    if pred is None:
      raise ValueError(f"{run_id}: no test-area map was kept")
    with rasterio.open(source_path(m, "label")) as src:
      label = src.read(1)
    with rasterio.open(source_path(m, "elevation")) as src:
      dsm = src.read(1, masked=True).astype(np.float32).filled(np.nan)
    lo, hi = np.nanpercentile(dsm, [2, 98])
    row[0].imshow(dsm, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    row[0].contour(label == 1, levels=[0.5], colors="cyan", linewidths=0.8)
    row[0].contour(pred == 1, levels=[0.5], colors="red", linewidths=0.8)
    known = (label != 255) & (pred != 255)
    rgb = np.full(label.shape + (3,), 0.6)
    rgb[known & (label == 0) & (pred == 0)] = 0.0
    rgb[known & (label == 1) & (pred == 1)] = 1.0
    rgb[known & (label == 0) & (pred == 1)] = (0.9, 0.1, 0.1)
    rgb[known & (label == 1) & (pred == 0)] = (0.2, 0.4, 1.0)
    row[1].imshow(rgb, interpolation="nearest")
    a = rec["area"]
    row[0].set_title(f"{run_id}: DSM, label (cyan), prediction (red)", fontsize=9)
    row[1].set_title(
      f"IoU {a['iou']:.2f}, boundary IoU {a.get('boundary_iou') or float('nan'):.2f}: "
      "TP white, FP red, FN blue",
      fontsize=9,
    )
    for ax in row:
      ax.set_xticks([])
      ax.set_yticks([])
  fig.tight_layout()
  path = Path(path)
  with atomic_file(path, overwrite=True) as tmp:
    fig.savefig(tmp, dpi=70, format="png")
  plt.close(fig)
  return path
