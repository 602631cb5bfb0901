"""Placement rules: which dimension FSDP shards, what stays replicated, and clear errors."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from demmae_jax import sharding as shd
from demmae_jax.models import mae


def _mesh(data=2, fsdp=4, model=1):
  return AbstractMesh((data, fsdp, model), shd.AXES)


def test_fsdp_shards_largest_divisible_dim_and_replicates_small_arrays():
  m = _mesh()
  # [768, 3072]: the larger dimension goes to 'fsdp'.
  assert shd.spec_for("blocks/0/mlp/fc1/kernel", (768, 3072), m, min_fsdp_size=1) == P(None, "fsdp")
  # The largest dimension (3) is not divisible by 4: the next one is used.
  assert shd.spec_for("x", (8, 3), m, min_fsdp_size=1) == P("fsdp", None)
  # Nothing divisible, too small, or a scalar: replicated.
  assert shd.spec_for("x", (3, 5), m, min_fsdp_size=1) == P()
  assert shd.spec_for("blocks/0/norm1/scale", (768,), m, min_fsdp_size=2**14) == P()
  assert shd.spec_for("step", (), m) == P()
  # One fsdp device: nothing to shard.
  assert shd.spec_for("x", (768, 3072), _mesh(8, 1), min_fsdp_size=1) == P()


def test_rules_first_match_wins_and_explicit_specs_are_checked():
  m = _mesh(2, 2, 2)
  rules = ((r"mlp/fc1/kernel$", (None, "model")), (r"cls_token", "replicate"), (".*", "fsdp"))
  assert shd.spec_for("params/blocks/3/mlp/fc1/kernel", (64, 256), m, rules, 1) == P(None, "model")
  assert shd.spec_for("params/cls_token", (1, 1, 64), m, rules, 1) == P()
  assert shd.spec_for("params/blocks/3/mlp/fc2/kernel", (256, 64), m, rules, 1) == P("fsdp", None)
  with pytest.raises(ValueError, match="not divisible"):
    shd.spec_for("mlp/fc1/kernel", (64, 255), m, rules, 1)
  with pytest.raises(ValueError, match="no sharding rule matches"):
    shd.spec_for("head/kernel", (4, 4), m, ((r"^blocks", "fsdp"),))
  with pytest.raises(ValueError, match="unknown sharding tactic"):
    shd.spec_for("head/kernel", (4, 4), m, ((".*", "fsdpp"),))


def test_stacked_blocks_keep_their_layer_axis_whole_and_rules_read_one_layer():
  m = _mesh(2, 2, 2)
  # FSDP picks among one layer's dimensions (the layer axis 12 is never sharded) ...
  assert shd.spec_for("blocks/mlp/fc1/kernel", (12, 768, 3072), m, min_fsdp_size=1) == P(
    None, None, "fsdp"
  )
  assert shd.spec_for(
    "opt_state/0/mu/decoder_blocks/attn/qkv/bias", (8, 96), m, min_fsdp_size=1
  ) == P(None, "fsdp")
  # ... and judges the size of one layer: 12 x 768 elements, 768 per layer, stay replicated.
  assert shd.spec_for("blocks/norm1/scale", (12, 768), m, min_fsdp_size=1024) == P()
  # A rule for one layer's array applies to every layer; naming the layer axis is allowed.
  rules = (
    (r"mlp/fc1/kernel$", (None, "model")),
    (r"fc2/kernel$", (None, "model", None)),
    (".*", "fsdp"),
  )
  assert shd.spec_for("params/blocks/mlp/fc1/kernel", (4, 64, 256), m, rules, 1) == P(
    None, None, "model"
  )
  assert shd.spec_for("params/blocks/mlp/fc2/kernel", (4, 256, 64), m, rules, 1) == P(
    None, "model", None
  )
  with pytest.raises(ValueError, match="layer axis"):
    shd.spec_for("blocks/mlp/fc2/kernel", (4, 256, 64), m, ((".*", ("fsdp", None, None)),), 1)
  # Per-layer paths (other models, old checkpoints) are not stacked.
  assert not shd.is_stacked("blocks/3/attn/qkv/kernel") and shd.is_stacked(
    "x/blocks/attn/proj/bias"
  )


def test_optimizer_state_is_placed_like_its_parameter():
  """Adam's moments carry the parameter's path as a suffix, so one rule table places both."""
  m = _mesh()
  from flax import nnx

  params = nnx.state(nnx.eval_shape(lambda: mae.build("tiny", in_chans=1)), nnx.Param)
  opt = jax.eval_shape(optax.adamw(1e-3).init, params)
  p_specs = {
    shd.path_str(k): s.spec
    for k, s in jax.tree_util.tree_flatten_with_path(
      shd.tree_shardings(params, m, min_fsdp_size=256)
    )[0]
  }
  o_specs = {
    shd.path_str(k): s.spec
    for k, s in jax.tree_util.tree_flatten_with_path(shd.tree_shardings(opt, m, min_fsdp_size=256))[
      0
    ]
  }
  mu = {k.split("/mu/", 1)[1]: v for k, v in o_specs.items() if "/mu/" in k}
  assert mu == p_specs
  assert p_specs["blocks/mlp/fc1/kernel"] == P(None, None, "fsdp")
  assert "pos_embed" not in p_specs  # fixed embeddings are not parameters
  assert all(v == P() for k, v in o_specs.items() if k.endswith("count"))


def test_make_mesh_fills_one_axis_and_rejects_impossible_shapes():
  n = jax.device_count()
  mesh = shd.make_mesh(data=-1)
  assert dict(mesh.shape) == {"data": n, "fsdp": 1, "model": 1}
  with pytest.raises(ValueError, match="at most one"):
    shd.make_mesh(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="needs"):
    shd.make_mesh(data=n + 1, fsdp=1)


def test_single_process_feeds_every_row_and_batch_must_divide():
  mesh = shd.make_mesh()
  n = jax.device_count()
  assert shd.process_batch_rows(mesh, 8 * n) == (0, 8 * n)
  batch = shd.global_batch({"image": np.ones((8 * n, 4, 4, 1), np.float32)}, mesh, 8 * n)
  assert batch["image"].shape == (8 * n, 4, 4, 1)
  assert batch["image"].sharding.spec == P(shd.BATCH_AXES, None, None, None)


@pytest.mark.multidevice
def test_a_batch_that_does_not_divide_the_devices_is_refused():
  """On 8 forced host devices (the suite pins one device, so in a child process)."""
  import os
  import subprocess
  import sys

  child = (
    "import jax; from demmae_jax import sharding as s; m = s.make_mesh(data=-1); "
    "assert jax.device_count() == 8; print(s.process_batch_rows(m, 16))\n"
    "try:\n  s.process_batch_rows(m, 9)\nexcept ValueError as e:\n  print('REFUSED', e)"
  )
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "JAX_PLATFORMS": "cpu",
  }
  done = subprocess.run(
    [sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=300
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert "(0, 16)" in done.stdout and "REFUSED" in done.stdout and "not divisible" in done.stdout
