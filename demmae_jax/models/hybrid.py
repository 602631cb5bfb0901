"""ViT-UNet: a full-resolution convolutional encoder-decoder with a (pretrained) ViT at its
bottleneck, NHWC. `logits = model(images)` as `upernet.Segmenter` and `unet.UNet`.

Why: the paper's head (Feature2Pyramid + UperNet) upsamples a patch grid (8 x 8 tokens for a 64 px
tile with patch 8), so its outlines are blobs that sit metres off the walls. Here a light UNet
stem on the DEM keeps pixel detail (walls, kerbs) through skip connections, and the ViT's token
maps (several blocks, concatenated and projected) join the stem at the patch-grid level, where
they add context the convolutions alone do not see. The ViT is the MAE encoder, so "does DEM
pretraining help" is the same architecture with pretrained against random ViT weights.

`freeze_backbone=True` stops gradients at the ViT (only the convolutional parts train).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from demmae_jax.models import unet, upernet
from demmae_jax.models.mae import MaskedAutoencoder
from demmae_jax.models.unet import DoubleConv


@dataclasses.dataclass(frozen=True)
class HybridConfig:
  num_classes: int = 2
  layers: tuple[int, ...] = (1, 2, 3, 5)  # ViT blocks joined at the bottleneck
  width: int = 16  # stem channels at full resolution, doubled at each downsampling
  vit_channels: int = 64  # the ViT maps are projected to this many channels


class ViTUNet(nnx.Module):
  def __init__(
    self,
    backbone: MaskedAutoencoder,
    config: HybridConfig,
    *,
    freeze_backbone: bool = True,
    rngs: nnx.Rngs,
  ):
    p = backbone.config.patch_size
    depth = int(round(math.log2(p)))
    if 2**depth != p:
      raise ValueError(f"the ViT-UNet needs a power-of-two patch size, got {p}")
    bad = [i for i in config.layers if not 0 <= i < backbone.config.depth]
    if bad or not config.layers:
      raise ValueError(
        f"layers {config.layers} out of range for a {backbone.config.depth}-block ViT"
      )
    self.backbone, self.config, self.freeze_backbone = backbone, config, freeze_backbone
    self.depth = depth
    w = [config.width * 2**i for i in range(depth + 1)]
    self.down = nnx.List(
      [DoubleConv(backbone.config.in_chans, w[0], rngs=rngs)]
      + [DoubleConv(w[i], w[i + 1], rngs=rngs) for i in range(depth)]
    )
    d = backbone.config.embed_dim * len(config.layers)
    self.vit_proj = nnx.Conv(d, config.vit_channels, (1, 1), rngs=rngs)
    self.fuse = DoubleConv(w[depth] + config.vit_channels, w[depth], rngs=rngs)
    self.up = nnx.List(
      [
        nnx.ConvTranspose(w[i + 1], w[i], (2, 2), strides=(2, 2), padding="VALID", rngs=rngs)
        for i in reversed(range(depth))
      ]
    )
    self.up_conv = nnx.List([DoubleConv(2 * w[i], w[i], rngs=rngs) for i in reversed(range(depth))])
    self.cls = nnx.Conv(w[0], config.num_classes, (1, 1), rngs=rngs)

  @property
  def in_chans(self) -> int:
    return self.backbone.config.in_chans

  def vit_map(self, images: jax.Array) -> jax.Array:
    """The chosen blocks' tokens (cls dropped) as one [N, H/p, W/p, D x len(layers)] map."""
    maps = upernet.token_maps(self.backbone, images, self.config.layers, self.freeze_backbone)
    return jnp.concatenate(maps, -1).astype(jnp.float32)

  def __call__(
    self, images: jax.Array, *, dropout_key: jax.Array | None = None, with_aux: bool = False
  ):
    del dropout_key  # no dropout: the convolutions are small and the ViT has none
    if with_aux:
      raise ValueError("the ViT-UNet has no auxiliary head")
    p = self.backbone.config.patch_size
    if (
      images.ndim != 4
      or images.shape[-1] != self.in_chans
      or images.shape[1] % p
      or images.shape[2] % p
    ):
      raise ValueError(
        f"ViT-UNet input must be NHWC [N, H, W, {self.in_chans}] with H and W "
        f"multiples of {p}; got {tuple(images.shape)}"
      )
    skips = unet.contract(self.down, images)
    x = self.fuse(jnp.concatenate([skips[-1], self.vit_proj(self.vit_map(images))], -1))
    return self.cls(unet.expand(self.up, self.up_conv, x, skips))
