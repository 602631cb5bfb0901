"""The real train steps of the configs, as `loop.Trainer`s with abstract batches: shared by the
benchmarks that compile a step without running it (step_memory.py, compile_time.py).

Nothing here allocates the model: the Trainer builds it with `nnx.eval_shape` and `compile` lowers
against ShapeDtypeStructs, so ViT-L fits on any host.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def load_config(file: str, preset: str, **overrides) -> ml_collections.ConfigDict:
  """`configs/<file>.py:<preset>` with dotted `overrides` ("optim.lr"=...) applied while still
  locked (a misspelt key is an error), then unlocked."""
  from demmae_jax import config_files

  config = config_files.get_config(file, preset, **overrides)
  config.unlock()
  return config


def pretrain(preset: str, batch: int, mesh=None, **model) -> tuple:
  """(Trainer, abstract batch) of `configs/dem_pretrain.py:preset` at global batch `batch`;
  `model` overrides MAEConfig fields (in_chans, dtype, remat, ...)."""
  from demmae_jax import sharding as shd
  from demmae_jax.train import loop, pretrain as pt

  config = load_config("dem_pretrain", preset)
  config.global_batch = batch
  config.model.update(model)
  trainer = loop.Trainer(pt.MAEPretrain(config), config, mesh or _one_device(shd))
  m = trainer.task.mae_config
  images = jax.ShapeDtypeStruct((batch, m.img_size, m.img_size, m.in_chans), np.float32)
  return trainer, {"image": images}


def finetune(
  preset: str, batch: int | None = None, tile: int | None = None, mesh=None, **overrides
) -> tuple:
  """(Trainer, abstract batch) of `configs/finetune.py:preset` with `overrides` (random backbone:
  the step is the same with pretrained weights), with a stand-in manifest of `tile`-pixel tiles
  (default: the backbone's image size, as the configs' tile sets)."""
  from demmae_jax import sharding as shd
  from demmae_jax.train import finetune as ft, loop

  config = load_config("finetune", preset, **overrides)
  if batch:
    config.global_batch = batch
  if tile is None:
    from demmae_jax.train.pretrain import model_config

    tile = model_config(config.model.backbone).img_size if config.model.kind == "upernet" else 224
  channels = int(config.data.normalisation.channels)
  manifest = {
    "tile_size": tile,
    "cell_size": 0.5,
    "label_names": {"0": "background", "1": "x"},
    "stats": {"elevation": None},
  }
  backbone, _ = ft._backbone(config, tile, channels)
  spec = ft.model_spec(config, manifest, backbone)
  task = ft.Finetune(config, spec, np.ones(int(config.num_classes), np.float32))
  trainer = loop.Trainer(task, config, mesh or _one_device(shd))
  b = int(config.global_batch)
  batch_spec = {
    "image": jax.ShapeDtypeStruct((b, tile, tile, channels), np.float32),
    "label": jax.ShapeDtypeStruct((b, tile, tile), np.int32),
    "valid": jax.ShapeDtypeStruct((b, tile, tile), np.float32),
  }
  return trainer, batch_spec


def _one_device(shd):
  return shd.make_mesh(data=1, fsdp=1, model=1, devices=jax.devices()[:1])
