"""Segmentation finetuning: `python scripts/finetune.py --config configs/finetune.py:PRESET`.

Presets (the data is a tile set from `scripts/prepare_data.py`: --config.data.manifest=PATH):
  buildings, roads            the paper's recipe: UperNet on a frozen ViT-B/16 MAE encoder
                              (--config.init=CHECKPOINT; without it the encoder is random: the
                              "random frozen" control), 224 px tiles, 3000 steps of batch 8,
                              validation every 150 keeping the best IoU, AdamW wd 0.05, polynomial
                              decay after a linear warmup;
  unet_buildings, unet_roads  the UNet baseline from scratch, same data, loss and schedule;
  cpu_buildings, cpu_roads, cpu_unet_buildings, cpu_unet_roads
                              CPU scale for the real Delft runs in docs/segmentation.md: the
                              6-block encoder of configs/dem_pretrain.py:cpu on 64 px tiles;
  tiny, tiny_roads, tiny_unet the 4-block tiny encoder on 32 px tiles (demo and tests).
Unfreeze the encoder with --config.freeze_backbone=False (layer-wise lr decay 0.65 then applies).
Override anything with --config.key=value; unknown keys are an error.
"""

import ml_collections

from configs import common

VIT_B = dict(preset="base", patch_size=16)
CPU_VIT = dict(
  preset="tiny",
  patch_size=8,
  embed_dim=192,
  depth=6,
  num_heads=3,
  decoder_embed_dim=128,
  decoder_depth=2,
  decoder_num_heads=4,
)  # dem_pretrain.py:cpu
TINY_VIT = dict(preset="tiny", patch_size=4)

PAPER = dict(total_steps=3000, global_batch=8, eval_every=150, warmup_steps=150)
CPU = dict(total_steps=300, global_batch=8, eval_every=50, warmup_steps=30)
TINY = dict(total_steps=30, global_batch=8, eval_every=10, warmup_steps=3)

PRESETS = {
  "buildings": dict(
    kind="upernet",
    backbone=VIT_B,
    layers=(3, 5, 7, 11),
    channels=512,
    aux_channels=256,
    lr=1e-4,
    task="buildings",
    **PAPER,
  ),
  "roads": dict(
    kind="upernet",
    backbone=VIT_B,
    layers=(3, 5, 7, 11),
    channels=512,
    aux_channels=256,
    lr=1e-4,
    task="roads",
    **PAPER,
  ),
  "unet_buildings": dict(kind="unet", width=64, depth=4, lr=1e-3, task="buildings", **PAPER),
  "unet_roads": dict(kind="unet", width=64, depth=4, lr=1e-3, task="roads", **PAPER),
  "cpu_buildings": dict(
    kind="upernet",
    backbone=CPU_VIT,
    layers=(1, 2, 3, 5),
    channels=64,
    aux_channels=32,
    lr=1e-3,
    task="buildings",
    **CPU,
  ),
  "cpu_roads": dict(
    kind="upernet",
    backbone=CPU_VIT,
    layers=(1, 2, 3, 5),
    channels=64,
    aux_channels=32,
    lr=1e-3,
    task="roads",
    **CPU,
  ),
  "cpu_hybrid_buildings": dict(
    kind="hybrid",
    backbone=CPU_VIT,
    layers=(1, 2, 3, 5),
    width=16,
    vit_channels=64,
    lr=1e-3,
    task="buildings",
    **CPU,
  ),
  "cpu_hybrid_roads": dict(
    kind="hybrid",
    backbone=CPU_VIT,
    layers=(1, 2, 3, 5),
    width=16,
    vit_channels=64,
    lr=1e-3,
    task="roads",
    **CPU,
  ),
  "cpu_unet_buildings": dict(kind="unet", width=16, depth=4, lr=1e-3, task="buildings", **CPU),
  "cpu_unet_roads": dict(kind="unet", width=16, depth=4, lr=1e-3, task="roads", **CPU),
  "tiny": dict(
    kind="upernet",
    backbone=TINY_VIT,
    layers=(0, 1, 2, 3),
    channels=32,
    aux_channels=16,
    lr=3e-3,
    task="buildings",
    **TINY,
  ),
  "tiny_roads": dict(
    kind="upernet",
    backbone=TINY_VIT,
    layers=(0, 1, 2, 3),
    channels=32,
    aux_channels=16,
    lr=3e-3,
    task="roads",
    **TINY,
  ),
  "tiny_unet": dict(kind="unet", width=8, depth=3, lr=3e-3, task="buildings", **TINY),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = common.select(arg, PRESETS, default="buildings")
  p = PRESETS[name]
  c = common.base_config()
  c.preset = name
  c.task = p["task"]  # informative: the labels come from the tile set
  c.total_steps = p["total_steps"]
  c.global_batch = p["global_batch"]
  c.eval_every_steps = p["eval_every"]
  c.eval_batch = 16
  c.num_classes = 2
  c.class_weights = "manifest"  # "manifest" (inverse frequency, mean 1) or "none"

  c.optim.lr = p["lr"]
  c.optim.betas = (0.9, 0.999)
  c.optim.weight_decay = 0.05
  c.optim.schedule = "polynomial"
  c.optim.power = 1.0
  c.optim.warmup_steps = p["warmup_steps"]
  # Layer-wise lr decay of the encoder; acts only when it is unfrozen (the UNet has no encoder).
  c.optim.layer_decay = 0.65 if p["kind"] in ("upernet", "hybrid") else None
  # Keep a checkpoint at every validation so the best one (by validation IoU) is kept.
  c.checkpoint.every_steps = p["eval_every"]
  c.checkpoint.keep = 2
  c.log.every_steps = max(1, p["eval_every"] // 5)
  c.log.picture_every_steps = 0

  # Initialisation of the encoder: a pretrained MAE (our export, or official / HF weights), or
  # "" for a random encoder (the "random frozen" control arm).
  c.init = ""
  c.channel_adapt = ""  # "sum" | "mean" | "repeat" to put RGB weights on a 1-channel DEM
  c.freeze_backbone = True
  # Frozen encoder only: compute its maps of every training tile under the 8 symmetries once,
  # keep them in host memory and train the head on them (demmae_jax/train/feature_cache.py).
  c.cache_features = False

  c.model = ml_collections.ConfigDict()
  c.model.kind = p["kind"]  # "upernet" | "unet" | "hybrid"
  # Encoder architecture when not read off `init`: an MAE preset plus MAEConfig overrides; the
  # image size is the tile size and in_chans the normalisation's channels.
  c.model.backbone = ml_collections.ConfigDict(p.get("backbone", TINY_VIT))
  c.model.head = ml_collections.ConfigDict(
    dict(
      layers=p.get("layers", (0, 1, 2, 3)),
      channels=p.get("channels", 512),
      pool_scales=(1, 2, 3, 6),
      dropout=0.1,
      aux_channels=p.get("aux_channels", 256),
      aux_index=2,
      aux_weight=0.4,
    )
  )
  c.model.unet = ml_collections.ConfigDict(dict(width=p.get("width", 64), depth=p.get("depth", 4)))
  # ViT-UNet (model.kind "hybrid"): a UNet stem of `width` with the ViT's `layers` joined at the
  # patch-grid level, projected to `vit_channels` (demmae_jax/models/hybrid.py).
  c.model.hybrid = ml_collections.ConfigDict(
    dict(
      layers=p.get("layers", (0, 1, 2, 3)),
      width=p.get("width", 16),
      vit_channels=p.get("vit_channels", 64),
    )
  )

  c.data = ml_collections.ConfigDict()
  c.data.manifest = ""  # tile set's manifest.json (scripts/prepare_data.py); required
  c.data.train_split = "train"  # or a few-label subset: train_10, train_50, train_200, train_450
  c.data.eval_split = "val"
  c.data.seed = 0
  # share of training tiles shown 2x coarser (block means interpolated back): robustness to
  # sources coarser than the grid they are predicted on (Alexandria's 2 m DSM at 1 m)
  c.data.coarsen = 0.0
  # share of training tiles shown as a denser survey draws them (3x3 grey closing: crowns without
  # the pits a sparse survey leaves): robustness to denser LiDAR than the training areas'
  c.data.densify = 0.0
  c.data.normalisation = ml_collections.ConfigDict(
    dict(mode="minmax", channels=1, scale_m=30.0, low_percentile=2.0)
  )

  c.lock()  # a typo in --config.key is an error
  return c
