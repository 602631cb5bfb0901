"""A run trained, tested with its best validation checkpoint and written as a result; the sweep
of every planned run (resumable), and the encoder arm (a) needs."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from data_pipelines.atomic import atomic_write_text
from demmae_jax import config_files
from demmae_jax.experiments.draws import Data, PoolTooSmall
from demmae_jax.experiments.plan import Run, items, plan


def finetune_config(cfg, run: Run, manifest: Path, encoder: str):
  """configs/finetune.py's preset for the arm and task, with the protocol's recipe."""
  preset = (cfg.unet_preset if run.arm == "unet" else cfg.upernet_preset).format(task=run.task)
  c = config_files.get_config("finetune", preset)
  c.task = run.task
  c.seed, c.data.seed = run.seed, run.seed
  c.data.manifest = str(manifest)
  c.data.train_split, c.data.eval_split = "train", "val"
  c.data.normalisation.mode = run.norm
  c.total_steps, c.global_batch = int(cfg.steps), int(cfg.batch)
  c.eval_every_steps = c.checkpoint.every_steps = int(cfg.eval_every)
  c.optim.warmup_steps = int(cfg.warmup)
  c.log.every_steps = max(1, int(cfg.eval_every) // 2)
  c.log.progress, c.log.tensorboard = False, False
  if run.arm == "dem_mae":
    c.init = encoder
  elif run.arm == "imagenet_mae":
    c.init, c.channel_adapt = cfg.imagenet, "sum"
    c.model.head.layers = items(cfg.imagenet_layers, int)
  return c


def ensure_encoder(cfg, out: Path, log=print) -> str:
  """The DEM-pretrained encoder of arm (a): `cfg.encoder` if it exists, otherwise pretrain with
  configs/dem_pretrain.py:`cfg.pretrain_preset` under OUT/pretrain (resumable) and export it."""
  if cfg.encoder and Path(cfg.encoder).exists():
    return str(cfg.encoder)
  export = out / "pretrain" / "encoder"
  if export.exists():
    return str(export)
  from demmae_jax.train import pretrain

  workdir = out / "pretrain" / "workdir"
  log(
    f"encoder {cfg.encoder or '(none given)'} not found: pretraining "
    f"configs/dem_pretrain.py:{cfg.pretrain_preset} in {workdir}"
  )
  result = pretrain.run(config_files.get_config("dem_pretrain", cfg.pretrain_preset), workdir)
  if result.preempted:
    raise KeyboardInterrupt(
      f"pretraining stopped by a signal at step {result.step}; rerun to resume"
    )
  pretrain.export(workdir, export)
  return str(export)


def result_path(out: Path, run: Run) -> Path:
  return Path(out) / "results" / f"{run.id}.json"


def execute(cfg, run: Run, out: Path, data: Data, encoder: str) -> dict:
  """Train, evaluate on the test split with the best validation checkpoint, write the result."""
  import jax

  from demmae_jax.inference.evaluate import evaluate_split
  from demmae_jax.inference.restore import load_trained
  from demmae_jax.train import finetune

  manifest, draw = data.manifest(run)
  config = finetune_config(cfg, run, manifest, encoder)
  workdir = Path(out) / "workdirs" / run.id
  t0 = time.time()
  result = finetune.run(config, workdir)
  train_s = time.time() - t0
  if result.preempted:
    raise KeyboardInterrupt(f"{run.id} stopped by a signal at step {result.step}; rerun to resume")
  model, spec, step = load_trained(workdir, "best")
  # every test tile's prediction (~1 MB compressed): the figure then picks tiles spread over the area
  summary, tiles = evaluate_split(
    model, spec, str(manifest), "test", keep=10**6 if int(cfg.pictures) else 0
  )
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [m for m in metrics if "eval_iou" in m]
  rec = {
    "id": run.id,
    **dataclasses.asdict(run),
    "task": run.task,
    "protocol": cfg.protocol,
    "test": summary,
    "test_iou": summary["iou"],
    "test_boundary_iou": summary["boundary_iou"],
    "best_step": step,
    "val_iou": max((m["eval_iou"] for m in evals), default=None),
    "val_curve": [(m["step"], m["eval_iou"]) for m in evals],
    "steps": int(config.total_steps),
    "batch": int(config.global_batch),
    "train_seconds_this_call": round(train_s, 1),
    "seconds": round(time.time() - t0, 1),
    "init": config.init,
    "preset": config.preset,
    "draw": draw,
    "workdir": str(workdir),
    "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "jax": jax.__version__,
    "devices": str(jax.devices()),
  }
  path = result_path(out, run)
  path.parent.mkdir(parents=True, exist_ok=True)
  if tiles:
    np.savez_compressed(
      path.with_suffix(".tiles.npz"),
      image=tiles["image"][..., 0],
      label=tiles["label"],
      valid=tiles["valid"],
      pred=tiles["pred"],
    )
  atomic_write_text(path, json.dumps(rec, indent=1))
  return rec


def fmt_seconds(s: float) -> str:
  s = int(round(s))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def sweep(cfg, out: Path, log=print) -> dict:
  """Run every planned run that has no result yet; returns counts. Progress with an ETA from the
  runs finished in this call (per arm: a UNet step costs a fraction of an UperNet one)."""
  out = Path(out)
  check_protocol(cfg, out)
  runs = plan(cfg)
  todo = [r for r in runs if not result_path(out, r).exists()]
  finished = len(runs) - len(todo)
  log(
    f"experiments: {len(runs)} runs planned, {finished} finished earlier "
    f"(skipped), {len(todo)} to run; results in {out / 'results'}"
  )
  if any(r.arm == "imagenet_mae" for r in todo) and not (
    cfg.imagenet and Path(cfg.imagenet).exists()
  ):
    log(
      "experiments: arm (b) imagenet_mae SKIPPED: no ImageNet MAE weights given (--imagenet "
      "PATH to mae_pretrain_vit_base.pth or mae_visualize_vit_base.pth from "
      "github.com/facebookresearch/mae; these machines cannot download it)"
      + (f"; {cfg.imagenet} does not exist" if cfg.imagenet else "")
    )
    todo = [r for r in todo if r.arm != "imagenet_mae"]
  encoder = ensure_encoder(cfg, out, log) if any(r.arm == "dem_mae" for r in todo) else ""
  data = Data(cfg, out / "data", log)
  done: dict[str, list[float]] = {}
  counts = {
    "planned": len(runs),
    "skipped_finished": finished,
    "ran": 0,
    "not_possible": 0,
    "skipped_no_weights": len(runs) - finished - len(todo),
  }
  t_start = time.time()
  for i, run in enumerate(todo):
    mean_all = np.mean([s for v in done.values() for s in v]) if done else None
    eta = (
      sum(np.mean(done[r.arm]) if r.arm in done else mean_all for r in todo[i:]) if done else None
    )
    log(
      f"[{i + 1}/{len(todo)}] {run.id}  elapsed {fmt_seconds(time.time() - t_start)}, "
      f"ETA {fmt_seconds(eta) if eta is not None else 'after the first run'}"
    )
    try:
      t = time.time()
      rec = execute(cfg, run, out, data, encoder)
    except PoolTooSmall as e:
      counts["not_possible"] += 1
      log(f"    not possible: {e}")
      continue
    done.setdefault(run.arm, []).append(time.time() - t)
    counts["ran"] += 1
    log(
      f"    test IoU {rec['test_iou']:.4f} (best val IoU {rec['val_iou']:.4f} at step "
      f"{rec['best_step']}), {rec['seconds']:.0f} s"
    )
  log(
    f"experiments: ran {counts['ran']}, skipped {finished} finished, "
    f"{counts['skipped_no_weights']} without weights, {counts['not_possible']} not possible, "
    f"in {fmt_seconds(time.time() - t_start)}"
  )
  return counts


PROTOCOL_KEYS = (
  "protocol",
  "tile_size",
  "stride",
  "block_px",
  "draw",
  "val_tiles",
  "steps",
  "eval_every",
  "warmup",
  "batch",
  "upernet_preset",
  "unet_preset",
  "encoder",
  "imagenet_layers",
)


def check_protocol(cfg, out: Path) -> None:
  """One OUT folder holds one protocol: results of another recipe would mix in the tables."""
  want = {
    k: (list(items(cfg[k], int)) if k == "imagenet_layers" else cfg[k]) for k in PROTOCOL_KEYS
  }
  path = Path(out) / "protocol.json"
  if path.exists():
    have = json.loads(path.read_text())
    diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
    if diff:
      raise ValueError(
        f"{out} holds runs of another protocol ({diff}, as (there, now)); use another --out"
      )
  else:
    atomic_write_text(path, json.dumps(want, indent=1))
