"""Feature2Pyramid + UperNet (`Segmenter`) and the UNet baseline: shapes, the pooling against
torch, the frozen backbone, and learning on a real crop (Alexandria nDSM + footprints)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from demmae_jax.models import mae, unet, upernet

TINY_HEAD = upernet.HeadConfig(layers=(0, 1, 2, 3), channels=32, aux_channels=16)


def tiny_segmenter(freeze=True, seed=0, **head):
  backbone = mae.build("tiny", in_chans=1, seed=seed)
  config = upernet.HeadConfig(**{**TINY_HEAD.__dict__, **head})
  return upernet.Segmenter(backbone, config, freeze_backbone=freeze, rngs=nnx.Rngs(seed + 1))


@pytest.mark.slow
def test_segmenter_pyramid_and_logit_shapes():
  model = tiny_segmenter(num_classes=3)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 1)), jnp.float32)

  @nnx.jit
  def run(model, x):
    return (
      model.features(x),
      model(x, with_aux=True, dropout_key=jax.random.key(0)),
      model(x),
      model(x),
    )

  feats, (dropped, aux), plain, again = run(model, x)
  # grid 8 (32 / patch 4) rescaled x4, x2, x1, x0.5
  assert [f.shape for f in feats] == [
    (2, 32, 32, 64),
    (2, 16, 16, 64),
    (2, 8, 8, 64),
    (2, 4, 4, 64),
  ]
  assert dropped.shape == aux.shape == plain.shape == (2, 32, 32, 3)
  assert np.isfinite(np.asarray(plain)).all()
  # dropout only with a key: without one the call is deterministic
  np.testing.assert_array_equal(plain, again)
  assert not np.array_equal(np.asarray(dropped), np.asarray(plain))


def test_segmenter_rejects_bad_layers_and_missing_aux_head():
  with pytest.raises(ValueError, match=r"layers \[4\] out of range for a 4-block"):
    nnx.eval_shape(lambda: tiny_segmenter(layers=(1, 2, 3, 4)))
  with pytest.raises(ValueError, match="needs 4 encoder blocks"):
    nnx.eval_shape(lambda: tiny_segmenter(layers=(1, 2, 3)))
  model = nnx.eval_shape(lambda: tiny_segmenter(aux_channels=0))
  with pytest.raises(ValueError, match="no auxiliary head"):
    nnx.eval_shape(lambda m: m(jnp.zeros((1, 32, 32, 1)), with_aux=True), model)


@pytest.mark.parametrize("size,bins", [(7, 1), (7, 2), (7, 3), (7, 6), (4, 6), (14, 6)])
def test_adaptive_avg_pool_matches_torch(size, bins):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(size * bins).normal(size=(2, size, size + 1, 3)).astype(np.float32)
  ours = np.asarray(upernet.adaptive_avg_pool(jnp.asarray(x), bins))
  ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), bins)
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_resize_matches_torch_bilinear_without_align_corners():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(1, 4, 6, 2)).astype(np.float32)
  ours = np.asarray(upernet.resize(jnp.asarray(x), (16, 24)))
  ref = torch.nn.functional.interpolate(
    torch.from_numpy(x).permute(0, 3, 1, 2), size=(16, 24), mode="bilinear", align_corners=False
  )
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_group_norm_groups_divide_channels():
  assert upernet.group_norm(512, rngs=nnx.Rngs(0)).num_groups == 32
  assert upernet.group_norm(48, rngs=nnx.Rngs(0)).num_groups == 6
  assert upernet.group_norm(32, rngs=nnx.Rngs(0)).num_groups == 4
  assert upernet.group_norm(4, rngs=nnx.Rngs(0)).num_groups == 1


@pytest.mark.slow
def test_frozen_backbone_gets_no_gradient_and_no_optimizer_state():
  model = tiny_segmenter()
  trainable = upernet.trainable_filter(model)
  opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=trainable)
  opt_paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(opt, nnx.OptState))}
  assert opt_paths and not any("backbone" in p for p in opt_paths)
  before = jax.tree.map(np.array, nnx.state(model.backbone, nnx.Param))
  head_before = jax.tree.map(np.array, nnx.state(model.decode_head, nnx.Param))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 1)), jnp.float32)
  y = jnp.asarray(np.random.default_rng(1).integers(0, 2, (2, 32, 32)))

  def loss_fn(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  @nnx.jit
  def step(model, opt):
    # Even differentiating every parameter, stop_gradient gives the backbone exact zeros.
    all_grads = nnx.grad(loss_fn)(model)
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable))(model)
    opt.update(model, grads)
    return all_grads["backbone"]

  for g in jax.tree.leaves(step(model, opt)):
    assert not np.any(np.asarray(g))
  after = nnx.state(model.backbone, nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, after))
  changed = jax.tree.map(
    lambda a, b: not np.array_equal(a, np.asarray(b)),
    head_before,
    nnx.state(model.decode_head, nnx.Param),
  )
  assert all(jax.tree.leaves(changed))


def test_unfrozen_backbone_trains_encoder_but_not_the_unused_decoder():
  model = nnx.eval_shape(lambda: tiny_segmenter(freeze=False))
  paths = [
    "/".join(map(str, p))
    for p, _ in nnx.to_flat_state(nnx.state(model, upernet.trainable_filter(model)))
  ]
  assert any(p.startswith("backbone/blocks/attn/") for p in paths)  # stacked: [depth, ...]
  assert not any(
    "decoder" in p or "mask_token" in p or p.startswith("backbone/norm/") for p in paths
  )


def test_unet_shapes_and_input_check():
  model = nnx.eval_shape(
    lambda: unet.UNet(unet.UNetConfig(num_classes=3, width=8, depth=3), rngs=nnx.Rngs(0))
  )
  out = nnx.eval_shape(lambda m: m(jnp.zeros((2, 32, 48, 1))), model)
  assert out.shape == (2, 32, 48, 3)
  with pytest.raises(ValueError, match="multiples of 8"):
    nnx.eval_shape(lambda m: m(jnp.zeros((1, 36, 32, 1))), model)


# --------------------------------------------------------------------------- learning, real data
def alexandria_crops(size=32, n=8, seed=0):
  """n crops of height above ground (dsm - dtm, /10 m) with rasterised footprints, from the
  labelled centre of the Alexandria rasters (2 m cells); reads alexandria/{dsm,dtm}.tif and
  alexandria/buildings.geojson."""
  import pyogrio
  import rasterio
  import rasterio.features
  import rasterio.warp
  import shapely

  from data_pipelines.shared_data import shared_file

  with (
    rasterio.open(shared_file("alexandria/dsm.tif")) as dsm,
    rasterio.open(shared_file("alexandria/dtm.tif")) as dtm,
  ):
    ndsm = dsm.read(1) - dtm.read(1)
    crs, transform, shape = dsm.crs, dsm.transform, dsm.shape
  path = shared_file("alexandria/buildings.geojson")
  src_crs = pyogrio.read_info(path)["crs"]
  geoms = [shapely.geometry.mapping(g) for g in shapely.from_wkb(pyogrio.raw.read(path)[2])]
  geoms = rasterio.warp.transform_geom(src_crs, crs, geoms)
  label = rasterio.features.rasterize(((g, 1) for g in geoms), out_shape=shape, transform=transform)
  rng = np.random.default_rng(seed)
  rows, cols = rng.integers(40, 220 - size, n), rng.integers(55, 238 - size, n)
  x = np.stack([ndsm[r : r + size, c : c + size] for r, c in zip(rows, cols)])[..., None] / 10.0
  y = np.stack([label[r : r + size, c : c + size] for r, c in zip(rows, cols)]).astype(np.int32)
  return jnp.asarray(x, jnp.float32), jnp.asarray(y)


def _train(model, x, y, steps, lr):
  opt = nnx.Optimizer(model, optax.adam(lr), wrt=upernet.trainable_filter(model))

  @nnx.jit
  def step(model, opt):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, opt.wrt))(model)
    opt.update(model, grads)
    return loss

  return [float(step(model, opt)) for _ in range(steps)]


@pytest.mark.realdata
@pytest.mark.slow
def test_segmenter_head_learns_on_real_crop():
  x, y = alexandria_crops()
  assert 0.05 < float(y.mean()) < 0.6  # both classes present
  losses = _train(tiny_segmenter(), x, y, steps=30, lr=3e-3)
  assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.realdata
@pytest.mark.slow
def test_unet_learns_on_real_crop():
  x, y = alexandria_crops()
  model = unet.UNet(unet.UNetConfig(width=8, depth=3), rngs=nnx.Rngs(0))
  losses = _train(model, x, y, steps=30, lr=3e-3)
  assert losses[-1] < 0.5 * losses[0], losses
