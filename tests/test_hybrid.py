"""The ViT-UNet (`models/hybrid.py`): shapes, pixel-level output, the frozen ViT receives no
gradient, the ViT's features reach the output, and a tiny run on real Delft tiles trains, saves
its spec and reloads to the same predictions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from demmae_jax.models import hybrid, mae

CFG = hybrid.HybridConfig(layers=(0, 1, 2, 3), width=8, vit_channels=16)


def tiny_hybrid(freeze=True, seed=0, in_chans=1):
  backbone = mae.build("tiny", in_chans=in_chans, seed=seed)  # patch 4, 32 px
  return hybrid.ViTUNet(backbone, CFG, freeze_backbone=freeze, rngs=nnx.Rngs(seed + 1))


def test_vit_unet_logits_at_input_resolution():
  model = tiny_hybrid(in_chans=2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32, 32, 2)), jnp.float32)
  out = model(x)
  assert out.shape == (3, 32, 32, 2)
  assert np.isfinite(np.asarray(out)).all()
  # pixel detail: one input pixel changes the logits near it, at full resolution
  y = x.at[0, 10, 10, 0].add(5.0)
  diff = np.abs(np.asarray(model(y) - out))[0].sum(-1)
  assert diff[10, 10] > 0 and diff[10, 10] >= np.percentile(diff, 90)


def test_vit_unet_rejects_bad_shapes_and_layers():
  model = tiny_hybrid()
  with pytest.raises(ValueError, match="multiples of 4"):
    model(jnp.zeros((1, 30, 32, 1)))
  with pytest.raises(ValueError, match="out of range"):
    hybrid.ViTUNet(
      mae.build("tiny", in_chans=1), hybrid.HybridConfig(layers=(0, 9)), rngs=nnx.Rngs(0)
    )


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_vit_gets_zero_gradient_and_unfrozen_does_not(freeze):
  model = tiny_hybrid(freeze=freeze)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 1)), jnp.float32)
  grads = nnx.grad(lambda m: (m(x) ** 2).mean())(model)
  vit = [np.abs(np.asarray(g)).max() for g in jax.tree.leaves(nnx.state(grads.backbone.blocks))]
  conv = [np.abs(np.asarray(g)).max() for g in jax.tree.leaves(nnx.state(grads.down))]
  assert max(conv) > 0
  assert (max(vit) == 0) == freeze


def test_vit_features_reach_the_output():
  """Two ViTs of other weights give other logits with the same convolutional weights."""
  a, b = tiny_hybrid(seed=0), tiny_hybrid(seed=0)
  nnx.update(b.backbone, nnx.state(mae.build("tiny", in_chans=1, seed=5)))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 32, 32, 1)), jnp.float32)
  assert not np.allclose(np.asarray(a(x)), np.asarray(b(x)))
  np.testing.assert_array_equal(
    np.asarray(a.vit_proj.kernel.value), np.asarray(b.vit_proj.kernel.value)
  )


@pytest.mark.realdata
@pytest.mark.slow
def test_hybrid_finetunes_on_real_tiles_and_reloads(tmp_path):
  from data_pipelines.prepare import prepare_delft
  from demmae_jax import config_files
  from demmae_jax.inference.evaluate import evaluate_split
  from demmae_jax.inference.restore import load_trained
  from demmae_jax.train import finetune

  manifest = prepare_delft(tmp_path / "delft", "buildings", tile_size=32, stride=16, progress=False)
  config = config_files.get_config(
    "finetune",
    "tiny",
    **{
      "model.kind": "hybrid",
      "model.hybrid.width": 8,
      "model.hybrid.vit_channels": 16,
      "data.manifest": str(manifest),
      "total_steps": 40,
      "eval_every_steps": 20,
      "checkpoint.every_steps": 20,
      "log.progress": False,
      "log.tensorboard": False,
      "data.normalisation.mode": "relative+ndsm",
      "data.normalisation.channels": 2,
    },
  )
  finetune.run(config, tmp_path / "wd")
  model, spec, step = load_trained(tmp_path / "wd")
  assert spec["kind"] == "hybrid" and spec["backbone"]["in_chans"] == 2 and step in (20, 40)
  summary, _ = evaluate_split(model, spec, str(manifest), "test")
  assert summary["iou"] > 0.3  # buildings are ~30 % of pixels: better than nothing
  again, _, _ = load_trained(tmp_path / "wd")
  x = jnp.asarray(np.random.default_rng(3).uniform(size=(1, 32, 32, 2)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(again(x)))
