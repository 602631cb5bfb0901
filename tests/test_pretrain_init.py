"""Continued pretraining from a ported checkpoint: `--config.init=DIR --config.channel_adapt=sum`
starts from its weights (RGB patch kernel summed to one channel); another architecture is refused."""

import jax
import numpy as np
import pytest
from flax import nnx

from demmae_jax import api, sharding
from demmae_jax.sharding import path_str
from demmae_jax.train import loop, pretrain
from test_train_support import tiny_config


def _flat(tree):
  return {path_str(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_init_from_rgb_checkpoint_sums_the_patch_kernel_and_keeps_every_other_weight(tmp_path):
  rgb = api.build("tiny", seed=7, in_chans=3)
  api.save_model(rgb, tmp_path / "rgb")
  config = tiny_config(4)
  with config.unlocked():
    config.init, config.channel_adapt = str(tmp_path / "rgb"), "sum"
  task = pretrain.MAEPretrain(config)
  assert not task.jit_init  # weights come from a file, not from a seed
  state = loop.Trainer(task, config, sharding.make_mesh()).init_state()
  got, want = _flat(state["params"]), _flat(nnx.state(rgb, nnx.Param))
  assert got.keys() == want.keys()
  kernel = want.pop("patch_embed/proj/kernel")  # HWIO: [4, 4, 3, 64]
  np.testing.assert_allclose(
    got.pop("patch_embed/proj/kernel"), kernel.sum(2, keepdims=True), rtol=1e-6
  )
  decoder_pred = {
    k: (got.pop(k), want.pop(k)) for k in ("decoder_pred/kernel", "decoder_pred/bias")
  }
  assert decoder_pred["decoder_pred/kernel"][0].shape == (32, 16)  # one channel out
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_init_from_a_checkpoint_of_another_architecture_is_refused(tmp_path):
  api.save_model(api.build("tiny", in_chans=1, embed_dim=32, decoder_embed_dim=16), tmp_path / "x")
  config = tiny_config(4)
  with config.unlocked():
    config.init = str(tmp_path / "x")
  with pytest.raises(api.CheckpointError):
    pretrain.MAEPretrain(config).build_model()
