"""Workdirs saved before the transformer blocks were stacked (one array per block): their weights
are read and stacked; resuming their training is refused with a message saying what to do."""

import numpy as np
import pytest
from flax import nnx

from demmae_jax import api, checkpoints, workdirs
from demmae_jax.inference import restore
from demmae_jax.train import loop
from test_train_support import per_layer_tree


def _old_workdir(model, workdir, edit=None):
  _, params, rest = nnx.split(model, nnx.Param, ...)
  ckpt = workdirs.Checkpointer(workdir / "checkpoints", async_save=False)
  ckpt.save(
    3,
    {
      "params": per_layer_tree(nnx.to_pure_dict(params), edit, leaf="value"),
      "rest": per_layer_tree(nnx.to_pure_dict(rest), leaf="value"),
      "opt_state": {},
      "step": np.int32(3),
    },
    {"step": 3, "global_batch": 8},
  )
  ckpt.close()


def test_old_workdir_weights_are_stacked_on_restore(tmp_path):
  model = api.build("tiny", seed=5)
  _old_workdir(model, tmp_path)
  back, step = restore.restore(nnx.eval_shape(lambda: api.build("tiny")), tmp_path)
  assert step == 3 and back.blocks.attn.qkv.kernel.value.shape == (4, 64, 192)
  want, got = api.to_official(model), api.to_official(back)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_old_workdir_of_another_shape_names_the_stacked_paths(tmp_path):
  model = api.build("tiny", seed=5)
  _old_workdir(
    model,
    tmp_path,
    lambda f: f.update(
      {k: np.zeros((64, 128), np.float32) for k in list(f) if k.endswith("mlp/fc1/kernel")}
    ),
  )
  with pytest.raises(
    ValueError,
    match=r"blocks/mlp/fc1/kernel: checkpoint \(4, 64, 128\) vs "
    r"model \(4, 64, 256\)",
  ):
    restore.restore(nnx.eval_shape(lambda: api.build("tiny")), tmp_path)


def test_resuming_an_old_workdir_is_refused_with_what_to_do(tmp_path):
  _old_workdir(api.build("tiny", seed=5), tmp_path)
  ckpt = workdirs.Checkpointer(tmp_path / "checkpoints", async_save=False)
  try:
    with pytest.raises(ValueError, match=r"one array per block.*demmae export"):
      loop._check_stacked_layout(ckpt, 3, tmp_path)
  finally:
    ckpt.close()
  assert checkpoints.is_per_layer("params/backbone/blocks/2/norm1/scale")
  assert not checkpoints.is_per_layer("params/backbone/blocks/norm1/scale")
