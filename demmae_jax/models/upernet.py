"""Segmentation on a ViT-MAE encoder: Feature2Pyramid neck + UperNet head (+ auxiliary FCN head).

The common MAE/BEiT segmentation recipe (mmseg `Feature2Pyramid`, `UPerHead`, `FCNHead`), NHWC.

Normalisation: GroupNorm (32 groups, at least 8 channels each) where mmseg uses SyncBatchNorm.
The paper's batch is 8 small tiles, too few for stable batch statistics, and BatchNorm would need
running averages (mutable state in the step) and cross-device sync under sharding; GroupNorm
depends on one sample only, so training, evaluation and the overlapping windows of the predictor
all see the same function.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from demmae_jax.models import vit
from demmae_jax.models.mae import MaskedAutoencoder


def group_norm(channels: int, *, rngs: nnx.Rngs, groups: int = 32, min_group_size: int = 8):
  """GroupNorm with the most groups (<= `groups`) that divide `channels` and keep at least
  `min_group_size` channels each: a 1x1 map (the pyramid pooling's scale-1 branch) then still has
  statistics; with one channel per group it would normalise to a constant and learn nothing."""
  groups = max(
    [
      g
      for g in range(1, min(groups, channels) + 1)
      if channels % g == 0 and channels // g >= min(min_group_size, channels)
    ]
  )
  return nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-5, rngs=rngs)


class ConvNormAct(nnx.Module):
  """mmcv's ConvModule: conv (no bias, the norm has one) -> GroupNorm -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel: int, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(cin, cout, (kernel, kernel), padding="SAME", use_bias=False, rngs=rngs)
    self.norm = group_norm(cout, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.norm(self.conv(x)))


def resize(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """Bilinear resize of NHWC maps (half-pixel centres: torch's align_corners=False)."""
  if x.shape[1:3] == tuple(hw):
    return x
  return jax.image.resize(x, (x.shape[0], *hw, x.shape[-1]), method="bilinear")


def adaptive_pool_matrix(size: int, bins: int) -> np.ndarray:
  """[bins, size] averaging matrix with torch's adaptive_avg_pool bins [floor(i*n/b), ceil((i+1)*n/b))."""
  m = np.zeros((bins, size), np.float32)
  for i in range(bins):
    lo, hi = (i * size) // bins, math.ceil((i + 1) * size / bins)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
  rows = jnp.asarray(adaptive_pool_matrix(x.shape[1], bins))
  cols = jnp.asarray(adaptive_pool_matrix(x.shape[2], bins))
  return jnp.einsum("ih,jw,nhwc->nijc", rows, cols, x)


# ------------------------------------------------------------------------------------------- neck
class Feature2Pyramid(nnx.Module):
  """Four single-scale ViT maps to a pyramid: x4 (two 2x2 stride-2 transposed convs with norm and
  GELU between), x2 (one transposed conv), x1 (identity), x0.5 (2x2 max-pool)."""

  RESCALES = (4, 2, 1, 0.5)

  def __init__(self, embed_dim: int, *, rngs: nnx.Rngs):
    up = lambda: nnx.ConvTranspose(
      embed_dim, embed_dim, (2, 2), strides=(2, 2), padding="VALID", rngs=rngs
    )
    self.up4_a, self.up4_norm, self.up4_b = up(), group_norm(embed_dim, rngs=rngs), up()
    self.up2 = up()

  def __call__(self, maps: Sequence[jax.Array]) -> list[jax.Array]:
    if len(maps) != 4:
      raise ValueError(
        f"Feature2Pyramid takes 4 maps (one per rescale {self.RESCALES}), got {len(maps)}"
      )
    x4 = self.up4_b(vit.gelu(self.up4_norm(self.up4_a(maps[0]))))
    x2 = self.up2(maps[1])
    x05 = nnx.max_pool(maps[3], (2, 2), strides=(2, 2), padding="VALID")
    return [x4, x2, maps[2], x05]


# ------------------------------------------------------------------------------------------- heads
class UperHead(nnx.Module):
  """UperNet (Xiao et al. 2018) as mmseg's UPerHead: pyramid pooling on the coarsest level, FPN
  laterals with a top-down path, 3x3 FPN convs, fusion of all levels, dropout, 1x1 classifier."""

  def __init__(
    self,
    in_channels: Sequence[int],
    channels: int,
    num_classes: int,
    *,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
    dropout: float = 0.1,
    rngs: nnx.Rngs,
  ):
    self.pool_scales = tuple(pool_scales)
    self.dropout = dropout
    self.psp = nnx.List([ConvNormAct(in_channels[-1], channels, 1, rngs=rngs) for _ in pool_scales])
    self.psp_bottleneck = ConvNormAct(
      in_channels[-1] + len(pool_scales) * channels, channels, 3, rngs=rngs
    )
    self.lateral = nnx.List([ConvNormAct(c, channels, 1, rngs=rngs) for c in in_channels[:-1]])
    self.fpn = nnx.List([ConvNormAct(channels, channels, 3, rngs=rngs) for _ in in_channels[:-1]])
    self.fpn_bottleneck = ConvNormAct(len(in_channels) * channels, channels, 3, rngs=rngs)
    self.cls = nnx.Conv(channels, num_classes, (1, 1), rngs=rngs)

  def pyramid_pooling(self, x):
    hw = x.shape[1:3]
    pooled = [
      resize(conv(adaptive_avg_pool(x, s)), hw) for s, conv in zip(self.pool_scales, self.psp)
    ]
    return self.psp_bottleneck(jnp.concatenate([x, *pooled], axis=-1))

  def __call__(self, feats: Sequence[jax.Array], dropout_key: jax.Array | None = None):
    laterals = [conv(f) for conv, f in zip(self.lateral, feats)] + [self.pyramid_pooling(feats[-1])]
    for i in range(len(laterals) - 1, 0, -1):  # top-down
      laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[1:3])
    outs = [conv(x) for conv, x in zip(self.fpn, laterals[:-1])] + [laterals[-1]]
    hw = outs[0].shape[1:3]
    x = self.fpn_bottleneck(jnp.concatenate([resize(o, hw) for o in outs], axis=-1))
    return self.cls(spatial_dropout(x, self.dropout, dropout_key))


class FCNHead(nnx.Module):
  """Auxiliary head (mmseg FCNHead, one 3x3 conv, no input concat) for deep supervision."""

  def __init__(
    self, in_channels: int, channels: int, num_classes: int, *, dropout: float = 0.1, rngs: nnx.Rngs
  ):
    self.dropout = dropout
    self.conv = ConvNormAct(in_channels, channels, 3, rngs=rngs)
    self.cls = nnx.Conv(channels, num_classes, (1, 1), rngs=rngs)

  def __call__(self, x, dropout_key: jax.Array | None = None):
    return self.cls(spatial_dropout(self.conv(x), self.dropout, dropout_key))


def spatial_dropout(x, rate: float, key: jax.Array | None):
  """torch's Dropout2d (mmseg's `dropout_ratio`): whole channels, only when a key is given."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0], 1, 1, x.shape[-1]))
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


# ------------------------------------------------------------------------------------------- model
@dataclasses.dataclass(frozen=True)
class HeadConfig:
  num_classes: int = 2
  layers: tuple[int, ...] = (3, 5, 7, 11)  # encoder blocks read by the neck
  channels: int = 512
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  dropout: float = 0.1
  aux_channels: int = 256  # 0 = no auxiliary FCN head
  aux_index: int = 2  # pyramid level read by the auxiliary head (mmseg: 2)


def token_maps(
  backbone: MaskedAutoencoder, images: jax.Array, layers: Sequence[int], frozen: bool
) -> list[jax.Array]:
  """The tokens of encoder blocks `layers` as NHWC maps [N, H/p, W/p, D] (cls token dropped),
  behind stop_gradient when `frozen`: what every head on the ViT reads."""
  c = backbone.config
  tokens = backbone.encode(images, layers=layers)
  if frozen:
    tokens = [jax.lax.stop_gradient(t) for t in tokens]
  n, gh, gw = images.shape[0], images.shape[1] // c.patch_size, images.shape[2] // c.patch_size
  return [t[:, 1:].reshape(n, gh, gw, c.embed_dim) for t in tokens]


class Segmenter(nnx.Module):
  """MAE encoder -> Feature2Pyramid -> UperNet. `logits = model(images)` gives [N, H, W, classes];
  with `with_aux=True` also the auxiliary head's logits (same size). The call is
  `head(encoder_maps(images))`: a frozen encoder's maps can be computed once and reused.

  `freeze_backbone=True` wraps the encoder features in stop_gradient, so no gradient is computed
  through the backbone even if a caller differentiates all parameters; the optimiser is meant to
  hold only the head (see `trainable_filter`).
  """

  def __init__(
    self,
    backbone: MaskedAutoencoder,
    head: HeadConfig,
    *,
    freeze_backbone: bool = True,
    rngs: nnx.Rngs,
  ):
    if len(head.layers) != 4:
      raise ValueError(f"the neck needs 4 encoder blocks, got layers={head.layers}")
    bad = [i for i in head.layers if not 0 <= i < backbone.config.depth]
    if bad:
      raise ValueError(f"layers {bad} out of range for a {backbone.config.depth}-block backbone")
    self.backbone = backbone
    self.head_config = head
    self.freeze_backbone = freeze_backbone
    d = backbone.config.embed_dim
    self.neck = Feature2Pyramid(d, rngs=rngs)
    self.decode_head = UperHead(
      [d] * 4,
      head.channels,
      head.num_classes,
      pool_scales=head.pool_scales,
      dropout=head.dropout,
      rngs=rngs,
    )
    self.aux_head = (
      FCNHead(d, head.aux_channels, head.num_classes, dropout=head.dropout, rngs=rngs)
      if head.aux_channels
      else None
    )

  @property
  def in_chans(self) -> int:
    return self.backbone.config.in_chans

  def encoder_maps(self, images: jax.Array) -> list[jax.Array]:
    """The encoder blocks the neck reads, as NHWC maps [N, H/p, W/p, D] in the encoder's compute
    dtype (cls token dropped): all the head needs from the images, and what the feature cache
    (`demmae_jax.train.feature_cache`) stores."""
    return token_maps(self.backbone, images, self.head_config.layers, self.freeze_backbone)

  def _pyramid(self, maps: Sequence[jax.Array]) -> list[jax.Array]:
    return self.neck([m.astype(jnp.float32) for m in maps])

  def features(self, images: jax.Array) -> list[jax.Array]:
    """The pyramid: 4 NHWC maps at 1/4, 1/8, 1/16, 1/32 of the input for patch 16."""
    return self._pyramid(self.encoder_maps(images))

  def head(
    self, maps: Sequence[jax.Array], *, dropout_key: jax.Array | None = None, with_aux: bool = False
  ):
    """Neck and heads on `encoder_maps`' output: logits [N, H, W, classes] (and the auxiliary
    head's with `with_aux=True`), H and W the input's (map size x patch)."""
    feats = self._pyramid(maps)
    keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
    p = self.backbone.config.patch_size
    hw = (maps[0].shape[1] * p, maps[0].shape[2] * p)
    logits = resize(self.decode_head(feats, keys[0]), hw)
    if not with_aux:
      return logits
    if self.aux_head is None:
      raise ValueError("with_aux=True but the model has no auxiliary head (aux_channels=0)")
    return logits, resize(self.aux_head(feats[self.head_config.aux_index], keys[1]), hw)

  def __call__(
    self, images: jax.Array, *, dropout_key: jax.Array | None = None, with_aux: bool = False
  ):
    return self.head(self.encoder_maps(images), dropout_key=dropout_key, with_aux=with_aux)


# Backbone parts the segmenter never uses: the MAE decoder and the encoder's final norm (the neck
# reads block outputs before it). Unfrozen, they would only collect weight decay.
UNUSED_BACKBONE_PARTS = (
  "decoder_embed",
  "mask_token",
  "decoder_blocks",
  "decoder_norm",
  "decoder_pred",
  "norm",
)


def _unused_backbone_part(path, _) -> bool:
  return len(path) > 1 and path[0] == "backbone" and path[1] in UNUSED_BACKBONE_PARTS


def trainable_filter(model: nnx.Module):
  """The nnx filter of the parameters the optimiser updates: only the neck and heads when the
  backbone is frozen; else also the encoder (never the unused MAE decoder)."""
  if getattr(model, "freeze_backbone", False):
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("backbone")))
  return nnx.All(nnx.Param, nnx.Not(_unused_backbone_part))
