"""The optimiser from config: AdamW as in the official MAE / BEiT recipes, built from optax parts.

  clip (optional) -> Adam moments -> + weight decay (masked) -> x -schedule(step) -> x layer scale

Weight decay skips biases, norms (1-D parameters) and the special tokens (`cls_token`,
`mask_token`); position embeddings are `FixedEmbedding`s, not `nnx.Param`s, so they never reach
the optimiser at all. The learning rate is `base_lr x global_batch / 256` (the MAE scaling rule)
unless `lr` is given. Layer-wise lr decay (BEiT, for finetuning an unfrozen ViT) scales block i's
update by decay^(depth - i); it multiplies the whole update, weight decay included, as the
reference code does with per-group `lr_scale`. The blocks are stored stacked, so a block array's
scale is a vector along its leading layer axis (one rate per block).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from demmae_jax.sharding import is_stacked, path_str

NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "dist_token")


def learning_rate(cfg: ml_collections.ConfigDict, global_batch: int) -> float:
  if cfg.get("lr") is not None:
    return float(cfg.lr)
  return float(cfg.base_lr) * global_batch / 256


def schedule(cfg: ml_collections.ConfigDict, total_steps: int, global_batch: int) -> optax.Schedule:
  """Linear warmup from 0, then cosine to `min_lr` or polynomial (power `power`) to `min_lr`."""
  peak = learning_rate(cfg, global_batch)
  warmup = int(cfg.warmup_steps)
  if warmup >= total_steps:
    raise ValueError(f"warmup_steps ({warmup}) must be < total_steps ({total_steps})")
  end = float(cfg.get("min_lr", 0.0))
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total_steps, end_value=end)
  if cfg.schedule == "polynomial":
    return optax.join_schedules(
      [
        optax.linear_schedule(0.0, peak, warmup),
        optax.polynomial_schedule(peak, end, float(cfg.get("power", 1.0)), total_steps - warmup),
      ],
      [warmup],
    )
  if cfg.schedule == "constant":
    return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
    )
  raise ValueError(f"unknown schedule {cfg.schedule!r}: use 'cosine', 'polynomial' or 'constant'")


def decay_mask(params):
  """True where weight decay applies: arrays of rank >= 2 that are not special tokens (the rank
  of one layer for the stacked blocks: their biases and norms do not decay)."""

  def one(path, x):
    p = path_str(path)
    return x.ndim - is_stacked(p) >= 2 and p.rsplit("/", 1)[-1] not in NO_DECAY_NAMES

  return jax.tree_util.tree_map_with_path(one, params)


def vit_layer_id(path: str, depth: int) -> int:
  """BEiT's layer ids: embeddings 0, encoder block i -> i + 1, everything after -> depth + 1
  (for one block's array, 'blocks/i/...'; stacked block arrays: `layer_scales`)."""
  if re.search(r"(^|/)(patch_embed|cls_token|pos_embed|mask_token)(/|$)", path):
    return 0
  m = re.search(r"(^|/)blocks/(\d+)(/|$)", path)
  if m:
    return int(m.group(2)) + 1
  return depth + 1


def layer_scales(params, decay: float, depth: int):
  """decay^(depth + 1 - layer id) per array; for the stacked encoder blocks ('blocks/...', [n,
  ...]) a float32 array [n, 1, ...]: block i's rate at index i."""

  def one(path, x):
    p = path_str(path)
    if is_stacked(p) and re.search(r"(^|/)blocks/", p):  # the encoder's (not the decoder's)
      ids = np.arange(1, x.shape[0] + 1)
      return (decay ** (depth + 1 - ids)).astype(np.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return decay ** (depth + 1 - vit_layer_id(p, depth))

  return jax.tree_util.tree_map_with_path(one, params)


def make(
  cfg: ml_collections.ConfigDict,
  params,
  *,
  total_steps: int,
  global_batch: int,
  depth: int | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule). `params` (arrays or shapes) fixes the decay and layer-scale masks;
  `depth` is needed only for layer-wise lr decay."""
  sched = schedule(cfg, total_steps, global_batch)
  parts = []
  if cfg.get("clip_grad_norm"):
    parts.append(optax.clip_by_global_norm(float(cfg.clip_grad_norm)))
  b1, b2 = cfg.betas
  parts.append(optax.scale_by_adam(b1=float(b1), b2=float(b2), eps=float(cfg.get("eps", 1e-8))))
  if cfg.weight_decay:
    parts.append(optax.add_decayed_weights(float(cfg.weight_decay), mask=decay_mask(params)))
  parts.append(optax.scale_by_learning_rate(sched))
  lld = cfg.get("layer_decay")
  if lld is not None and lld != 1.0:
    if depth is None:
      raise ValueError("layer_decay needs the encoder depth")
    scales = layer_scales(params, float(lld), depth)
    parts.append(optax.stateless(lambda u, _: jax.tree.map(lambda g, s: g * s, u, scales)))
  return optax.chain(*parts), sched


def weight_decay_groups(params) -> tuple[list[str], list[str]]:
  """(decayed paths, not decayed paths): to print and to test the mask."""
  flat = jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]
  yes = [path_str(p) for p, v in flat if v]
  no = [path_str(p) for p, v in flat if not v]
  return yes, no


def global_norm(tree) -> jax.Array:
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
