"""Segmentation finetuning step: frozen encoder vs unfrozen vs frozen with cached features.

  .venv/bin/python benchmarks/finetune_step.py --preset cpu_buildings --tile 64 --steps 5 --run 60
  .venv/bin/python benchmarks/finetune_step.py --preset buildings --tile 224 --steps 2

For `configs/finetune.py:PRESET` at global batch 8 (random encoder and data: the cost does not
depend on them) it builds the real `loop.Trainer` of each variant and compiles its train step:
  frozen    the default: encoder outside the optimiser, stop_gradient on its features;
  unfrozen  --config.freeze_backbone=False (encoder trained, layer-wise lr decay);
  cached    frozen, fed the encoder maps (`--config.cache_features=True`): no encoder in the step.
Printed per variant: XLA's compiled memory (`memory_analysis()`: arguments + outputs +
temporaries, and that minus the donated state aliased between them) and the best step time
of `--steps` rounds after compilation (the variants take turns in each round, so a load change
on this shared machine hits all of them), then ratios to the frozen step. For the cache: the
time to build it (`feature_cache.build`: the encoder over `--cache-tiles` random tiles x 8
symmetries) per tile, its host memory per tile, and the number of steps after which it has paid
for itself for a few training-set sizes. `--run STEPS` also times whole `finetune.run`s on the
real Delft tiles (prepared at the preset's tile size, without evaluation), cache on and off.
The load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import train_steps  # noqa: E402
from demmae_jax import sharding as shd  # noqa: E402
from demmae_jax.train import feature_cache, finetune as ft  # noqa: E402
from demmae_jax.train.loop import Trainer  # noqa: E402

VARIANTS = ("frozen", "unfrozen", "cached")


def load_config(preset: str, **overrides):
  config = train_steps.load_config("finetune", preset, **overrides)
  config.log.progress, config.log.tensorboard = False, False
  return config


def trainer_for(preset: str, batch: int, tile: int, freeze: bool) -> Trainer:
  """The loop's Trainer of `preset` with a stand-in manifest of `tile`-pixel tiles."""
  trainer, _ = train_steps.finetune(
    preset, batch, tile, mesh=shd.make_mesh(data=-1), freeze_backbone=freeze
  )
  return trainer


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  args, out, temp, alias = (
    m.argument_size_in_bytes,
    m.output_size_in_bytes,
    m.temp_size_in_bytes,
    m.alias_size_in_bytes,
  )
  return {
    "args": args,
    "out": out,
    "temp": temp,
    "sum": args + out + temp,
    "peak": args + out + temp - alias,
  }


def step_table(a) -> tuple[dict, nnx.Module]:
  """(per-variant figures, the frozen model for the cache figures)."""
  rng = np.random.default_rng(0)
  b, t = a.batch, a.tile
  batch = {
    "image": rng.normal(size=(b, t, t, 1)).astype(np.float32),
    "label": rng.integers(0, 2, (b, t, t)).astype(np.int32),
    "valid": np.ones((b, t, t), np.float32),
  }
  trainers = {
    "frozen": trainer_for(a.preset, b, t, True),
    "unfrozen": trainer_for(a.preset, b, t, False),
  }
  trainers["cached"] = trainers["frozen"]
  states = {v: tr.init_state() for v, tr in trainers.items()}
  model = trainers["frozen"].model(states["frozen"])
  maps = feature_cache._maps(*nnx.split(model), batch["image"])
  batches = {
    "frozen": batch,
    "unfrozen": batch,
    "cached": {
      **dict(zip(feature_cache.FEATURE_KEYS, map(np.asarray, maps))),
      "label": batch["label"],
      "valid": batch["valid"],
    },
  }
  steps, rows = {}, {}
  for v in VARIANTS:
    t0 = time.perf_counter()
    steps[v] = trainers[v].compile(batches[v])
    rows[v] = {"compile_s": time.perf_counter() - t0, **memory(steps[v])}
    batches[v] = shd.global_batch(batches[v], trainers[v].mesh, b)
    states[v], m = steps[v](states[v], batches[v], trainers[v].rng)  # warm-up
    jax.block_until_ready(m)
    rows[v]["time"] = float("inf")
  for _ in range(a.steps):
    for v in VARIANTS:
      t0 = time.perf_counter()
      states[v], m = steps[v](states[v], batches[v], trainers[v].rng)
      jax.block_until_ready(m)
      rows[v]["time"] = min(rows[v]["time"], time.perf_counter() - t0)
  print(
    f"\n{a.preset}: {t} px tiles, batch {b}, best of {a.steps} steps; load average "
    f"{os.getloadavg()[0]:.1f}"
  )
  print(
    "| variant | step | images/s | compiled memory (args + out + temp) | without donated "
    "aliasing | temporaries | compile |"
  )
  print("|---|---|---|---|---|---|---|")
  mib = lambda x: f"{x / 2**20:,.0f} MiB"
  for v in VARIANTS:
    r = rows[v]
    print(
      f"| {v} | {r['time']:.3f} s | {b / r['time']:.1f} | {mib(r['sum'])} | {mib(r['peak'])} | "
      f"{mib(r['temp'])} | {r['compile_s']:.0f} s |"
    )
  f, u, c = rows["frozen"], rows["unfrozen"], rows["cached"]
  print(
    f"unfrozen / frozen: time {u['time'] / f['time']:.2f}x, memory {u['sum'] / f['sum']:.2f}x "
    f"(without aliasing {u['peak'] / f['peak']:.2f}x, temporaries {u['temp'] / f['temp']:.2f}x)"
  )
  print(
    f"frozen / cached: time {f['time'] / c['time']:.2f}x (steps/s {1 / f['time']:.2f} -> "
    f"{1 / c['time']:.2f}), memory {f['sum'] / c['sum']:.2f}x"
  )
  return rows, trainers["frozen"].model(
    states["frozen"]
  )  # the live state: earlier ones were donated


def cache_table(a, rows: dict, model: nnx.Module) -> None:
  rng = np.random.default_rng(1)
  n, t = a.cache_tiles, a.tile
  tiles = {
    "image": rng.normal(size=(n, t, t, 1)).astype(np.float32),
    "label": rng.integers(0, 2, (n, t, t)).astype(np.int32),
    "valid": np.ones((n, t, t), np.float32),
  }
  batch = int(load_config(a.preset).eval_batch)
  graphdef, state = nnx.split(model)
  jax.block_until_ready(feature_cache._maps(graphdef, state, tiles["image"][:batch]))  # compile
  cache = feature_cache.build(model, iter([tiles]), batch)
  per_tile = cache.seconds / n
  saving = rows["frozen"]["time"] - rows["cached"]["time"]
  print(
    f"\ncache build: {n} tiles x 8 symmetries in {cache.seconds:.1f} s ({per_tile * 1e3:.0f} ms "
    f"per tile, encoder batch {batch}); host memory {cache.nbytes / n / 2**20:.2f} MiB per tile; "
    f"the cached step saves {saving:.3f} s; load average {os.getloadavg()[0]:.1f}"
  )
  print("| training tiles | cache build | cache memory | break-even steps |")
  print("|---|---|---|---|")
  for tiles_n in (10, 50, 200, 450):
    print(
      f"| {tiles_n} | {tiles_n * per_tile:.1f} s | {tiles_n * cache.nbytes / n / 2**20:,.0f} MiB | "
      f"{tiles_n * per_tile / saving:.0f} |"
      if saving > 0
      else f"| {tiles_n} | never |"
    )


def run_table(a) -> None:
  from data_pipelines.prepare import prepare_delft

  with tempfile.TemporaryDirectory(prefix="finetune_step_") as tmp:
    manifest = prepare_delft(
      Path(tmp) / "tiles", "buildings", tile_size=a.tile, stride=a.tile // 2, progress=False
    )
    walls = {}
    for cached in (False, True):
      config = load_config(
        a.preset,
        cache_features=cached,
        total_steps=a.run,
        eval_every_steps=0,
        global_batch=a.batch,
        **{"checkpoint.every_steps": a.run, "data.manifest": str(manifest)},
      )
      t0 = time.perf_counter()
      ft.run(config, Path(tmp) / f"run_{cached}")
      walls[cached] = time.perf_counter() - t0
    print(
      f"\nwhole run, {a.run} steps on the Delft '{config.data.train_split}' tiles ({a.tile} px), "
      f"no evaluation: normal {walls[False]:.1f} s, cached {walls[True]:.1f} s (cache build "
      f"included), ratio {walls[False] / walls[True]:.2f}x; load average {os.getloadavg()[0]:.1f}"
    )


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--preset", default="cpu_buildings")
  p.add_argument("--tile", type=int, default=64)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=5, help="timed rounds after the warm-up step")
  p.add_argument("--cache-tiles", type=int, default=64)
  p.add_argument("--run", type=int, default=0, help="also time whole runs of this many steps")
  a = p.parse_args()
  print(
    f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
    f"{os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.1f}"
  )
  rows, model = step_table(a)
  cache_table(a, rows, model)
  if a.run:
    run_table(a)


if __name__ == "__main__":
  main()
