"""The memory plan before the first step (demmae_jax/train/memory.py): an automatic plan splits the
global batch into micro-batches and gives the losses of the full batch (1 and 8 devices), is
recorded and reused on resume; `fit=strict` and plans that cannot fit stop with one message.

Memory limits are artificial (`memory.limit`), set from XLA's own analysis of the configured step
(`predicted_peak_bytes` of a reference run) so that it just does not fit."""

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines.raster_source import RasterCrops
from demmae_jax import config_files
from demmae_jax.train import loop, memory
from test_train_support import child_env, jacksboro_dem, run_tiny, tiny_config

STEPS = 3


# ------------------------------------------------------------------------------ units
def test_sizes_and_the_memory_a_device_has(monkeypatch):
  assert memory.parse_bytes("16GiB") == memory.parse_bytes("16G") == 16 * 2**30
  assert memory.parse_bytes("1.5 GB") == int(1.5 * 2**30)
  assert memory.parse_bytes("800MiB") == 800 * 2**20 and memory.parse_bytes("12345") == 12345
  with pytest.raises(ValueError, match="16GiB"):
    memory.parse_bytes("sixteen gigs")
  cpu = jax.devices("cpu")[:1]
  assert memory.device_memory(cpu, "2GiB") == (2 * 2**30, memory.device_memory(cpu, "2GiB")[1])
  monkeypatch.setenv(memory.LIMIT_ENV, "3GiB")
  assert memory.device_memory(cpu)[0] == 3 * 2**30
  monkeypatch.delenv(memory.LIMIT_ENV)
  free, note = memory.device_memory(cpu)  # this host's available memory
  assert 0 < free <= memory.host_available()[0] * 1.05 and "host" in note
  rss, peak = memory.host_rss()
  assert 0 < rss <= peak


# ------------------------------------------------------------------------------ the plan's moves
class PixelMLP(nnx.Module):
  """Per-pixel 2-layer MLP: activations (rows x 32 x 32 x 64) dwarf its parameters, as in a ViT."""

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(1, 64, rngs=rngs)
    self.fc2 = nnx.Linear(64, 1, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jnp.tanh(self.fc1(x)))[..., 0]


class Smooth(loop.Task):
  """Predict each pixel's crop mean from its height: a per-example mean squared error."""

  def build_model(self):
    return PixelMLP(nnx.Rngs(0))

  def loss_fn(self, model, batch, rng):
    x = batch["image"]
    return jnp.mean((model(x) - x.mean(axis=(1, 2, 3))[:, None, None]) ** 2), {}


def _smooth_config(total_steps=STEPS, **memory_keys):
  c = config_files.module("common").base_config()
  c.total_steps, c.global_batch = total_steps, 8
  c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 1e-2, 1, "constant"
  c.log.every_steps, c.log.progress, c.log.tensorboard = 1, False, False
  c.memory.update(dict(margin=0.0, min_micro_batch=1, **memory_keys))
  c.lock()
  return c


def _crops(start):
  return RasterCrops([jacksboro_dem()], 32, 8, seed=2).batches(start)


def test_a_step_too_big_is_split_recorded_reused_or_refused(tmp_path, capsys):
  ref = loop.train(Smooth(), _smooth_config(fit="off"), tmp_path / "ref", _crops)
  full = memory.read_plan(tmp_path / "ref")
  assert full["grad_accum_steps"] == 1 and full["reason"] == "as configured"
  limit = str(full["predicted_peak_bytes"] - 1)  # the configured step misses by one byte

  auto = loop.train(
    Smooth(), _smooth_config(STEPS + 1, limit=limit), tmp_path / "auto", _crops, stop_after=STEPS
  )
  plan = memory.read_plan(tmp_path / "auto")
  assert plan["grad_accum_steps"] > 1 and plan["global_batch"] == 8
  assert plan["micro_batch_per_device"] * plan["grad_accum_steps"] == 8
  assert plan["predicted_peak_bytes"] <= int(limit) < full["predicted_peak_bytes"]
  out = capsys.readouterr().out
  assert "does not fit" in out and "the global batch is kept" in out
  # The same global batch, so the same losses (a per-example mean: exact up to rounding).
  np.testing.assert_allclose(
    [h["loss"] for h in auto.history], [h["loss"] for h in ref.history], rtol=1e-6
  )

  # A resume uses the recorded plan, whatever the memory now.
  again = loop.train(Smooth(), _smooth_config(STEPS + 1), tmp_path / "auto", _crops)
  assert again.step == STEPS + 1 and "recorded in the workdir" in capsys.readouterr().out
  assert memory.read_plan(tmp_path / "auto") == plan

  # strict: no change of plan, one message with the numbers and the flag that fits.
  with pytest.raises(
    loop.DoesNotFit,
    match=rf"strict.*--config.grad_accum_steps="
    rf"{plan['grad_accum_steps']}",
  ):
    loop.train(Smooth(), _smooth_config(fit="strict", limit=limit), tmp_path / "strict", _crops)

  # A loss the split would change (not a mean over examples): the flag, not a silent change.
  inexact = Smooth()
  inexact.accumulation_exact = False
  with pytest.raises(loop.DoesNotFit, match=r"not a mean over examples.*--config.grad_accum_steps"):
    loop.train(inexact, _smooth_config(limit=limit), tmp_path / "inexact", _crops)

  # Nothing fits: stopped before any state or checkpoint exists.
  trainer = loop.Trainer(Smooth(), _smooth_config(), loop.shd.make_mesh())
  floor = memory.Planner(
    trainer, {"image": np.zeros((8, 32, 32, 1), np.float32)}, log=None
  ).lower_bound()
  with pytest.raises(loop.DoesNotFit, match="even the smallest plan .8 micro-batches of 1"):
    loop.train(Smooth(), _smooth_config(limit=str(floor + 1)), tmp_path / "none", _crops)
  t0 = time.perf_counter()
  with pytest.raises(loop.DoesNotFit, match="the train state alone .* take .* per device"):
    loop.train(Smooth(), _smooth_config(limit=str(floor - 1)), tmp_path / "none", _crops)
  assert time.perf_counter() - t0 < 10  # decided from the state's size, before any compile
  assert not any((tmp_path / "none" / "checkpoints").glob("[0-9]*"))
  assert not (tmp_path / "none" / memory.PLAN_FILE).exists()


# ------------------------------------------------------------------------------ exact on 1 and 8
def exactness(tmp: Path, mesh: dict | None = None, global_batch: int = 8) -> dict:
  """The tiny MAE as configured (never re-planned), then with a limit one byte under its step:
  losses, parameters and the automatic plan of both."""
  out = {}
  for arm in ("ref", "auto"):
    c = tiny_config(STEPS, **(mesh or {}))
    with c.unlocked():
      c.global_batch = global_batch
      c.memory.update(
        margin=0.0, allow_remat=False, min_micro_batch=1, fit="off" if arm == "ref" else "auto"
      )
      if arm == "auto":
        c.memory.limit = str(out["ref"]["plan"]["predicted_peak_bytes"] - 1)
    losses, params, _ = run_tiny(tmp / arm, STEPS, config=c)
    out[arm] = {"losses": losses, "plan": memory.read_plan(tmp / arm), "params": params}
  return out


def _check_exact(out: dict, global_batch: int) -> None:
  ref, auto = out["ref"], out["auto"]
  assert ref["plan"]["grad_accum_steps"] == 1
  assert auto["plan"]["grad_accum_steps"] > 1 and auto["plan"]["global_batch"] == global_batch
  # Each image draws its mask from its own key (fold_in(step key, global row)), so the split
  # changes only the order of sums.
  np.testing.assert_allclose(auto["losses"], ref["losses"], rtol=2e-6)
  for k, a in ref["params"].items():
    b = auto["params"][k]
    if k.endswith("attn/qkv/bias"):  # key biases: zero gradient up to rounding, which Adam scales
      d = a.shape[-1] // 3
      a, b = np.delete(a, np.s_[d : 2 * d], axis=-1), np.delete(b, np.s_[d : 2 * d], axis=-1)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=k)


# One device: the same split exactness is test_train_loop's gradient-accumulation test (the suite's
# time budget keeps only the 8-device run of the automatic plan here).


@pytest.mark.slow
@pytest.mark.multidevice
def test_the_automatic_plan_gives_the_full_batch_losses_on_eight_devices(tmp_path):
  import subprocess

  out = tmp_path / "result.npz"
  args = {"tmp": str(tmp_path), "mesh": {"data": 2, "fsdp": 4}, "global_batch": 16, "out": str(out)}
  proc = subprocess.run(
    [sys.executable, __file__, json.dumps(args)],
    env=child_env(8),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.with_suffix(".json").read_text())
  with np.load(out) as z:
    for arm in ("ref", "auto"):
      result[arm]["params"] = {k.split("|", 1)[1]: z[k] for k in z.files if k.startswith(arm)}
  assert result["devices"] == 8 and result["auto"]["plan"]["mesh"] == {
    "data": 2,
    "fsdp": 4,
    "model": 1,
  }
  _check_exact(result, 16)


if __name__ == "__main__":  # the 8-device child
  a = json.loads(sys.argv[1])
  res = exactness(Path(a["tmp"]), a["mesh"], a["global_batch"])
  np.savez(a["out"], **{f"{arm}|{k}": v for arm in res for k, v in res[arm].pop("params").items()})
  Path(a["out"]).with_suffix(".json").write_text(json.dumps({**res, "devices": jax.device_count()}))
