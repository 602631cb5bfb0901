"""Config sections every training run shares (pretraining and finetuning), so the loop, the mesh
and the checkpoints read the same keys everywhere. A config file adds its task's sections."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.global_batch = 256  # over all processes and devices
  c.grad_accum_steps = 1  # micro-batches per step (the global batch is split in this many)
  c.eval_every_steps = 0  # 0: no evaluation

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1.5e-4  # lr = base_lr x global_batch / 256 unless `lr` is set
  c.optim.lr = config_dict.placeholder(float)
  c.optim.betas = (0.9, 0.95)
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.05
  c.optim.schedule = "cosine"  # cosine | polynomial | constant, after a linear warmup
  c.optim.warmup_steps = 40
  c.optim.min_lr = 0.0
  c.optim.power = 1.0  # polynomial schedule only
  c.optim.clip_grad_norm = 0.0  # 0: no clipping
  c.optim.layer_decay = config_dict.placeholder(float)  # e.g. 0.65 for unfrozen-ViT finetuning

  # Mesh over all devices of all processes; -1 = whatever is left.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = ((".*", "fsdp"),)  # (regex on the array path, tactic); see demmae_jax.sharding
  c.sharding.min_fsdp_size = 2**14  # arrays with fewer elements stay replicated

  # Memory plan before the first step (demmae_jax/train/memory.py, docs/memory.md). It may change
  # between restarts of one workdir: the plan a run chose is kept in workdir/memory_plan.json.
  c.memory = ml_collections.ConfigDict(
    dict(
      fit="auto",  # auto: split the batch into micro-batches / remat until the step fits;
      # strict: stop instead, naming the flags that fit; off: only print the plan
      limit="",  # bytes per device to plan for, e.g. "16GiB"; "": $DEMMAE_MEMORY_LIMIT or the device's
      margin=0.1,  # fraction of it kept free for the runtime, input pipeline, checkpoint copies
      allow_remat=True,  # auto may switch the model's remat on (more compute, less memory)
      min_micro_batch=8,
    )
  )  # auto: below this many rows per device per micro-batch, try remat

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=200, keep=3, async_save=True))
  # Logging may change between restarts of one workdir; everything else must not.
  c.log = ml_collections.ConfigDict(
    dict(every_steps=10, picture_every_steps=0, progress=True, tensorboard=True)
  )
  # Multi-host: coordinator "host:port" (or "auto" on Cloud TPU); empty: one process.
  c.distributed = ml_collections.ConfigDict(
    dict(coordinator_address="", num_processes=1, process_id=0)
  )
  return c


def select(arg: str | None, presets: dict, default: str) -> str:
  name = arg or default
  if name not in presets:
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
  return name
