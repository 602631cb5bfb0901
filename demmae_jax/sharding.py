"""One mesh and one set of placement rules for pretraining and finetuning.

The mesh has named axes `('data', 'fsdp', 'model')`. The batch is split over `data x fsdp`;
parameters and optimiser state are placed by a short table of (regex -> tactic) rules, big_vision
style, matched against the '/'-joined path of each array (optimiser-state paths end with the
parameter path, so one table serves both):

  "fsdp"       shard the largest dimension divisible by the fsdp axis size over 'fsdp'
               (arrays smaller than `min_fsdp_size` elements stay replicated: the gather costs
               more than the memory saved);
  "replicate"  a full copy on every device;
  (a, b, ...)  an explicit PartitionSpec, one mesh axis (or None) per dimension, e.g. for tensor
               parallelism over the optional 'model' axis: (".*mlp/fc1/kernel", (None, "model")).

The first rule whose regex `re.search`es the path wins; an array no rule matches is an error.
Changing the parallelism is a config edit (mesh shape and rules), never a code edit.

Transformer blocks are stored stacked (`blocks/attn/qkv/kernel` is [depth, in, out]): rules are
written for one layer's array, and the leading layer axis is never sharded (each scan step reads
one layer whole), so the spec of a stacked array is `(None, *spec of one layer)`. An explicit
tuple may also name all its axes, the layer axis included.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both
DEFAULT_RULES = ((".*", "fsdp"),)
DEFAULT_MIN_FSDP_SIZE = 2**14


def maybe_initialize_distributed(
  coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
  """`jax.distributed.initialize` when a coordinator is configured (multi-host); on Cloud TPU
  pass coordinator_address='auto' to let JAX discover the slice."""
  if not coordinator_address:
    return
  if coordinator_address == "auto":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def make_mesh(
  data: int = -1, fsdp: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A mesh over all (global) devices; one of the sizes may be -1 (= the rest)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, model]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1; got data={data} fsdp={fsdp} model={model}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
        f"{len(devices)} devices do not divide into mesh axes {dict(zip(AXES, sizes))}"
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
      f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices; there are {len(devices)}"
    )
  return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def path_str(path) -> str:
  """'blocks/attn/qkv/kernel' from a jax key path (the trailing Variable '.value' dropped)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      if k.name != "value":
        parts.append(k.name)
    else:
      parts.append(str(k))
  return "/".join(parts)


def _fsdp_spec(shape, mesh: Mesh, min_size: int) -> P:
  n = mesh.shape["fsdp"]
  if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  # Largest dimension divisible by the axis; ties go to the last (the output features).
  candidates = [(d, i) for i, d in enumerate(shape) if d % n == 0]
  if not candidates:
    return P()
  _, dim = max(candidates)
  spec = [None] * len(shape)
  spec[dim] = "fsdp"
  return P(*spec)


# A stacked blocks array: '.../blocks/<name>' or '.../decoder_blocks/<name>', no layer number.
STACKED_LAYERS = re.compile(r"(^|/)(decoder_)?blocks/(?!\d+(/|$))")


def is_stacked(path: str) -> bool:
  """Whether the array at `path` carries a leading layer axis (stacked transformer blocks)."""
  return bool(STACKED_LAYERS.search(path))


def spec_for(
  path: str, shape, mesh: Mesh, rules=DEFAULT_RULES, min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE
) -> P:
  shape = tuple(shape)
  if is_stacked(path) and shape:
    inner = _spec_for(path, shape[1:], mesh, rules, min_fsdp_size, full=shape)
    return P(None, *inner) if any(a is not None for a in inner) else P()
  return _spec_for(path, shape, mesh, rules, min_fsdp_size)


def _spec_for(path: str, shape, mesh: Mesh, rules, min_fsdp_size: int, full=None) -> P:
  """The spec of one layer's array; `full` is the stacked shape (an explicit tuple may name the
  layer axis too)."""
  for pattern, tactic in rules:  # noqa: B007 (tactic is the matching rule's, read below)
    if re.search(pattern, path):
      break
  else:
    raise ValueError(
      f"no sharding rule matches {path!r}; add one (the last rule is usually "
      f"('.*', 'fsdp') or ('.*', 'replicate'))"
    )
  if len(shape) == 0 or tactic == "replicate":
    return P()
  if tactic == "fsdp":
    return _fsdp_spec(shape, mesh, min_fsdp_size)
  if isinstance(tactic, (tuple, list)):
    if full is not None and len(tactic) == len(full):  # the layer axis named as well
      if tactic[0] is not None:
        raise ValueError(
          f"rule {pattern!r} shards the layer axis of stacked {path!r}; the "
          f"blocks are scanned over that axis: give None (or one layer's axes)"
        )
      tactic = tactic[1:]
    if len(tactic) != len(shape):
      raise ValueError(f"rule {pattern!r} gives {len(tactic)} axes for {path!r} of shape {shape}")
    for axis, d in zip(tactic, shape):
      if axis is not None and d % mesh.shape[axis]:
        raise ValueError(
          f"{path!r} dim {d} is not divisible by mesh axis {axis!r} ({mesh.shape[axis]})"
        )
    return P(*tactic)
  raise ValueError(
    f"unknown sharding tactic {tactic!r} for {pattern!r}: use 'fsdp', "
    f"'replicate' or a tuple of mesh axes"
  )


def tree_shardings(
  tree: Any, mesh: Mesh, rules=DEFAULT_RULES, min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE
) -> Any:
  """NamedShardings for every array of `tree` (arrays or ShapeDtypeStructs), by the rules."""

  def one(path, x):
    return NamedSharding(mesh, spec_for(path_str(path), np.shape(x), mesh, rules, min_fsdp_size))

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_parallelism(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def process_batch_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """The rows [start, stop) of the global batch that this process's devices hold; each process
  feeds exactly those (a multi-host source reads its own share)."""
  if global_batch % batch_parallelism(mesh):
    raise ValueError(
      f"global batch {global_batch} is not divisible by data x fsdp = {batch_parallelism(mesh)}"
    )
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  rows = sorted({(s[0].start or 0, s[0].stop or global_batch) for s in index_map.values()})
  start, stop = rows[0][0], rows[-1][1]
  covered = sum(b - a for a, b in rows)
  if covered != stop - start:
    raise ValueError(
      f"this process's devices hold non-contiguous batch rows {rows}; "
      f"order the mesh devices by process"
    )
  return start, stop


def global_batch(
  local: dict[str, np.ndarray], mesh: Mesh, global_size: int
) -> dict[str, jax.Array]:
  """Assemble the global batch from every process's local rows (one process: a device_put)."""
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    shape = (global_size,) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v, shape)
  return out


def describe(tree: Any) -> str:
  """'path: shape spec' lines, to print or log the placement."""
  lines = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    spec = getattr(getattr(x, "sharding", None), "spec", None)
    lines.append(f"{path_str(path)}: {tuple(np.shape(x))} {spec}")
  return "\n".join(lines)
