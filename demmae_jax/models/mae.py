"""Masked Autoencoder (He et al. 2021) in Flax NNX, reading top-down like the official model file:
patchify, random masking, encoder, decoder, loss."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from demmae_jax.models.vit import (
  Block,
  FixedEmbedding,
  PatchEmbed,
  _layer_norm,
  _linear,
  patchify,
  run_blocks,
  sincos_2d,
  stack_blocks,
)


@dataclasses.dataclass(frozen=True)
class MAEConfig:
  img_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  decoder_embed_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  mlp_ratio: float = 4.0
  mask_ratio: float = 0.75
  norm_pix_loss: bool = False
  # Added to each patch's variance before normalising the target (official MAE: 1e-6, for
  # ImageNet-normalised pixels). Flat DEM patches have almost no variance, so 1e-6 turns their
  # centimetre noise into unit-variance targets; on heights / scale_m, (0.5 m / scale_m)**2 keeps
  # patches under ~0.5 m of relief from being amplified.
  norm_pix_eps: float = 1.0e-6
  dtype: str = "float32"  # compute dtype; parameters stay float32
  remat: bool = False  # rematerialise each block in the backward pass
  # "auto" (the written-out attention on CPU, jax.nn.dot_product_attention elsewhere: cuDNN on
  # GPU in bfloat16/float16, XLA otherwise), or force "explicit", "xla" or "cudnn" (vit.py)
  attention: str = "auto"

  @property
  def grid_size(self) -> int:
    return self.img_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  def replace(self, **overrides) -> MAEConfig:
    unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise TypeError(
        f"unknown MAE config fields {sorted(unknown)}; "
        f"known: {[f.name for f in dataclasses.fields(self)]}"
      )
    return dataclasses.replace(self, **overrides)


PRESETS = {
  "tiny": MAEConfig(
    img_size=32,
    patch_size=4,
    embed_dim=64,
    depth=4,
    num_heads=4,
    decoder_embed_dim=32,
    decoder_depth=2,
    decoder_num_heads=4,
  ),
  "small": MAEConfig(
    embed_dim=384,
    depth=12,
    num_heads=6,
    decoder_embed_dim=256,
    decoder_depth=4,
    decoder_num_heads=8,
  ),
  "base": MAEConfig(),
  "large": MAEConfig(embed_dim=1024, depth=24, num_heads=16),
  "huge": MAEConfig(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


def preset(name: str, **overrides) -> MAEConfig:
  if name not in PRESETS:
    raise KeyError(f"unknown MAE preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


class MaskedAutoencoder(nnx.Module):
  """`loss, pred, mask = model(images, noise=noise)`; `model.encode(images, layers=...)`."""

  def __init__(self, config: MAEConfig, *, rngs: nnx.Rngs):
    self.config = config
    c = config
    dtype = jnp.dtype(c.dtype)
    self.dtype = dtype
    # --- encoder
    self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.embed_dim, dtype=dtype, rngs=rngs)
    self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, c.embed_dim)))
    self.pos_embed = FixedEmbedding(jnp.asarray(sincos_2d(c.embed_dim, c.grid_size))[None])
    # Blocks are stored stacked: every array has a leading layer axis of length depth.
    self.blocks = stack_blocks(
      [
        Block(c.embed_dim, c.num_heads, c.mlp_ratio, dtype=dtype, rngs=rngs, attention=c.attention)
        for _ in range(c.depth)
      ]
    )
    self.norm = _layer_norm(c.embed_dim, dtype=dtype, rngs=rngs)
    # --- decoder
    self.decoder_embed = _linear(c.embed_dim, c.decoder_embed_dim, dtype=dtype, rngs=rngs)
    self.mask_token = nnx.Param(
      0.02 * jax.random.normal(rngs.params(), (1, 1, c.decoder_embed_dim))
    )
    self.decoder_pos_embed = FixedEmbedding(
      jnp.asarray(sincos_2d(c.decoder_embed_dim, c.grid_size))[None]
    )
    self.decoder_blocks = stack_blocks(
      [
        Block(
          c.decoder_embed_dim,
          c.decoder_num_heads,
          c.mlp_ratio,
          dtype=dtype,
          rngs=rngs,
          attention=c.attention,
        )
        for _ in range(c.decoder_depth)
      ]
    )
    self.decoder_norm = _layer_norm(c.decoder_embed_dim, dtype=dtype, rngs=rngs)
    self.decoder_pred = _linear(
      c.decoder_embed_dim, c.patch_size**2 * c.in_chans, dtype=dtype, rngs=rngs
    )

  # ------------------------------------------------------------------ masking
  def random_masking(self, x: jax.Array, noise: jax.Array):
    """Keep the (1 - mask_ratio) patches with the smallest noise, per sample (official MAE)."""
    n, length, d = x.shape
    len_keep = int(length * (1 - self.config.mask_ratio))
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)
    mask = (jnp.arange(length)[None, :] >= len_keep).astype(jnp.float32)
    mask = jnp.take_along_axis(jnp.broadcast_to(mask, (n, length)), ids_restore, axis=1)
    return x_masked, mask, ids_restore

  def _check_images(self, images: jax.Array):
    c = self.config
    if (
      images.ndim != 4
      or images.shape[-1] != c.in_chans
      or images.shape[1] % c.patch_size
      or images.shape[2] % c.patch_size
    ):
      raise ValueError(
        f"images must be NHWC [N, H, W, {c.in_chans}] with H and W multiples of "
        f"{c.patch_size}; got shape {tuple(images.shape)}"
      )
    if images.shape[1] != c.img_size or images.shape[2] != c.img_size:
      raise ValueError(
        f"images are {images.shape[1]}x{images.shape[2]} but the model was built "
        f"for {c.img_size}x{c.img_size}; build it with img_size=... (position "
        f"embeddings are interpolated when loading a checkpoint)"
      )

  # ------------------------------------------------------------------ encoder
  def _embed(self, images):
    self._check_images(images)
    x = self.patch_embed(images.astype(self.dtype))
    return x + self.pos_embed.value[:, 1:].astype(self.dtype)

  def _with_cls(self, x):
    cls = (self.cls_token.value + self.pos_embed.value[:, :1]).astype(self.dtype)
    return jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)

  def forward_encoder(self, images, noise):
    x = self._embed(images)
    x, mask, ids_restore = self.random_masking(x, noise)
    x, _ = run_blocks(self.blocks, self._with_cls(x), remat=self.config.remat)
    return self.norm(x), mask, ids_restore

  def encode(self, images: jax.Array, layers: Sequence[int] = (3, 5, 7, 11)) -> list[jax.Array]:
    """Token outputs [N, 1+L, D] (cls first) of the blocks in `layers`, without masking and
    before the final norm (the features the segmentation neck reads)."""
    bad = [i for i in layers if not 0 <= i < self.config.depth]
    if bad:
      raise ValueError(f"layers {bad} out of range for a {self.config.depth}-block encoder")
    x = self._with_cls(self._embed(images))
    _, kept = run_blocks(self.blocks, x, remat=self.config.remat, keep=tuple(layers))
    return [kept[i] for i in layers]

  # ------------------------------------------------------------------ decoder
  def forward_decoder(self, x, ids_restore):
    x = self.decoder_embed(x)
    n, length = ids_restore.shape
    mask_tokens = jnp.broadcast_to(
      self.mask_token.value.astype(x.dtype), (n, length + 1 - x.shape[1], x.shape[-1])
    )
    x_ = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
    x_ = jnp.take_along_axis(x_, ids_restore[:, :, None], axis=1)  # unshuffle
    x = jnp.concatenate([x[:, :1], x_], axis=1) + self.decoder_pos_embed.value.astype(x.dtype)
    x, _ = run_blocks(self.decoder_blocks, x, remat=self.config.remat)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:]

  # ------------------------------------------------------------------ loss
  def forward_loss(self, images, pred, mask):
    target = patchify(images.astype(jnp.float32), self.config.patch_size)
    if self.config.norm_pix_loss:
      mean = target.mean(axis=-1, keepdims=True)
      var = target.var(axis=-1, keepdims=True, ddof=1)  # torch's unbiased .var(), as official
      target = (target - mean) / (var + self.config.norm_pix_eps) ** 0.5
    loss = ((pred.astype(jnp.float32) - target) ** 2).mean(axis=-1)
    return (loss * mask).sum() / mask.sum()

  def __call__(
    self, images: jax.Array, noise: jax.Array | None = None, key: jax.Array | None = None
  ):
    """Returns (loss, pred [N, L, p*p*C], mask [N, L], 1 = removed). Pass `noise` [N, L] (as the
    official code and Hugging Face allow) or a PRNG `key` to draw it: one key for the batch, or
    [N] keys, one per image (its mask then does not depend on the other images)."""
    if noise is None:
      if key is None:
        raise ValueError("pass noise=[N, L] uniform noise or key=a jax PRNG key for the masking")
      if jnp.ndim(key) == 1:
        noise = jax.vmap(lambda k: jax.random.uniform(k, (self.config.num_patches,)))(key)
      else:
        noise = jax.random.uniform(key, (images.shape[0], self.config.num_patches))
    latent, mask, ids_restore = self.forward_encoder(images, noise)
    pred = self.forward_decoder(latent, ids_restore)
    return self.forward_loss(images, pred, mask), pred, mask


def build(config: MAEConfig | str = "base", *, seed: int = 0, **overrides) -> MaskedAutoencoder:
  if isinstance(config, str):
    config = preset(config)
  return MaskedAutoencoder(config.replace(**overrides), rngs=nnx.Rngs(params=seed))


def param_count(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
