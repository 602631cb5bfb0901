"""The generic loop with a small regression task (a frozen "backbone" and a "head" predicting the
mean height of 4 x 4 crops of the real Jacksboro DEM): frozen variables, gradient accumulation,
NaN handling, keep-best, SIGTERM and workdir identity."""

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from data_pipelines.raster_source import RasterCrops
from demmae_jax import config_files, workdirs
from demmae_jax.inference.restore import restore
from demmae_jax.sharding import path_str
from demmae_jax.train import loop
from test_train_support import jacksboro_dem

BATCH = 8


def _config(total_steps=4, **kw):
  c = config_files.module("common").base_config()
  c.total_steps, c.global_batch = total_steps, BATCH
  c.optim.lr, c.optim.warmup_steps = 1e-2, 1
  c.checkpoint.every_steps = 2
  c.log.every_steps, c.log.progress, c.log.tensorboard = 1, False, False
  c.update(kw)
  c.lock()
  return c


class Regressor(nnx.Module):
  def __init__(self, rngs):
    self.backbone = nnx.Linear(16, 8, rngs=rngs)
    self.head = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.backbone(x.reshape(x.shape[0], -1))))[:, 0]


class MeanHeight(loop.Task):
  def __init__(self, trainable=nnx.Param, evals=None):
    self.trainable = trainable
    self.evals = evals or {}
    if evals:
      self.best_metric = "score"

  def build_model(self):
    return Regressor(nnx.Rngs(0))

  def loss_fn(self, model, batch, rng):
    x = batch["image"]
    err = model(x) - x.mean(axis=(1, 2, 3))
    return jnp.mean(err**2), {"abs_err": jnp.mean(jnp.abs(err))}

  def evaluate(self, model, step):
    return {"score": self.evals[step]} if step in self.evals else {}


def _source(nan_at_step=None, sigterm_at_step=None):
  crops = RasterCrops([jacksboro_dem()], 4, BATCH, seed=1)

  def batches(start):
    for step, b in enumerate(crops.batches(start), start):
      if step == nan_at_step:
        b["image"][0, 0, 0, 0] = np.nan
      if step == sigterm_at_step:
        os.kill(os.getpid(), signal.SIGTERM)
      yield b

  return batches


def _flat(tree):
  return {path_str(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_frozen_variables_have_no_optimizer_state_and_do_not_move(tmp_path):
  task = MeanHeight(trainable=nnx.All(nnx.Param, nnx.PathContains("head")))
  start = _flat(nnx.state(task.build_model(), nnx.Param))
  result = loop.train(task, _config(), tmp_path, _source())
  opt_paths = list(_flat(result.state["opt_state"]))
  assert opt_paths and not any("backbone" in p for p in opt_paths)
  assert set(_flat(result.state["params"])) == {"head/kernel", "head/bias"}
  rest = _flat(result.state["rest"])
  for k in ("backbone/kernel", "backbone/bias"):
    np.testing.assert_array_equal(rest[k], start[k])
  assert not np.array_equal(_flat(result.state["params"])["head/kernel"], start["head/kernel"])
  losses = [h["loss"] for h in result.history]
  assert losses[-1] < losses[0]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
  one = loop.train(MeanHeight(), _config(3), tmp_path / "one", _source())
  two = loop.train(MeanHeight(), _config(3, grad_accum_steps=2), tmp_path / "two", _source())
  np.testing.assert_allclose(
    [h["loss"] for h in two.history], [h["loss"] for h in one.history], rtol=1e-6
  )
  a, b = _flat(one.state["params"]), _flat(two.state["params"])
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  with pytest.raises(
    loop.NonFiniteLoss, match=r"non-finite at step 4.*last good checkpoint is step 2"
  ):
    loop.train(MeanHeight(), _config(6), tmp_path, _source(nan_at_step=3))
  ckpts = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert ckpts == [2]
  model, step = restore(nnx.eval_shape(MeanHeight().build_model), tmp_path)
  assert step == 2
  assert all(np.isfinite(v).all() for v in _flat(nnx.state(model)).values())


def test_a_nonfinite_step_returns_the_state_it_was_given_bit_for_bit():
  trainer = loop.Trainer(MeanHeight(), _config(), loop.shd.make_mesh())
  batch = next(_source()(0))
  step = trainer.compile(batch)
  bad = dict(batch, image=batch["image"].copy())
  bad["image"][0, 0, 0, 0] = np.nan
  state = trainer.init_state()
  before = jax.tree.map(np.asarray, state)  # the step donates its input
  after, metrics = step(state, bad, trainer.rng)
  assert not bool(metrics["finite"])
  for k in ("params", "rest", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, after[k]), before[k])
  assert int(after["step"]) == 1
  good, metrics = step(after, batch, trainer.rng)
  good, metrics = step(good, batch, trainer.rng)  # the schedule's warm-up starts at lr 0
  assert bool(metrics["finite"])
  moved = jax.tree.map(
    lambda a, b: not np.array_equal(a, b),
    jax.tree.map(np.asarray, good["params"]),
    before["params"],
  )
  assert all(jax.tree.leaves(moved))


def test_restoring_a_trained_model_logs_no_orbax_warning(tmp_path, caplog):
  loop.train(MeanHeight(), _config(2), tmp_path, _source())
  with caplog.at_level("WARNING"):
    model, step = restore(nnx.eval_shape(MeanHeight().build_model), tmp_path)
  assert step == 2
  assert not [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_sigterm_saves_then_a_restart_finishes_the_run(tmp_path):
  first = loop.train(MeanHeight(), _config(6), tmp_path, _source(sigterm_at_step=2))
  # The signal arrives while batch 2 is fetched; step 3 completes, is saved, and the run stops.
  assert first.preempted and first.step == 3
  assert (tmp_path / "checkpoints" / "3").is_dir()
  second = loop.train(MeanHeight(), _config(6), tmp_path, _source())
  assert not second.preempted and second.step == 6
  assert [h["step"] for h in second.history] == [4, 5, 6]
  # Same as never being interrupted.
  straight = loop.train(MeanHeight(), _config(6), tmp_path / "straight", _source())
  for k, v in _flat(straight.state["params"]).items():
    np.testing.assert_array_equal(_flat(second.state["params"])[k], v, err_msg=k)


def test_best_checkpoint_is_kept_beside_the_last(tmp_path):
  task = MeanHeight(evals={1: 0.5, 2: 0.9, 3: 0.1, 4: 0.2, 5: 0.3})
  config = _config(5, eval_every_steps=1)
  with config.unlocked():
    config.checkpoint.keep = 1
  loop.train(task, config, tmp_path, _source())
  ckpts = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert ckpts == [2, 5]  # the best (0.9) and the latest
  _, step = restore(
    nnx.eval_shape(task.build_model), tmp_path, "best", best_metric=task.best_metric
  )
  assert step == 2


def test_a_workdir_of_another_config_is_refused(tmp_path):
  loop.train(MeanHeight(), _config(2), tmp_path, _source())
  with pytest.raises(workdirs.WorkdirConfigMismatch, match=r"optim.lr: 0.01 -> 0.02"):
    loop.train(
      MeanHeight(), _config(2, optim={**_config().optim.to_dict(), "lr": 2e-2}), tmp_path, _source()
    )
  # Logging frequency may change; the finished run is not redone.
  c = _config(2)
  with c.unlocked():
    c.log.every_steps = 5
  assert loop.train(MeanHeight(), c, tmp_path, _source()).history == []


def test_a_key_added_later_with_its_old_behaviour_does_not_block_resume(tmp_path):
  """A workdir whose stored config predates `model.norm_pix_eps` (workdirs.ADDED_KEYS) resumes
  when the new key holds the value that reproduces the old behaviour, and is refused otherwise."""
  stored = {"model": {"mask_ratio": 0.75}, "seed": 0}
  (tmp_path / workdirs.CONFIG_FILE).write_text(json.dumps(stored))
  same = ml_collections.ConfigDict({"model": {"mask_ratio": 0.75, "norm_pix_eps": 1e-6}, "seed": 0})
  assert workdirs.check_config(tmp_path, same)
  other = ml_collections.ConfigDict(
    {"model": {"mask_ratio": 0.75, "norm_pix_eps": 1e-3}, "seed": 0}
  )
  with pytest.raises(workdirs.WorkdirConfigMismatch, match="norm_pix_eps"):
    workdirs.check_config(tmp_path, other)
  unknown = ml_collections.ConfigDict({"model": {"mask_ratio": 0.75, "depth_new": 1}, "seed": 0})
  with pytest.raises(workdirs.WorkdirConfigMismatch, match="depth_new"):
    workdirs.check_config(tmp_path, unknown)


def test_input_wait_is_reported_and_matches_a_known_delay(tmp_path):
  """An input that takes 60 ms a batch: the loop reports ~60 ms of input wait per step and a wait
  fraction of wait over the measured step time; with an instant input the wait is ~0."""
  delay = 0.06

  def slow(start):
    for i, b in enumerate(_source()(start)):
      if i:  # the first batch is fetched before the memory plan, outside any interval
        time.sleep(delay)
      yield b

  config = _config(9, checkpoint={**_config().checkpoint.to_dict(), "every_steps": 100})
  with config.unlocked():
    config.log.every_steps = 4
  rows = {}
  for name, source in (("slow", slow), ("fast", _source())):
    loop.train(MeanHeight(), config, tmp_path / name, source)
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    rows[name] = [r for r in map(json.loads, lines) if r["step"] > 1]
  assert [r["step"] for r in rows["slow"]] == [4, 8, 9]
  for r in rows["slow"] + rows["fast"]:
    assert {"input_wait_ms", "input_wait_fraction", "step_ms"} <= set(r)
    assert 0 <= r["input_wait_fraction"] <= 1
    np.testing.assert_allclose(
      r["input_wait_fraction"], r["input_wait_ms"] / r["step_ms"], rtol=1e-6
    )
  for slow_row, fast_row in zip(rows["slow"], rows["fast"]):
    assert 1e3 * delay <= slow_row["input_wait_ms"] < 1e3 * delay + 30
    assert slow_row["input_wait_ms"] <= slow_row["step_ms"]
    assert fast_row["input_wait_ms"] < 15  # 8 crops of 4 x 4 px from memory
  # the slow input dominates the tiny step: its share is the delay over the step time
  assert min(r["input_wait_fraction"] for r in rows["slow"]) > 0.5
