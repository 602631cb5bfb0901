"""scripts/pretrain.py and scripts/export_encoder.py end to end on the shared real elevation
(pretrain/N46E008.tif, N49W123.tif, N44W072.hgt, alexandria/dsm.tif), tiny preset."""

import json
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from demmae_jax.sharding import path_str
from demmae_jax.train.reporting import read_jsonl
from test_train_support import ROOT, child_env

CONFIG = str(ROOT / "configs" / "dem_pretrain.py")


def _run(*args, timeout=600, env=None, devices=1):
  return subprocess.run(
    [sys.executable, *args],
    cwd=ROOT,
    env={**child_env(devices), **(env or {})},
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_help_and_a_mistyped_config_key_are_clear():
  out = _run("scripts/pretrain.py", "--help")
  # the usage on stdout and exit 0 (train/cli.py: absl alone would exit 1 after --help)
  assert out.returncode == 0 and "--workdir" in out.stdout and "--config" in out.stdout
  assert "Masked-autoencoder pretraining" in out.stdout and not out.stderr
  out = _run(
    "scripts/pretrain.py",
    f"--config={CONFIG}:tiny",
    "--config.optim.lrr=1",
    "--workdir=/nonexistent",
  )
  assert out.returncode == 2
  assert "bad config override" in out.stderr and "--config.optim.lrr" in out.stderr


@pytest.mark.slow
@pytest.mark.realdata
def test_pretrain_on_real_elevation_then_export_loads_in_from_pretrained(tmp_path):
  wd = tmp_path / "run"
  common = [
    f"--config={CONFIG}:tiny",
    f"--workdir={wd}",
    "--config.total_steps=6",
    "--config.checkpoint.every_steps=3",
    "--config.log.every_steps=1",
    "--config.log.picture_every_steps=6",
    "--config.log.progress=False",
    "--config.eval_every_steps=3",
  ]
  out = _run("scripts/pretrain.py", *common)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "finished step 6" in out.stdout
  rows = [r for r in read_jsonl(wd / "metrics.jsonl") if "loss" in r]
  assert [r["step"] for r in rows] == list(range(1, 7))
  assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rows)
  evals = [r for r in read_jsonl(wd / "metrics.jsonl") if "eval_loss" in r]
  assert [r["step"] for r in evals] == [3, 6]  # held-out N44W072.hgt crops, fixed masks
  assert all(np.isfinite(r["eval_loss"]) and r["eval_visible_mean_loss"] > 0 for r in evals)
  assert (wd / "pictures" / "reconstruction_step0000006.png").stat().st_size > 1000
  assert (wd / "pictures" / "loss.png").is_file()
  assert any((wd / "tensorboard").iterdir())
  assert sorted(p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]

  # Same workdir, other config: refused, nothing overwritten.
  out = _run("scripts/pretrain.py", *common, "--config.optim.warmup_steps=2")
  assert out.returncode == 2 and "another configuration" in out.stderr
  assert "optim.warmup_steps" in out.stderr

  export = tmp_path / "export"
  out = _run("scripts/export_encoder.py", f"--workdir={wd}", f"--out={export}")
  assert out.returncode == 0, out.stderr[-3000:]
  out = _run("scripts/export_encoder.py", f"--workdir={wd}", f"--out={export}")
  assert out.returncode == 2 and "exists" in out.stderr

  from demmae_jax import api
  from demmae_jax.inference.restore import restore
  from demmae_jax.train import pretrain
  from test_train_support import dem_pretrain_config

  model = api.from_pretrained(export)
  assert model.config.in_chans == 1 and model.config.img_size == 32
  config = dem_pretrain_config("tiny")
  restored, step = restore(nnx.eval_shape(pretrain.MAEPretrain(config).build_model), wd)
  assert step == 6
  a = {
    path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  }
  b = {
    path_str(k): v
    for k, v in jax.tree_util.tree_flatten_with_path(nnx.state(restored, nnx.Param))[0]
  }
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


# ------------------------------------------------------------------------------ the memory plan
# The design card's command (`base`, batch 256) on a machine without the memory for it either
# splits the batch or stops at once; the same two outcomes with the tiny preset and an artificial
# limit ($DEMMAE_MEMORY_LIMIT), set from XLA's analysis of the tiny step (docs/memory.md).
def _tiny_step_peak() -> int:
  """Per-device peak bytes of the tiny preset's step as configured (one compile, in process)."""
  from demmae_jax import sharding
  from demmae_jax.train import loop, memory, pretrain
  from test_train_support import dem_pretrain_config

  config = dem_pretrain_config("tiny")
  m = pretrain.model_config(config.model)
  example = {"image": jax.ShapeDtypeStruct((8, m.img_size, m.img_size, 1), np.float32)}
  trainer = loop.Trainer(
    pretrain.MAEPretrain(config), config, sharding.make_mesh(devices=jax.devices()[:1])
  )
  return memory.measure(trainer, example)[0].peak


@pytest.mark.realdata
def test_when_nothing_fits_the_command_stops_at_once_with_the_numbers(tmp_path):
  t0 = time.perf_counter()
  out = _run(
    "scripts/pretrain.py",
    f"--config={CONFIG}:tiny",
    f"--workdir={tmp_path / 'w'}",
    env={"DEMMAE_MEMORY_LIMIT": "2MiB"},
  )
  assert out.returncode == 2 and time.perf_counter() - t0 < 60
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  # needed, present, and what would fit
  assert lines[0].startswith("pretrain: error: the train state alone")
  assert "per device; 1.8 MiB is usable per device (limit 2MiB" in lines[0]
  assert "--config.mesh.fsdp=" in lines[0]
  assert not list((tmp_path / "w" / "checkpoints").glob("[0-9]*"))


@pytest.mark.slow
@pytest.mark.realdata
def test_a_batch_too_big_for_the_memory_is_split_and_trains(tmp_path):
  limit = str(_tiny_step_peak() - 1)  # misses by one byte
  wd = tmp_path / "w"
  out = _run(
    "scripts/pretrain.py",
    f"--config={CONFIG}:tiny",
    f"--workdir={wd}",
    "--config.total_steps=2",
    "--config.optim.warmup_steps=1",
    "--config.log.progress=False",
    "--config.memory.margin=0",
    "--config.memory.allow_remat=False",
    "--config.memory.min_micro_batch=1",
    env={"DEMMAE_MEMORY_LIMIT": limit},
  )
  assert out.returncode == 0, out.stderr[-3000:]
  plan = json.loads((wd / "memory_plan.json").read_text())
  assert plan["grad_accum_steps"] > 1 and plan["global_batch"] == 8
  assert plan["predicted_peak_bytes"] <= int(limit)
  assert "does not fit" in out.stdout and "the global batch is kept" in out.stdout
  assert f"(grad_accum_steps {plan['grad_accum_steps']})" in out.stdout
  rows = [r for r in read_jsonl(wd / "metrics.jsonl") if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
  assert all(r["peak_memory_gib"] > 0 for r in rows)


@pytest.mark.multidevice
def test_dry_run_plans_a_mesh_and_writes_nothing(tmp_path):
  wd = tmp_path / "w"
  out = _run(
    "scripts/pretrain.py",
    f"--config={CONFIG}:tiny",
    f"--workdir={wd}",
    "--dry_run",
    "--config.mesh.fsdp=8",
    "--config.mesh.data=1",
    "--config.sharding.min_fsdp_size=256",
    devices=8,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "'fsdp': 8" in out.stdout and "1 rows per device" in out.stdout
  assert "dry run: the step needs" in out.stdout and not wd.exists()
