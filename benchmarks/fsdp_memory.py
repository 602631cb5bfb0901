"""Per-device parameter + optimiser memory of the MAE pretraining step: 1 device vs FSDP over 8.

  .venv/bin/python benchmarks/fsdp_memory.py [--preset base] [--devices 8]

Compiles (does not run) the real train step of `configs/dem_pretrain.py:PRESET` twice, on one
device and with `mesh.fsdp = N` over N forced host devices, and reads XLA's
`compiled.memory_analysis()`: argument bytes per device (train state + batch; the batch's own
share is subtracted), and temporaries for reference. Prints the ratio, which FSDP should bring
close to 1/N (small arrays, biases and norms, stay replicated by `sharding.min_fsdp_size`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--preset", default="base", help="configs/dem_pretrain.py preset")
  ap.add_argument("--devices", type=int, default=8, help="forced host devices for FSDP")
  ap.add_argument("--per-device-batch", type=int, default=1)
  args = ap.parse_args()
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
  )
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np

  from demmae_jax import config_files, sharding as shd
  from demmae_jax.train import loop, memory, pretrain, reporting

  if jax.device_count() < args.devices:
    print(f"only {jax.device_count()} devices: run in a fresh process", file=sys.stderr)
    return 2
  config = config_files.get_config("dem_pretrain", args.preset)
  n = args.devices
  with config.unlocked():
    config.global_batch = args.per_device_batch * n
  task = pretrain.MAEPretrain(config)
  img = config.model.img_size
  batch = {"image": jax.ShapeDtypeStruct((config.global_batch, img, img, 1), np.float32)}
  batch_bytes = config.global_batch * img * img * 4

  rows = []
  for name, devices, mesh_kw in (
    ("1 device", jax.devices()[:1], dict(data=1, fsdp=1)),
    (f"fsdp={n}", jax.devices()[:n], dict(data=1, fsdp=n)),
  ):
    mesh = shd.make_mesh(**mesh_kw, devices=devices)
    trainer = loop.Trainer(task, config, mesh)
    mem, _, compiled = memory.measure(trainer, batch)
    flops = reporting.compiled_flops(compiled)
    state_bytes = memory.state_bytes(trainer.abstract_state)
    arg = mem.argument - batch_bytes // len(devices)
    rows.append((name, arg, state_bytes, mem.temp))
    print(
      f"{name:>9}: params+opt state per device {arg / 2**20:9.1f} MiB (compiled arguments "
      f"minus batch; from shard shapes {state_bytes / 2**20:.1f} MiB), temporaries "
      f"{mem.temp / 2**20:.1f} MiB; cost analysis {flops / 1e9:.1f} GFLOP per "
      f"device program (x {len(devices)} devices = {flops * len(devices) / 1e9:.1f})",
      flush=True,
    )
  (_, a1, s1, _), (_, an, sn, _) = rows
  print(
    f"ratio fsdp={n} / 1 device: compiled {an / a1:.4f} (ideal 1/{n} = {1 / n:.4f}); "
    f"from shard shapes {sn / s1:.4f}; preset {args.preset}, "
    f"{sum(x.size for x in jax.tree.leaves(trainer.abstract_state['params'])) / 1e6:.1f}M "
    f"trainable params, min_fsdp_size {config.sharding.min_fsdp_size}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
