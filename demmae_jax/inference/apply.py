"""A model as a function of image batches: class probabilities, jitted, optionally averaged over
the 8 square symmetries (test-time augmentation), optionally fed over all devices."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@jax.jit
def _probs(graphdef, state, images):
  return jax.nn.softmax(nnx.merge(graphdef, state)(images).astype(jnp.float32), axis=-1)


@jax.jit
def _probs_tta(graphdef, state, images):
  """Mean probabilities over the 8 square symmetries (4 rotations x mirror), each undone on the
  output: the network is not equivariant, so averaging removes its orientation bias."""
  model = nnx.merge(graphdef, state)
  total = 0.0
  for k in range(4):
    for mirror in (False, True):
      x = jnp.rot90(images, k, axes=(1, 2))
      x = x[:, :, ::-1] if mirror else x
      y = jax.nn.softmax(model(x).astype(jnp.float32), axis=-1)
      y = y[:, :, ::-1] if mirror else y
      total = total + jnp.rot90(y, -k, axes=(1, 2))
  return total / 8.0


def probabilities_fn(model: nnx.Module, tta: bool = False) -> Callable[[np.ndarray], jax.Array]:
  """images [B, H, W, C] -> class probabilities [B, H, W, K], jitted (one compile per shape);
  `tta=True` averages them over the 8 square symmetries (8 forward passes)."""
  graphdef, state = nnx.split(model)
  fn = _probs_tta if tta else _probs
  return lambda images: fn(graphdef, state, jnp.asarray(images, jnp.float32))


def make_apply(model, batch_size: int, tta: bool = False):
  """Batches put on all devices (split over the mesh's batch axes) for the jitted model."""
  from demmae_jax import sharding

  mesh = sharding.make_mesh(data=-1)
  if batch_size % sharding.batch_parallelism(mesh):
    raise ValueError(
      f"--batch_size {batch_size} must be a multiple of the {jax.device_count()} devices"
    )
  probs = probabilities_fn(model, tta=tta)
  return lambda x: probs(jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)))
