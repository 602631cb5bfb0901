"""UNet (Ronneberger et al. 2015), the paper's baseline trained from scratch, NHWC.

Same call as `upernet.Segmenter` (`logits = model(images)`, [N, H, W, classes]) so the finetuning
task, evaluation and predictor treat both alike. GroupNorm for the same reason as the UperNet head
(batch 8). Input height and width must be multiples of 2**depth.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from demmae_jax.models.upernet import group_norm


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  in_chans: int = 1
  num_classes: int = 2
  width: int = 64  # channels of the first level, doubled at each downsampling
  depth: int = 4  # number of downsamplings


class DoubleConv(nnx.Module):
  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(cin, cout, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
    self.norm1 = group_norm(cout, rngs=rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
    self.norm2 = group_norm(cout, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.norm1(self.conv1(x)))
    return jax.nn.relu(self.norm2(self.conv2(x)))


def contract(down, images: jax.Array) -> list[jax.Array]:
  """The encoder path: `down[0]` at full resolution, then max-pool + block per level; returns
  every level's output, finest first (the skips; the last is the bottleneck)."""
  x = down[0](images.astype(jnp.float32))
  skips = [x]
  for block in down[1:]:
    x = block(nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID"))
    skips.append(x)
  return skips


def expand(up, up_conv, x: jax.Array, skips: list[jax.Array]) -> jax.Array:
  """The decoder path from bottleneck `x`: upsample, concatenate the skip, double conv."""
  for u, conv, skip in zip(up, up_conv, reversed(skips[:-1])):
    x = conv(jnp.concatenate([u(x), skip], axis=-1))
  return x


class UNet(nnx.Module):
  freeze_backbone = False  # nothing is frozen: every parameter trains

  def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
    self.config = config
    widths = [config.width * 2**i for i in range(config.depth + 1)]
    self.down = nnx.List(
      [DoubleConv(config.in_chans, widths[0], rngs=rngs)]
      + [DoubleConv(widths[i], widths[i + 1], rngs=rngs) for i in range(config.depth)]
    )
    self.up = nnx.List(
      [
        nnx.ConvTranspose(
          widths[i + 1], widths[i], (2, 2), strides=(2, 2), padding="VALID", rngs=rngs
        )
        for i in reversed(range(config.depth))
      ]
    )
    self.up_conv = nnx.List(
      [DoubleConv(2 * widths[i], widths[i], rngs=rngs) for i in reversed(range(config.depth))]
    )
    self.cls = nnx.Conv(widths[0], config.num_classes, (1, 1), rngs=rngs)

  @property
  def in_chans(self) -> int:
    return self.config.in_chans

  def __call__(
    self, images: jax.Array, *, dropout_key: jax.Array | None = None, with_aux: bool = False
  ):
    del dropout_key  # the classic UNet has no dropout
    if with_aux:
      raise ValueError("the UNet has no auxiliary head")
    step = 2**self.config.depth
    if (
      images.ndim != 4
      or images.shape[-1] != self.config.in_chans
      or images.shape[1] % step
      or images.shape[2] % step
    ):
      raise ValueError(
        f"UNet input must be NHWC [N, H, W, {self.config.in_chans}] with H and W "
        f"multiples of {step}; got {tuple(images.shape)}"
      )
    skips = contract(self.down, images)
    return self.cls(expand(self.up, self.up_conv, skips[-1], skips))
