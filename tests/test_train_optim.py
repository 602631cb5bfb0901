"""The optimiser follows the official MAE recipe: which parameters decay, the lr rule, the
schedules, and BEiT layer-wise lr decay."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from demmae_jax.models import mae
from demmae_jax.sharding import path_str
from demmae_jax.train import optim


def _cfg(**kw):
  c = ml_collections.ConfigDict(
    dict(
      base_lr=1.5e-4,
      lr=None,
      betas=(0.9, 0.95),
      eps=1e-8,
      weight_decay=0.05,
      schedule="cosine",
      warmup_steps=10,
      min_lr=0.0,
      power=1.0,
      clip_grad_norm=0.0,
      layer_decay=None,
    )
  )
  c.update(kw)
  return c


@functools.cache
def _params():
  return nnx.state(mae.build("tiny", in_chans=1), nnx.Param)


def test_weight_decay_skips_biases_norms_and_special_tokens():
  yes, no = optim.weight_decay_groups(
    nnx.state(nnx.eval_shape(lambda: mae.build("tiny", in_chans=1)), nnx.Param)
  )
  assert "cls_token" in no and "mask_token" in no
  assert "blocks/attn/qkv/bias" in no and "blocks/norm1/scale" in no and "norm/bias" in no
  assert "blocks/attn/qkv/kernel" in yes and "patch_embed/proj/kernel" in yes
  assert "decoder_pred/kernel" in yes
  # Position embeddings are fixed, not parameters: they never reach the optimiser.
  assert not any("pos_embed" in p for p in yes + no)
  # Every decayed array is a matrix (or conv kernel); stacked block arrays are judged per layer.
  flat = {
    path_str(k): v
    for k, v in jax.tree_util.tree_flatten_with_path(
      nnx.state(nnx.eval_shape(lambda: mae.build("tiny", in_chans=1)), nnx.Param)
    )[0]
  }
  assert all(flat[p].ndim - ("blocks/" in p) >= 2 for p in yes)


@pytest.mark.slow
def test_zero_gradient_step_decays_only_decayed_parameters():
  params = _params()
  tx, sched = optim.make(
    _cfg(lr=1e-2, warmup_steps=0, schedule="constant"), params, total_steps=10, global_batch=8
  )
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, state, params)
  u = {path_str(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(updates)[0]}
  p = {path_str(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  np.testing.assert_allclose(
    u["blocks/mlp/fc1/kernel"], -1e-2 * 0.05 * p["blocks/mlp/fc1/kernel"], rtol=1e-6
  )
  assert not u["cls_token"].any() and not u["blocks/norm1/scale"].any()


def test_lr_follows_the_batch_scaling_rule_and_warmup_cosine():
  assert optim.learning_rate(_cfg(), 4096) == pytest.approx(1.5e-4 * 16)
  assert optim.learning_rate(_cfg(lr=3e-4), 4096) == 3e-4
  sched = optim.schedule(_cfg(min_lr=1e-6), total_steps=110, global_batch=256)
  assert float(sched(0)) == 0.0
  assert float(sched(5)) == pytest.approx(0.75e-4)
  assert float(sched(10)) == pytest.approx(1.5e-4)
  assert float(sched(60)) == pytest.approx((1.5e-4 + 1e-6) / 2, rel=1e-5)  # half-way down
  assert float(sched(110)) == pytest.approx(1e-6)


def test_polynomial_schedule_and_bad_schedule_names():
  sched = optim.schedule(_cfg(schedule="polynomial", lr=1e-3, power=1.0), 110, 8)
  assert float(sched(10)) == pytest.approx(1e-3)
  assert float(sched(60)) == pytest.approx(0.5e-3)
  assert float(sched(110)) == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(ValueError, match="unknown schedule"):
    optim.schedule(_cfg(schedule="cosin"), 100, 8)
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.schedule(_cfg(warmup_steps=100), 100, 8)


@pytest.mark.slow
def test_layer_decay_scales_updates_by_depth():
  assert optim.vit_layer_id("patch_embed/proj/kernel", 4) == 0
  assert optim.vit_layer_id("cls_token", 4) == 0
  assert optim.vit_layer_id("blocks/2/attn/qkv/kernel", 4) == 3
  assert optim.vit_layer_id("decoder_blocks/0/mlp/fc1/kernel", 4) == 5
  assert optim.vit_layer_id("norm/scale", 4) == 5
  params = _params()
  plain, _ = optim.make(
    _cfg(lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.0),
    params,
    total_steps=10,
    global_batch=8,
  )
  decayed, _ = optim.make(
    _cfg(lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.0, layer_decay=0.5),
    params,
    total_steps=10,
    global_batch=8,
    depth=4,
  )
  grads = jax.tree.map(jnp.ones_like, params)
  u0, _ = plain.update(grads, plain.init(params), params)
  u1, _ = decayed.update(grads, decayed.init(params), params)
  # One ratio per block along the stacked layer axis (every element of a block the same).
  ratio = {
    path_str(k): np.asarray(b).reshape(np.shape(b)[0] if "blocks/" in path_str(k) else 1, -1)
    / np.asarray(a).reshape(np.shape(a)[0] if "blocks/" in path_str(k) else 1, -1)
    for (k, a), (_, b) in zip(
      jax.tree_util.tree_flatten_with_path(u0)[0], jax.tree_util.tree_flatten_with_path(u1)[0]
    )
  }
  for r in ratio.values():  # constant within an array's layer
    np.testing.assert_allclose(r, r[:, :1] * np.ones_like(r), rtol=1e-6)
  ratio = {k: r[:, 0] for k, r in ratio.items()}
  np.testing.assert_allclose(ratio["patch_embed/proj/kernel"], [0.5**5], rtol=1e-6)
  for name in ("mlp/fc2/kernel", "attn/qkv/bias", "norm1/scale"):  # blocks 0..3: 0.5^4 .. 0.5
    np.testing.assert_allclose(ratio[f"blocks/{name}"], [0.5**4, 0.5**3, 0.5**2, 0.5], rtol=1e-6)
  np.testing.assert_allclose(ratio["decoder_blocks/mlp/fc1/kernel"], [1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(ratio["decoder_pred/kernel"], [1.0], rtol=1e-6)
  with pytest.raises(ValueError, match="depth"):
    optim.make(_cfg(layer_decay=0.65), params, total_steps=100, global_batch=8)


def test_clipping_bounds_the_global_gradient_norm():
  """With eps=1 Adam's first update is g / (|g| + 1), so it shows the size of the clipped g:
  16 elements of 100 clipped to global norm 1 are 0.25 each."""
  params = {"w": jnp.ones((4, 4))}
  grads = {"w": 100 * jnp.ones((4, 4))}
  for clip, expected in ((1.0, 0.25 / 1.25), (0.0, 100 / 101)):
    tx, _ = optim.make(
      _cfg(
        lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_grad_norm=clip, eps=1.0
      ),
      params,
      total_steps=5,
      global_batch=8,
    )
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -expected, rtol=1e-5)
