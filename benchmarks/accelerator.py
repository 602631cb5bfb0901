#!/usr/bin/env python
"""The real pretraining step on whatever accelerator is present: the one command a GPU/TPU check needs.

For each preset of configs/dem_pretrain.py (default `base` and `large`, bfloat16 compute as those
presets are), runs the training loop users run (`demmae_jax.train.loop.train` with the
`MAEPretrain` task, or `pretrain.run` itself with `--corpus`): the Trainer's jitted step with its
per-example masks, gradient norm and NaN guard, donated state, the memory plan before the first
step, on a mesh over every device. It prints one JSON line per preset, from the loop's own log
row over the timed steps (every step after the first, which includes the first-call overhead):

  images_per_s, step_ms        wall time over the timed steps, synced once at their end
  gflop_per_image, mfu         FLOPs counted on the step's jaxpr (metrics.jaxpr_flops) over the
                               devices' peak (data-sheet bf16 peak; on CPU worked out from the host)
  peak_memory_gib              the devices' largest peak_bytes_in_use (memory_stats), else the
                               process's peak RSS (CPU)
  input_wait_ms, _fraction     host time blocked on the next batch, over the step time (the loop's
                               measurement, docs/data.md)

Input: by default batches of random heights already in host memory (the step alone: input wait
~0); `--corpus DIR` streams a Beam-built corpus through the tf.data reader (data.corpus_tiles,
normalised as the config says) by `pretrain.run`, as `scripts/pretrain.py` does.

  python benchmarks/accelerator.py                          # base and large at the presets' batch
  python benchmarks/accelerator.py --presets base --batch 8 --steps 3        # a CPU-sized check
  python benchmarks/accelerator.py --presets tiny --steps 3  # seconds on CPU (tests run this)
  python benchmarks/accelerator.py --presets base --corpus data/corpus_224  # with the real reader
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FIELDS = (
  "preset",
  "platform",
  "device_kind",
  "devices",
  "dtype",
  "global_batch",
  "grad_accum_steps",
  "steps_timed",
  "images_per_s",
  "step_ms",
  "gflop_per_image",
  "mfu",
  "peak_flops_note",
  "peak_memory_gib",
  "memory_source",
  "input",
  "input_wait_ms",
  "input_wait_fraction",
  "loss",
)


def _config(preset: str, batch: int | None, steps: int, dtype: str | None, corpus: str | None):
  from demmae_jax import config_files

  config = config_files.get_config("dem_pretrain", preset)
  config.unlock()
  if batch:
    config.global_batch = int(batch)
  if dtype:
    config.model.dtype = dtype
  # the preset's schedule; the run stops after 1 + steps (stop_after): step 1 is logged alone,
  # the last row covers the timed steps
  config.eval_every_steps = 0
  config.log.every_steps = config.total_steps
  config.log.picture_every_steps = 0
  config.log.progress = False
  config.log.tensorboard = False
  config.checkpoint.every_steps = config.total_steps
  config.checkpoint.keep = 1
  if corpus:
    config.data.corpus_tiles = corpus
  config.lock()
  return config


def measure(
  preset: str,
  *,
  batch: int | None = None,
  steps: int = 5,
  dtype: str | None = "bfloat16",
  corpus: str | None = None,
  workdir: str | None = None,
) -> dict:
  """One preset's run; the fields of FIELDS."""
  import jax
  import numpy as np

  from demmae_jax import sharding
  from demmae_jax.train import loop, pretrain
  from demmae_jax.train.reporting import peak_flops_per_device

  config = _config(preset, batch, steps, dtype, corpus)
  mesh = sharding.make_mesh(**config.mesh)
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    if corpus:
      result = pretrain.run(config, tmp, mesh=mesh, stop_after=1 + steps)
    else:
      task = pretrain.MAEPretrain(config)
      m = task.mae_config
      a, b = sharding.process_batch_rows(mesh, int(config.global_batch))
      images = np.random.default_rng(0).standard_normal(
        (b - a, m.img_size, m.img_size, m.in_chans), dtype=np.float32
      )

      def batches(start):
        while True:
          yield {"image": images}

      result = loop.train(task, config, tmp, batches, mesh=mesh, stop_after=1 + steps)
    plan = (
      json.loads((Path(tmp) / "memory_plan.json").read_text())
      if (Path(tmp) / "memory_plan.json").exists()
      else {}
    )
  row = [h for h in result.history if "images_per_s" in h][-1]
  if row["step"] != 1 + steps:
    raise RuntimeError(f"the run ended at step {row['step']}, not {1 + steps}")
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  return {
    "preset": preset,
    "platform": device.platform,
    "device_kind": device.device_kind,
    "devices": jax.device_count(),
    "dtype": str(config.model.get("dtype", "float32")),
    "global_batch": int(config.global_batch),
    "grad_accum_steps": plan.get("grad_accum_steps"),
    "steps_timed": steps,
    "images_per_s": round(row["images_per_s"], 3),
    "step_ms": round(row["step_ms"], 2),
    "gflop_per_image": round(row["flops_per_s"] / row["images_per_s"] / 1e9, 3),
    "mfu": round(row["mfu"], 4),
    "peak_flops_note": peak_flops_per_device()[1],
    "peak_memory_gib": round(row["peak_memory_gib"], 3),
    "memory_source": "device peak_bytes_in_use"
    if stats and stats.get("peak_bytes_in_use")
    else "process peak RSS",
    "input": f"corpus {corpus} (tf.data reader)" if corpus else "random heights in host memory",
    "input_wait_ms": round(row["input_wait_ms"], 3),
    "input_wait_fraction": round(row["input_wait_fraction"], 5),
    "loss": row["loss"],
  }


def main() -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--presets", nargs="+", default=["base", "large"], help="configs/dem_pretrain.py presets"
  )
  p.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's)")
  p.add_argument("--steps", type=int, default=5, help="timed steps, after one untimed first step")
  p.add_argument(
    "--dtype", default="bfloat16", help="model compute dtype (the base/large presets' is bfloat16)"
  )
  p.add_argument(
    "--corpus", default=None, help="stream this corpus (data.corpus_tiles) through pretrain.run"
  )
  p.add_argument(
    "--workdir", default=None, help="where the runs' temporary workdirs go (default: $TMPDIR)"
  )
  a = p.parse_args()
  import jax

  print(
    f"# {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
    f"{jax.__version__}, load average {os.getloadavg()[0]:.1f}, "
    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    flush=True,
  )
  for preset in a.presets:
    out = measure(
      preset, batch=a.batch, steps=a.steps, dtype=a.dtype, corpus=a.corpus, workdir=a.workdir
    )
    print(json.dumps(out), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
