"""The paper's experimental protocol as one sweep: `python scripts/run_experiments.py
--config configs/experiments.py:PROTOCOL --out runs/experiments/NAME`.

Protocols:
  cpu    the CPU-scale miniature run on the 2 shared cores (docs/results.md says why it is a fair
         one): 64 px tiles (32 m at 0.5 m), the 6-block 192-wide ViT (patch 8) of
         configs/dem_pretrain.py:cpu_rasters (the raster recipe its results were measured
         with), UperNet 64 channels, UNet width 16, 300 steps of batch 8;
  tiny   the test's: 32 px tiles, the 4-block tiny ViT, a few steps;
  paper  Mazumdar et al.'s recipe for accelerators: ViT-B/16 encoder (pretrain it with
         configs/dem_pretrain.py:base --config.data.corpus_tiles=CORPUS and pass the export as
         --encoder), 224 px tiles, UperNet 512 channels, UNet width 64, 3000 steps of batch 8,
         validation every 150 keeping the best IoU.
Everything is overridable: --config.steps=150, --config.sizes=10,50, --config.seeds=1, ...
"""

import ml_collections

# configs/finetune.py presets per protocol and model kind; {task} is buildings or roads.
PROTOCOLS = {
  "cpu": dict(
    tile_size=64,
    stride=8,
    block_px=128,
    val_tiles=50,
    steps=300,
    eval_every=50,
    warmup=30,
    batch=8,
    upernet="cpu_{task}",
    unet="cpu_unet_{task}",
    encoder="runs/dem_mae_cpu",
    pretrain_preset="cpu_rasters",  # the encoder docs/results.md measured
    imagenet_layers=(3, 5, 7, 11),
  ),
  "tiny": dict(
    tile_size=32,
    stride=16,
    block_px=64,
    val_tiles=8,
    steps=4,
    eval_every=2,
    warmup=1,
    batch=8,
    upernet="tiny",
    unet="tiny_unet",
    encoder="",
    pretrain_preset="tiny",
    imagenet_layers=(3, 5, 7, 11),
  ),
  "paper": dict(
    tile_size=224,
    stride=32,
    block_px=224,
    val_tiles=50,
    steps=3000,
    eval_every=150,
    warmup=150,
    batch=8,
    upernet="{task}",
    unet="unet_{task}",
    encoder="",
    pretrain_preset="base",
    imagenet_layers=(3, 5, 7, 11),
  ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = arg or "cpu"
  if name not in PROTOCOLS:
    raise ValueError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
  p = PROTOCOLS[name]
  c = ml_collections.ConfigDict()
  c.protocol = name
  # Data: tiles of `tile_size` px at `stride` over each labelled set; spatial split by blocks of
  # `block_px` (test and validation areas never share a pixel with training tiles).
  c.tile_size, c.stride, c.block_px = p["tile_size"], p["stride"], p["block_px"]
  # Training draws: `disjoint_first` takes non-overlapping tiles before overlapping crops (the
  # small sizes then hold the most independent views); `uniform` draws crops uniformly.
  c.draw = "disjoint_first"
  c.val_tiles = p["val_tiles"]  # one fixed validation draw for every run
  # Table 1: labelled sets, training-set sizes, seeds (subset draw, init, data order), arms.
  c.datasets = ("delft_buildings", "delft_roads", "alexandria_buildings")
  c.sizes = (10, 50, 200, 450)
  c.seeds = 3
  c.arms = ("dem_mae", "imagenet_mae", "random_frozen", "unet")
  # Table 2 analogue: LiDAR class 6 buildings over the whole Delft block (noisy) for training,
  # BGT footprints for validation and test.
  c.table2_arms = ("dem_mae", "imagenet_mae", "random_frozen", "unet")
  # Normalisation ablation: these modes against the paper's minmax, at one training-set size.
  c.norm_modes = ("relative", "ndsm")
  c.norm_datasets = ("delft_roads", "delft_buildings")
  c.norm_sizes = (50,)
  c.norm_arms = ("dem_mae", "unet")
  # Groups to run, in this order: table1, table2, norm.
  c.groups = ("table1", "table2", "norm")
  # Finetuning recipe (configs/finetune.py presets, with these overrides).
  c.upernet_preset, c.unet_preset = p["upernet"], p["unet"]
  c.steps, c.eval_every, c.warmup, c.batch = p["steps"], p["eval_every"], p["warmup"], p["batch"]
  # Arm (a): an exported DEM-pretrained encoder (scripts/export_encoder.py); when the path does
  # not exist, configs/dem_pretrain.py:`pretrain_preset` is run and exported under OUT/pretrain.
  c.encoder = p["encoder"]
  c.pretrain_preset = p["pretrain_preset"]
  # Arm (b): ImageNet MAE weights (.pth), given on the command line; the head reads these blocks.
  c.imagenet = ""
  c.imagenet_layers = p["imagenet_layers"]
  c.pictures = 4  # test tiles in the prediction figure (0: keep no predictions)
  c.lock()
  return c
