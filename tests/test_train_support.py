"""Shared by the training tests: a tiny pretraining run on a real DEM, in-process or as a child
process (`python tests/test_train_support.py '{json args}'`) for runs that need their own XLA
flags (forced host devices), their own `jax.distributed` process, or to be killed.

Data: random 32 x 32 crops of the real Jacksboro fault DEM that ships with matplotlib."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 8


def dem_pretrain_config(preset: str = "tiny"):
  from demmae_jax import config_files

  return config_files.get_config("dem_pretrain", preset)


def tiny_config(total_steps: int, checkpoint_every: int = 1000, **mesh):
  c = dem_pretrain_config("tiny")
  with c.unlocked():
    c.total_steps = total_steps
    c.global_batch = GLOBAL_BATCH
    c.optim.warmup_steps = 1
    c.checkpoint.every_steps = checkpoint_every
    c.checkpoint.async_save = True
    c.log.every_steps = 1
    c.log.picture_every_steps = 0
    c.log.progress = False
    c.log.tensorboard = False
    c.sharding.min_fsdp_size = 256  # so that the tiny model's matrices really are sharded
    for k, v in mesh.items():
      c.mesh[k] = v
  return c


def jacksboro_dem() -> np.ndarray:
  from matplotlib import cbook

  return np.asarray(cbook.get_sample_data("jacksboro_fault_dem.npz")["elevation"], np.float32)


def crops(seed: int = 0):
  from data_pipelines.raster_source import RasterCrops

  return RasterCrops([jacksboro_dem()], 32, GLOBAL_BATCH, seed=seed)


def flat_params(state) -> dict[str, np.ndarray]:
  import jax
  from jax.experimental import multihost_utils

  from demmae_jax.sharding import path_str

  leaves = jax.tree_util.tree_flatten_with_path(state["params"])[0]
  out = {}
  for path, x in leaves:
    if jax.process_count() > 1:
      x = multihost_utils.process_allgather(x, tiled=True)
    out[path_str(path)] = np.asarray(x)
  return out


def run_tiny(
  workdir,
  total_steps,
  *,
  mesh=None,
  devices=None,
  stop_after=None,
  delay=0.0,
  checkpoint_every=1000,
  config=None,
):
  """Train the tiny MAE; returns (losses per step, flat final params, Result)."""
  from demmae_jax import sharding
  from demmae_jax.train import loop, pretrain

  config = config or tiny_config(total_steps, checkpoint_every, **(mesh or {}))
  m = sharding.make_mesh(**config.mesh, devices=devices)
  rows = sharding.process_batch_rows(m, config.global_batch)
  source = crops()

  def batches(start):
    for b in source.batches(start, rows):
      time.sleep(delay)
      yield b

  result = loop.train(
    pretrain.MAEPretrain(config), config, workdir, batches, mesh=m, stop_after=stop_after
  )
  losses = [h["loss"] for h in result.history if "loss" in h]
  return losses, flat_params(result.state), result


def child(args: dict) -> None:
  """Entry point of a child process; writes {losses} JSON and params .npz to args['out']."""
  import jax

  if args.get("memory_limit"):  # what the memory plan takes as one device's memory
    os.environ["DEMMAE_MEMORY_LIMIT"] = args["memory_limit"]
  if args.get("coordinator"):
    jax.distributed.initialize(args["coordinator"], args["num_processes"], args["process_id"])
  devices = jax.devices()[: args["num_devices"]] if args.get("num_devices") else None
  losses, params, result = run_tiny(
    args["workdir"],
    args["steps"],
    mesh=args.get("mesh"),
    devices=devices,
    stop_after=args.get("stop_after"),
    delay=args.get("delay", 0.0),
    checkpoint_every=args.get("checkpoint_every", 1000),
  )
  if jax.process_index() == 0 and args.get("out"):
    out = Path(args["out"])
    np.savez(out.with_suffix(".npz"), **params)
    out.with_suffix(".json").write_text(
      json.dumps(
        {
          "losses": losses,
          "step": result.step,
          "devices": jax.device_count(),
          "param_specs": {
            k: str(v.sharding.spec) for k, v in _leaves_with_paths(result.state["params"]).items()
          },
        }
      )
    )


def _leaves_with_paths(tree):
  import jax

  from demmae_jax.sharding import path_str

  return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def child_env(num_host_devices: int = 1) -> dict:
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="2",
    PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
  )
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_host_devices}"
  return env


def start_child(args: dict, num_host_devices: int = 1, **popen) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, __file__, json.dumps(args)], cwd=ROOT, env=child_env(num_host_devices), **popen
  )


def read_child(out: Path) -> tuple[dict, dict[str, np.ndarray]]:
  out = Path(out)
  with np.load(out.with_suffix(".npz")) as z:
    params = {k: z[k] for k in z.files}
  return json.loads(out.with_suffix(".json").read_text()), params


if __name__ == "__main__":
  child(json.loads(sys.argv[1]))


def per_layer_tree(pure: dict, edit=None, leaf: str | None = None) -> dict:
  """A pure-dict state with stacked blocks as checkpoints held it before the blocks were stacked:
  one array per block ('blocks/3/attn/qkv/kernel'). `edit(flat)` may change the flat
  {path: array} first; `leaf` puts every array under that key (the train state's 'value')."""
  import jax

  from demmae_jax.sharding import path_str

  flat = {}
  for p, x in jax.tree_util.tree_flatten_with_path(pure)[0]:
    k = path_str(p)
    head, _, tail = k.partition("/")
    if head in ("blocks", "decoder_blocks"):
      flat.update({f"{head}/{i}/{tail}": np.asarray(x[i]) for i in range(x.shape[0])})
    else:
      flat[k] = np.asarray(x)
  if edit:
    edit(flat)
  tree = {}
  for k, v in flat.items():
    *parents, last = k.split("/") + ([leaf] if leaf else [])
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = v
  return tree
