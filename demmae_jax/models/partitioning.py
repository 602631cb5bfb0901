"""Logical axis names for activations and the mesh axes they go to (MaxText's logical axis
rules): the model says what a dimension is ("batch", "heads", "mlp"), the table says where it
lives. Constraints apply only under a mesh with a 'model' axis of size > 1 (tensor
parallelism), set around tracing by the training loop (`jax.sharding.use_abstract_mesh`);
anywhere else (one device, data / FSDP parallelism, inference) `constrain` returns its input.

The rules match `demmae_jax.sharding`: the batch is split over ('data', 'fsdp'); attention heads
and the MLP's hidden units over 'model' (Megatron: qkv and fc1 kernels split by output, proj and
fc2 by input, as the parameter rules for the 'model' axis put them); token and embedding
dimensions are not split.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

LOGICAL_RULES = (
  ("batch", ("data", "fsdp")),
  ("heads", "model"),
  ("mlp", "model"),
)


def _mesh_axes(name: str | None):
  for logical, axes in LOGICAL_RULES:
    if logical == name:
      return axes
  return None


def logical_spec(names, shape, mesh_shape) -> P:
  """The PartitionSpec of an array of `shape` whose dimensions are `names` (None: not split);
  a dimension its mesh axes do not divide stays whole."""
  spec = []
  for name, d in zip(names, shape):
    axes = _mesh_axes(name)
    if axes is not None:
      group = (axes,) if isinstance(axes, str) else tuple(axes)
      if any(a not in mesh_shape for a in group) or d % math.prod(mesh_shape[a] for a in group):
        axes = None
    spec.append(axes)
  return P(*spec)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """`x` constrained to the logical layout `names`, one per dimension, when the current mesh
  has a 'model' axis of size > 1; otherwise `x` unchanged."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get("model", 1) == 1:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"{len(names)} logical axes {names} for an array of shape {x.shape}")
  return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, dict(mesh.shape)))
