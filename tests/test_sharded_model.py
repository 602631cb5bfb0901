"""The model on 8 forced host devices (in a child process: the suite pins one device):
the optimiser state of a run that starts from weights read eagerly is made sharded, and tensor
parallelism over the 'model' mesh axis (parameter rules + the model's activation constraints)
gives the 1-device losses and parameters."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LR_SUM = 3e-3  # 3 steps at lr <= 1e-3

CHILD = r"""
import json, re, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from demmae_jax import config_files, sharding as shd
from demmae_jax.models import mae
from demmae_jax.train import loop

assert jax.device_count() == 8


class Tiny(loop.Task):
  def __init__(self, jit_init):
    self.jit_init = jit_init

  def build_model(self):
    return mae.build("tiny", in_chans=1, seed=0)

  def loss_fn(self, model, batch, rng):
    return model(batch["image"], noise=batch["noise"])[0], {}


# Megatron-style tensor parallelism: qkv and fc1 split by output, proj and fc2 by input.
TP = [("attn/qkv/kernel$", (None, "model")), ("attn/qkv/bias$", ("model",)),
      ("attn/proj/kernel$", ("model", None)), ("mlp/fc1/kernel$", (None, "model")),
      ("mlp/fc1/bias$", ("model",)), ("mlp/fc2/kernel$", ("model", None))]


def config(mesh, rules):
  c = config_files.module("common").base_config()
  c.total_steps, c.global_batch = 10, 8
  c.optim.lr, c.optim.warmup_steps = 1e-3, 1
  c.mesh.update(mesh)
  c.sharding.rules, c.sharding.min_fsdp_size = rules, 256
  return c


rng = np.random.default_rng(0)
BATCHES = [{"image": rng.normal(size=(8, 32, 32, 1)).astype(np.float32),
            "noise": rng.uniform(size=(8, 64)).astype(np.float32)} for _ in range(3)]
out = {}

# 1. Weights read eagerly (jit_init False): the optimiser state is made by a jitted init placed
#    by the rules, on the devices that hold each shard.
mesh = shd.make_mesh(data=1, fsdp=8)
trainer = loop.Trainer(Tiny(jit_init=False), config({"data": 1, "fsdp": 8}, [(".*", "fsdp")]), mesh)
state = trainer.init_state()
got = jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
want = jax.tree.leaves(trainer.state_shardings["opt_state"])
out["opt_leaves"] = len(got)
out["opt_placed"] = all(x.sharding.is_equivalent_to(s, x.ndim) for (_, x), s in zip(got, want))
out["opt_fsdp"] = sorted(shd.path_str(p) for p, x in got if "fsdp" in str(x.sharding.spec))
out["params_placed"] = all(
    x.sharding.is_equivalent_to(s, x.ndim) for x, s in
    zip(jax.tree.leaves(state["params"]), jax.tree.leaves(trainer.state_shardings["params"])))


# 2. The same steps on 1 device and with tensor parallelism over 'model'.
def run(mesh_shape, rules, devices):
  mesh = shd.make_mesh(**mesh_shape, devices=devices)
  trainer = loop.Trainer(Tiny(jit_init=True), config(mesh_shape, rules), mesh)
  traced = trainer.trace(BATCHES[0])
  # Activation constraints naming the 'model' axis, in the step and the scans inside it.
  text = str(traced.jaxpr)
  model_constraints = len(re.findall(r"sharding_constraint\[[^\]]*'model'", text))
  step = traced.lower().compile()
  state, losses = trainer.init_state(), []
  for b in BATCHES:
    state, m = step(state, shd.global_batch(b, mesh, 8), trainer.rng)
    losses.append(float(m["loss"]))
  params = {shd.path_str(p): np.asarray(x).tolist() for p, x in
            jax.tree_util.tree_flatten_with_path(state["params"])[0]}
  specs = {shd.path_str(p): str(s.spec) for p, s in
           jax.tree_util.tree_flatten_with_path(trainer.state_shardings["params"])[0]}
  return {"losses": losses, "params": params, "specs": specs,
          "model_constraints": model_constraints}


out["one"] = run({"data": 1}, [(".*", "replicate")], jax.devices()[:1])
out["tp"] = run({"data": 4, "model": 2}, TP + [(".*", "replicate")], None)
out["fsdp_tp"] = run({"data": 2, "fsdp": 2, "model": 2}, TP + [(".*", "fsdp")], None)
json.dump(out, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def child(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharded") / "out.json"
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": str(REPO),
  }
  done = subprocess.run(
    [sys.executable, "-c", CHILD, str(out)],
    capture_output=True,
    text=True,
    env=env,
    timeout=1200,
    cwd=REPO,
  )
  assert done.returncode == 0, done.stderr[-4000:]
  return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.multidevice
def test_optimizer_state_of_weights_read_eagerly_is_made_sharded(child):
  assert child["opt_leaves"] > 0 and child["opt_placed"] and child["params_placed"]
  # Adam's moments of the large matrices really are split over the 8 fsdp devices.
  assert any(p.endswith("mu/blocks/mlp/fc1/kernel") for p in child["opt_fsdp"])
  assert any(p.endswith("nu/decoder_blocks/attn/qkv/kernel") for p in child["opt_fsdp"])


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize("run", ["tp", "fsdp_tp"])
def test_tensor_parallel_steps_match_one_device(child, run):
  import numpy as np
  from jax.sharding import PartitionSpec as P

  one, tp = child["one"], child[run]
  assert tp["specs"]["blocks/mlp/fc1/kernel"] == str(P(None, None, "model"))  # [layer, in, out]
  assert tp["specs"]["blocks/attn/proj/kernel"] == str(P(None, "model", None))
  assert tp["model_constraints"] > 0 and one["model_constraints"] == 0
  np.testing.assert_allclose(tp["losses"], one["losses"], rtol=2e-5)
  assert tp["params"].keys() == one["params"].keys()
  for k in one["params"]:
    a, b = np.asarray(tp["params"][k]), np.asarray(one["params"][k])
    if k.endswith("attn/qkv/bias"):
      # The key bias has a zero gradient (softmax ignores a shift shared by all keys): both runs
      # move it by Adam-normalised rounding noise, at most the summed lr (it starts at 0).
      d = a.shape[-1] // 3
      assert np.abs(a[..., d : 2 * d]).max() <= LR_SUM and np.abs(b[..., d : 2 * d]).max() <= LR_SUM
      a, b = np.delete(a, np.s_[d : 2 * d], -1), np.delete(b, np.s_[d : 2 * d], -1)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=k)
