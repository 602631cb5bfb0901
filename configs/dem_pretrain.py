"""Masked DEM pretraining: `python scripts/pretrain.py --config configs/dem_pretrain.py:PRESET`.

Presets:
  tiny  a 4-block ViT on 32 x 32 crops: the tests (seconds on a CPU);
  cpu   a 6-block ViT on 64 x 64 tiles streamed by tf.data from a TFRecord corpus of the shared
        data (data_pipelines/corpus_beam.py, built into WORKDIR/corpus_tiles on first use: 64 px
        tiles, stride 32, every evaluation split's val/test blocks dropped; La Rochelle as
        held-out loss), normalised "ndsm" as finetuning does; `--config.data.corpus_tiles=DIR`
        reads a built corpus instead (docs/pretraining.md). Workdirs of the former `cpu_tiles`
        preset resume with it (the same values; workdirs compare values, not preset names);
  cpu_rasters the cpu model on rasters read whole into memory (data_pipelines/raster_source.py):
        the shared SRTM, the Alexandria DSM and a DSM rasterised from the IGN LiDAR tiles, Delft
        held out, per-crop minmax; what `cpu` was until 2026-11-30, and what configs/experiments.py
        and docs/results.md measured with;
  cpu_hr the cpu model on the high-resolution corpus (data_pipelines/pretrain_corpus.py: the
        0.5-2 m LiDAR / DSMs, every evaluation split's val/test blocks NaN), built into
        WORKDIR/corpus, normalised as finetuning does ("ndsm", 30 m; "relative" reads the DSMs);
        held-out loss on the IGN La Rochelle tile, which is never trained on;
  base  the paper's ViT-B/16 on 224 x 224 single-channel DEMs, bfloat16 compute, FSDP, streamed
        from the TFRecord corpora named by --config.data.corpus_tiles=gs://BUCKET/corpus/*
        (required: a run without it stops at start);
  large ViT-L/16, the same recipe.
Override anything with --config.key=value (e.g. --config.total_steps=100); unknown keys are an
error. Initialise from a ported MAE checkpoint with --config.init=PATH (RGB weights are adapted
to one channel with --config.channel_adapt=sum).
"""

import ml_collections

from configs import common

# Real unlabelled elevation, relative to the shared data folder. Delft is held out (evaluation).
PRETRAIN_FILES = ("pretrain/N46E008.tif", "pretrain/N49W123.tif", "alexandria/dsm.tif")
# Terrain never trained on, for the held-out masked loss (New Hampshire, SRTM .hgt).
EVAL_FILES = ("pretrain/N44W072.hgt",)
# IGN LiDAR HD point clouds (Brittany), rasterised to a DSM in the workdir before training.
PRETRAIN_LIDAR = (
  "pretrain/test_semis_2023_0299_6802_LA93_IGN69.laz",
  "pretrain/test_semis_2023_0300_6802_LA93_IGN69.laz",
)

# Data from the TFRecord corpora of data.corpus_tiles only; base and large name none, so their run
# stops at start until --config.data.corpus_tiles is given (train/pretrain.py check_data).
NO_RASTERS = dict(files=(), lidar_files=(), eval_files=())

PRESETS = {
  "tiny": dict(
    model=dict(preset="tiny", img_size=32, patch_size=4, in_chans=1),
    total_steps=50,
    global_batch=8,
    warmup_steps=5,
    lr=1e-3,
    checkpoint_every=10,
    log_every=5,
    picture_every=25,
    eval_every=25,
  ),
  "cpu_rasters": dict(
    model=dict(
      preset="tiny",
      img_size=64,
      patch_size=8,
      in_chans=1,
      embed_dim=192,
      depth=6,
      num_heads=3,
      decoder_embed_dim=128,
      decoder_depth=2,
      decoder_num_heads=4,
    ),
    total_steps=1500,
    global_batch=32,
    warmup_steps=100,
    lr=1e-3,
    checkpoint_every=250,
    log_every=25,
    picture_every=500,
    eval_every=100,
  ),
  "base": dict(
    model=dict(preset="base", img_size=224, patch_size=16, in_chans=1, dtype="bfloat16"),
    total_steps=100_000,
    global_batch=256,
    warmup_steps=5_000,
    lr=None,
    checkpoint_every=1000,
    log_every=50,
    picture_every=2000,
    eval_every=2000,
    data=NO_RASTERS,
  ),
  "large": dict(
    model=dict(
      preset="large", img_size=224, patch_size=16, in_chans=1, dtype="bfloat16", remat=True
    ),
    total_steps=100_000,
    global_batch=256,
    warmup_steps=5_000,
    lr=None,
    checkpoint_every=1000,
    log_every=50,
    picture_every=2000,
    eval_every=2000,
    data=NO_RASTERS,
  ),
}
# The cpu run on the high-resolution corpus; Delft at 0.5 m (the cpu experiments' tile cell),
# the other sources at their own (Amsterdam, Gothenburg 1 m; Alexandria, IGN 2 m).
PRESETS["cpu_hr"] = {
  **PRESETS["cpu_rasters"],
  "data": dict(
    corpus="auto",
    corpus_cell_size=0.5,
    files=(),
    lidar_files=(),
    eval_files=(),
    normalisation=dict(mode="ndsm", scale_m=30.0),
  ),
}  # as the recommended finetuning input


# The cpu run streamed from TFRecord tiles (data_pipelines/corpus_reader.py) instead of rasters
# in memory; a built corpus folder can be named instead of "auto" (--config.data.corpus_tiles=DIR).
PRESETS["cpu"] = {
  **PRESETS["cpu_rasters"],
  "data": dict(
    corpus_tiles="auto",
    corpus_cell_size=0.5,
    **NO_RASTERS,
    normalisation=dict(mode="ndsm", scale_m=30.0),
  ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = common.select(arg, PRESETS, default="base")
  p = PRESETS[name]
  c = common.base_config()
  c.preset = name
  c.total_steps = p["total_steps"]
  c.global_batch = p["global_batch"]
  c.optim.warmup_steps = p["warmup_steps"]
  if p["lr"] is not None:
    c.optim.lr = p["lr"]
  c.checkpoint.every_steps = p["checkpoint_every"]
  c.log.every_steps = p["log_every"]
  c.log.picture_every_steps = p["picture_every"]

  # Model: an MAE preset plus MAEConfig field overrides (any MAEConfig field may be added).
  c.model = ml_collections.ConfigDict(
    {
      **dict(
        mask_ratio=0.75, norm_pix_loss=False, norm_pix_eps=1.0e-6, dtype="float32", remat=False
      ),
      **p["model"],
    }
  )
  # Initialisation: "" = from scratch, or a ported / exported MAE checkpoint path.
  c.init = ""
  c.channel_adapt = ""  # "sum" | "mean" | "repeat": RGB patch-embedding weights to 1 channel
  c.init_encoder_only = False  # keep the decoder freshly initialised

  # Data: random crops (img_size) of real rasters, per-crop min-max scaled by default.
  c.data = ml_collections.ConfigDict()
  c.data.files = PRETRAIN_FILES
  c.data.lidar_files = () if name == "tiny" else PRETRAIN_LIDAR  # tiny: seconds matter
  c.data.lidar_cell_size = 2.0  # metres; the thinned IGN tiles hold ~0.25 points/m2
  c.data.seed = 0
  c.data.augment = True
  c.data.min_relief = 1.0  # metres; flatter crops are redrawn
  # Held-out evaluation: the masked loss on fixed crops of unseen terrain, with fixed masks,
  # beside the loss of predicting every removed patch as the mean of the visible pixels.
  c.data.eval_files = EVAL_FILES
  c.data.eval_samples = 64
  # The high-resolution corpus (scripts/prepare_data.py corpus): a built corpus folder, or "auto"
  # = built into WORKDIR/corpus at corpus_cell_size on first use. When set, its training rasters
  # replace files and lidar_files, and its evaluation rasters (the IGN La Rochelle tile) eval_files.
  c.data.corpus = ""
  c.data.corpus_cell_size = 1.0
  # TFRecord corpora (scripts/prepare_data.py corpus-beam), streamed by tf.data with per-process
  # shard sharding: comma-separated corpus folders / manifests / globs (local or gs://), or "auto"
  # = the shared data built into WORKDIR/corpus_tiles (img_size tiles, stride img_size / 2) on
  # first use. When set, it replaces files, lidar_files, eval_files and corpus; its "eval" tiles
  # give the held-out loss. Tiles larger than img_size are cropped at random. Normalisation may
  # join modes with "+" (one channel each: set model.in_chans to match).
  c.data.corpus_tiles = ""
  c.data.shuffle_buffer = 4096  # per stream
  # Streams of shards the global batch is drawn from (global_batch / streams rows each); every
  # process reads whole streams, so the batches do not depend on the number of processes as
  # long as it divides this.
  c.data.streams = 8
  # Normalisation of the crops, as in configs/finetune.py (data_pipelines/normalisation.py):
  # "minmax" per crop (the paper's); "relative" (DSM height above the crop's low_percentile, /
  # scale_m, clipped) and "ndsm" (the corpus's nDSM rasters / scale_m, clipped) are the modes
  # finetuning can use, so an encoder pretrained with one is finetuned with the same.
  c.data.normalisation = ml_collections.ConfigDict(
    dict(mode="minmax", scale_m=30.0, low_percentile=2.0)
  )
  for key, value in p.get("data", {}).items():
    if key == "normalisation":
      c.data.normalisation.update(value)
    else:
      setattr(c.data, key, value)
  c.eval_every_steps = p["eval_every"]

  c.lock()  # a typo in --config.key is an error
  return c
