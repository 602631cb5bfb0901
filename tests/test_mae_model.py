"""Behaviour of the Flax MAE that does not need a reference: shapes, masking, sin-cos table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from demmae_jax.models import mae
from demmae_jax.models.vit import patchify, sincos_2d, unpatchify


def test_masking_removes_exactly_mask_ratio_per_sample_and_follows_noise():
  model = mae.build("tiny")
  images = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(1), (3, 64))
  loss, pred, mask = model(images, noise=noise)
  assert pred.shape == (3, 64, 4 * 4 * 3) and mask.shape == (3, 64)
  np.testing.assert_array_equal(np.asarray(mask.sum(1)), [48, 48, 48])
  # The kept patches are the 16 with the smallest noise.
  kept = np.argsort(np.asarray(noise), axis=1)[:, :16]
  for i in range(3):
    assert set(np.flatnonzero(np.asarray(mask[i]) == 0)) == set(kept[i])
  assert np.isfinite(float(loss))


def test_loss_counts_only_masked_patches():
  model = mae.build("tiny")
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(1), (2, 64))
  loss, pred, mask = model(images, noise=noise)
  target = patchify(images, 4)
  per_patch = ((pred - target) ** 2).mean(-1)
  expected = (per_patch * mask).sum() / mask.sum()
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
  # The mean over all patches differs: visible patches' error does not enter.
  assert not np.isclose(float(loss), float(per_patch.mean()))


def test_patchify_roundtrip_and_official_order():
  images = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  p = patchify(images, 4)
  assert p.shape == (2, 4, 48)
  # First patch, first pixel row: pixels (0,0..3) with their 3 channels in (q, c) order.
  np.testing.assert_array_equal(np.asarray(p[0, 0, :12]), np.asarray(images[0, 0, :4].reshape(-1)))
  np.testing.assert_array_equal(np.asarray(unpatchify(p, 4, 3, (2, 2))), np.asarray(images))


def test_sincos_table_matches_official_formula_at_a_known_entry():
  table = sincos_2d(16, 3)
  assert table.shape == (10, 16)
  np.testing.assert_array_equal(table[0], 0)
  # Row for grid position (h=1, w=2) is index 1 + 1*3 + 2; first half embeds w, second half h.
  row = table[1 + 1 * 3 + 2]
  omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
  np.testing.assert_allclose(row[:4], np.sin(2 * omega), rtol=1e-6)
  np.testing.assert_allclose(row[8:12], np.sin(1 * omega), rtol=1e-6)


def test_encode_returns_requested_blocks_and_rejects_out_of_range():
  model = mae.build("tiny")
  images = jnp.zeros((1, 32, 32, 3))
  feats = model.encode(images, layers=(0, 3))
  assert [f.shape for f in feats] == [(1, 65, 64), (1, 65, 64)]
  with pytest.raises(ValueError, match="out of range"):
    model.encode(images, layers=(4,))


def test_wrong_image_shape_is_a_clear_error():
  model = mae.build("tiny")
  with pytest.raises(ValueError, match="NHWC"):
    model(jnp.zeros((1, 3, 32, 32)), key=jax.random.key(0))


def test_bfloat16_compute_keeps_float32_params_and_close_loss():
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(1), (2, 64))
  m32 = mae.build("tiny", seed=3)
  m16 = mae.build("tiny", seed=3, dtype="bfloat16")
  assert m16.blocks.attn.qkv.kernel.value.dtype == jnp.float32
  l32, _, _ = m32(images, noise=noise)
  l16, _, _ = m16(images, noise=noise)
  np.testing.assert_allclose(float(l16), float(l32), rtol=5e-2)


def test_unknown_config_field_is_an_error():
  with pytest.raises(TypeError, match="unknown MAE config fields"):
    mae.preset("tiny", embed_dimm=3)


def test_remat_gives_the_same_gradients_with_less_compiled_memory_and_counts_the_recompute():
  from flax import nnx

  from demmae_jax.train import reporting

  images = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(1), (16, 64))
  out = {}
  for remat in (False, True):
    graphdef, state = nnx.split(mae.build("tiny", depth=6, decoder_depth=4, remat=remat))
    grad = jax.jit(jax.grad(lambda s: nnx.merge(graphdef, s)(images, noise=noise)[0]))  # noqa: B023
    traced = grad.trace(state)
    compiled = traced.lower().compile()
    out[remat] = (
      compiled(state),
      compiled.memory_analysis().temp_size_in_bytes,
      reporting.jaxpr_flops(traced.jaxpr),
    )
  for a, b in zip(jax.tree.leaves(out[False][0]), jax.tree.leaves(out[True][0])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  # Blocks under a rematerialised scan keep only their inputs; the forward runs twice.
  assert out[True][1] < 0.6 * out[False][1]
  assert 1.1 < out[True][2] / out[False][2] < 1.5


def test_norm_pix_eps_keeps_flat_patches_from_becoming_unit_variance_noise():
  # A flat DEM patch with centimetre noise (heights / 30 m): with the official eps the target is
  # that noise scaled to unit variance; with eps = (0.5 m / 30 m)**2 it stays near zero.
  images = 0.2 + 3e-4 * jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
  noise = jax.random.uniform(jax.random.key(1), (2, 64))
  losses = {}
  for eps in (1e-6, (0.5 / 30) ** 2):
    model = mae.build("tiny", in_chans=1, norm_pix_loss=True, norm_pix_eps=eps)
    _, pred, mask = model(images, noise=noise)
    target = patchify(images, 4)
    mean, var = target.mean(-1, keepdims=True), target.var(-1, keepdims=True, ddof=1)
    normed = (target - mean) / jnp.sqrt(var + eps)
    expected = ((((pred - normed) ** 2).mean(-1)) * mask).sum() / mask.sum()
    losses[eps] = float(model(images, noise=noise)[0])
    np.testing.assert_allclose(losses[eps], float(expected), rtol=1e-5)
    spread = float(jnp.abs(normed).max())
    assert spread > 1.0 if eps == 1e-6 else spread < 0.1


def test_attention_paths_agree_in_forward_and_gradient():
  """The written-out attention (CPU's default) and jax.nn.dot_product_attention (XLA's, the
  accelerators' default; cuDNN's needs a GPU) give the same loss, encoder features and gradients."""
  from flax import nnx

  from demmae_jax.models import vit

  assert vit.attention_kind("auto", jnp.float32) == (
    "explicit" if jax.default_backend() == "cpu" else vit.attention_kind("auto", jnp.float32)
  )
  with pytest.raises(ValueError, match="attention must be one of"):
    mae.build("tiny", attention="flash")
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(1), (4, 64))
  out = {}
  for kind in ("explicit", "xla"):
    graphdef, state = nnx.split(mae.build("tiny", seed=2, attention=kind))
    loss, grads = jax.jit(
      jax.value_and_grad(lambda s, g=graphdef: nnx.merge(g, s)(images, noise=noise)[0])
    )(state)
    feats = jax.jit(lambda s, g=graphdef: nnx.merge(g, s).encode(images, (1, 3)))(state)
    out[kind] = (loss, feats, grads)
  (l0, f0, g0), (l1, f1, g1) = out["explicit"], out["xla"]
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  for a, b in zip(f0, f1):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(g0) == jax.tree.structure(g1)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
