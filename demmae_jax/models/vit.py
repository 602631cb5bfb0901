"""ViT building blocks with the official MAE (timm) parameter names.

Attribute names follow the official checkpoint keys (`patch_embed.proj`, `blocks.attn.qkv`, ...).
Transformer blocks are stored stacked, one Block whose arrays have a leading layer axis
(`blocks.attn.qkv.kernel[i]` is official `blocks.i.attn.qkv.weight`, transposed): the weight port
in `demmae_jax.checkpoints` stacks on load and unstacks on export, a transpose per tensor besides.
Arrays are NHWC / [batch, tokens, width]; parameters are float32, compute in `dtype`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from demmae_jax.models.partitioning import constrain

LN_EPS = 1e-6
SQRT_HALF = 0.7071067811865476  # a Python float: weakly typed, so bfloat16 stays bfloat16


def gelu(x):
  """Exact GELU, x * Phi(x), through erf as PyTorch's F.gelu computes it. jax.nn.gelu(approximate=
  False) goes through erfc, whose XLA:CPU expansion cost 3x erf's in the MAE-B step's profile
  (0.21 s vs 0.06 s per step, benchmarks/mae_step.py --profile); the two agree to float32 rounding."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * SQRT_HALF))


class FixedEmbedding(nnx.Variable):
  """A position embedding kept in the state (so it is saved and ported) but never trained."""


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
  """The official MAE 2-D sin-cos table, [grid*grid (+1), embed_dim]; the cls row is zero."""
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w first, as the official code
  emb_h = sincos_1d(embed_dim // 2, grid[0])
  emb_w = sincos_1d(embed_dim // 2, grid[1])
  emb = np.concatenate([emb_h, emb_w], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
  return emb.astype(np.float32)


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[N, H, W, C] -> [N, L, p*p*C], patch-pixel order (p, q, c) as the official `patchify`."""
  n, h, w, c = images.shape
  gh, gw = h // patch, w // patch
  x = images.reshape(n, gh, patch, gw, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, gh * gw, patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, channels: int, grid: tuple[int, int]) -> jax.Array:
  """Inverse of `patchify`: [N, L, p*p*C] -> [N, H, W, C]."""
  n = patches.shape[0]
  gh, gw = grid
  x = patches.reshape(n, gh, gw, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, gh * patch, gw * patch, channels)


class PatchEmbed(nnx.Module):
  """Non-overlapping p x p patches to tokens. The kernel is stored HWIO like a conv, applied as
  one matmul over patchified pixels (the same arithmetic, cheaper than a strided conv on CPU)."""

  def __init__(self, patch: int, in_chans: int, embed_dim: int, *, dtype, rngs: nnx.Rngs):
    self.patch = patch
    self.dtype = dtype
    self.proj = nnx.Conv(
      in_chans,
      embed_dim,
      (patch, patch),
      strides=(patch, patch),
      padding="VALID",
      dtype=dtype,
      rngs=rngs,
      kernel_init=_xavier_uniform_conv(patch, in_chans, embed_dim),
    )

  def __call__(self, images: jax.Array) -> jax.Array:
    x = patchify(images, self.patch).astype(self.dtype)
    kernel = self.proj.kernel.value.reshape(-1, self.proj.kernel.value.shape[-1]).astype(self.dtype)
    return x @ kernel + self.proj.bias.value.astype(self.dtype)


def _xavier_uniform_conv(patch, in_chans, embed_dim):
  # The official init treats the conv kernel as a [D, p*p*C] linear weight (xavier_uniform).
  def init(key, shape, dtype=jnp.float32):
    fan_in, fan_out = patch * patch * in_chans, embed_dim
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init


def _linear(din, dout, *, dtype, rngs):
  # Official MAE init: xavier_uniform weights, zero bias.
  return nnx.Linear(
    din,
    dout,
    dtype=dtype,
    rngs=rngs,
    kernel_init=nnx.initializers.xavier_uniform(),
    bias_init=nnx.initializers.zeros_init(),
  )


ATTENTION = ("auto", "explicit", "xla", "cudnn")


def attention_kind(choice: str, dtype) -> str:
  """The attention computation `choice` stands for on this backend. 'auto': the written-out
  softmax(q k^T) v on CPU, where its head-major layout makes the MAE-B training step ~15 %
  faster than jax.nn.dot_product_attention (docs/performance.md); elsewhere
  `jax.nn.dot_product_attention`, with cuDNN's fused (flash) attention on GPU in 16-bit dtypes
  (cuDNN has no float32 kernel) and XLA's otherwise (TPU, float32 GPU). 'explicit', 'xla' or
  'cudnn' force one."""
  if choice not in ATTENTION:
    raise ValueError(f"attention must be one of {ATTENTION}, got {choice!r}")
  if choice != "auto":
    return choice
  backend = jax.default_backend()
  if backend == "cpu":
    return "explicit"
  if backend in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


class Attention(nnx.Module):
  def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs, attention: str = "auto"):
    attention_kind(attention, dtype)  # a bad name fails at build
    self.num_heads, self.attention, self.dtype = num_heads, attention, dtype
    self.qkv = _linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = _linear(dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    head_dim = d // self.num_heads
    # Heads over the mesh's 'model' axis when there is one (partitioning.py); else no-ops.
    qkv = constrain(
      self.qkv(x).reshape(b, t, 3, self.num_heads, head_dim), "batch", None, None, "heads", None
    )
    if attention_kind(self.attention, self.dtype) == "explicit":
      qkv = qkv.transpose(2, 0, 3, 1, 4)
      q, k, v = qkv[0] * head_dim**-0.5, qkv[1], qkv[2]  # [B, heads, T, head_dim]
      weights = constrain(
        jax.nn.softmax(q @ k.swapaxes(-1, -2), axis=-1), "batch", "heads", None, None
      )
      out = constrain(weights @ v, "batch", "heads", None, None).transpose(0, 2, 1, 3)
    else:  # [B, T, heads, head_dim], the layout jax.nn.dot_product_attention takes
      out = jax.nn.dot_product_attention(
        qkv[:, :, 0],
        qkv[:, :, 1],
        qkv[:, :, 2],
        implementation=attention_kind(self.attention, self.dtype),
      )
      out = constrain(out, "batch", None, "heads", None)
    return constrain(self.proj(out.reshape(b, t, d)), "batch", None, None)


class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    hidden = constrain(gelu(self.fc1(x)), "batch", None, "mlp")
    return constrain(self.fc2(hidden), "batch", None, None)


def _layer_norm(dim, *, dtype, rngs):
  return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  def __init__(
    self,
    dim: int,
    num_heads: int,
    mlp_ratio: float,
    *,
    dtype,
    rngs: nnx.Rngs,
    attention: str = "auto",
  ):
    self.norm1 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs, attention=attention)
    self.norm2 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


def stack_blocks(blocks: Sequence[Block]) -> Block:
  """One Block whose every array carries a leading layer axis: `blocks[i]`'s weights at index i.
  Built from per-layer Blocks (so a seed initialises the same weights as one module per block);
  the stacked arrays are what the model stores, scans over and saves."""
  graphdef, *_ = nnx.split(blocks[0])
  return nnx.merge(graphdef, jax.tree.map(lambda *a: jnp.stack(a), *(nnx.state(b) for b in blocks)))


def num_layers(blocks: Block) -> int:
  """The length of the leading layer axis of stacked `blocks`."""
  return int(jax.tree.leaves(nnx.state(blocks))[0].shape[0])


def run_blocks(
  blocks: Block,
  x: jax.Array,
  *,
  remat: bool = False,
  keep: Sequence[int] = (),
  unroll: bool | None = None,
) -> tuple[jax.Array, dict[int, jax.Array]]:
  """Apply stacked `blocks` in order as one `lax.scan` over their layer axis; return the final
  tokens and the outputs of the blocks in `keep` (only the blocks up to the last of `keep` run
  then). With `remat` each step is rematerialised (`jax.checkpoint` of the scan body): the
  backward pass keeps only each block's input and recomputes the rest. XLA:CPU schedules the
  recomputation of straight-line remat where it saves nothing (docs/performance.md); inside a
  scan only the carry of each step is kept. Without remat the scan is unrolled (`unroll=None`
  means `not remat`): straight-line code, which XLA:CPU ran faster than a rolled loop
  (docs/performance.md). No stacking per step; unrolled, XLA:CPU still copies each layer's
  slice of a stacked array before its matmuls (~8 % of the MAE-B step, docs/performance.md)."""
  graphdef, state = nnx.split(blocks)
  depth = num_layers(blocks)
  length = max(keep) + 1 if keep else depth
  if length < depth:  # the blocks after the last one asked for are not run
    state = jax.tree.map(lambda a: a[:length], state)

  def body(h, layer_state):
    h = nnx.merge(graphdef, layer_state)(h)
    return h, (h if keep else None)

  if remat:
    body = jax.checkpoint(body)
  unroll = not remat if unroll is None else unroll
  x, outs = jax.lax.scan(body, x, state, unroll=length if unroll else 1)
  return x, ({i: outs[i] for i in keep} if keep else {})
