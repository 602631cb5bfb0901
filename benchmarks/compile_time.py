"""Compile time of the real train steps, cold and from JAX's persistent compilation cache.

  .venv/bin/python benchmarks/compile_time.py
  .venv/bin/python benchmarks/compile_time.py --steps pretrain:cpu finetune:cpu_buildings

Each step (`pretrain:PRESET` of configs/dem_pretrain.py, `finetune:PRESET` of configs/finetune.py,
at the preset's global batch on one device, as scripts/pretrain.py and scripts/finetune.py would
compile it here) is built, lowered and compiled in a fresh subprocess twice over one new cache
directory: cold (empty cache, which it fills) and warm (a second process reading it). Per run it
prints the wall seconds of tracing + lowering and of XLA compilation, the cache hits and misses
JAX reports (`jax.monitoring` events) and the files in the cache directory, then warm / cold.

The child sets the cache with jax.config.update; scripts read the same options from the
environment (`JAX_COMPILATION_CACHE_DIR`, `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`) when JAX
is imported, so `--env` runs the children that way instead, as a user of the scripts would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_STEPS = ["pretrain:cpu", "finetune:cpu_buildings", "pretrain:base", "finetune:buildings"]


def child(step: str, cache: str, via_env: bool) -> None:
  """One fresh process: build, lower and compile `step`; print a JSON line."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  t_import = time.perf_counter()
  import jax

  if not via_env:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  events: dict[str, int] = {}
  jax.monitoring.register_event_listener(
    lambda name, **_: events.__setitem__(name, events.get(name, 0) + 1)
  )
  import train_steps

  kind, preset = step.split(":")
  t0 = time.perf_counter()
  trainer, batch = (
    train_steps.pretrain(preset, _preset_batch(preset))
    if kind == "pretrain"
    else train_steps.finetune(preset)
  )
  t1 = time.perf_counter()
  lowered = trainer.jitted_step(batch).lower(trainer.abstract_state, batch, trainer.rng)
  t2 = time.perf_counter()
  lowered.compile()
  t3 = time.perf_counter()
  print(
    json.dumps(
      dict(
        import_s=t0 - t_import,
        build_s=t1 - t0,
        lower_s=t2 - t1,
        compile_s=t3 - t2,
        global_batch=trainer.global_batch,
        cache_dir=jax.config.jax_compilation_cache_dir,
        hits=events.get("/jax/compilation_cache/cache_hits", 0),
        misses=events.get("/jax/compilation_cache/cache_misses", 0),
        using_cache=events.get("/jax/compilation_cache/tasks_using_cache", 0),
      )
    ),
    flush=True,
  )


def _preset_batch(preset: str) -> int:
  from train_steps import load_config

  return int(load_config("dem_pretrain", preset).global_batch)


def run_child(step: str, cache: str, via_env: bool) -> dict:
  env = dict(os.environ, JAX_EXPLAIN_CACHE_MISSES="1")  # a warm miss says why on stderr
  args = [sys.executable, __file__, "--child", step, "--cache", cache]
  if via_env:
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    args.append("--env")
  t0 = time.perf_counter()
  out = subprocess.run(args, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if out.returncode:
    raise RuntimeError(f"{step} child failed:\n{out.stderr[-3000:]}")
  row = json.loads(out.stdout.strip().splitlines()[-1])
  files = [p for p in Path(cache).rglob("*") if p.is_file()]
  row.update(
    process_s=wall,
    cache_files=len(files),
    cache_mib=sum(p.stat().st_size for p in files) / 2**20,
    explain=[line for line in out.stderr.splitlines() if "cache miss" in line.lower()][:5],
  )
  return row


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--steps", nargs="+", default=DEFAULT_STEPS, help="kind:preset")
  ap.add_argument(
    "--env",
    action="store_true",
    help="enable the cache through JAX_COMPILATION_CACHE_DIR, not jax.config",
  )
  ap.add_argument("--child", help=argparse.SUPPRESS)
  ap.add_argument("--cache", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    child(args.child, args.cache, args.env)
    return 0
  from importlib.metadata import version

  print(
    f"jax {version('jax')}, {os.cpu_count()} cores, cache via "
    f"{'environment' if args.env else 'jax.config.update'}",
    flush=True,
  )
  print(
    "| step | global batch | run | trace + lower s | compile s | cache hits / misses | "
    "cache files (MiB) | load avg |\n|---|---|---|---|---|---|---|---|",
    flush=True,
  )
  summary = []
  for step in args.steps:
    with tempfile.TemporaryDirectory(prefix="jax_cache_") as cache:
      rows = {}
      for run in ("cold", "warm"):
        r = rows[run] = run_child(step, cache, args.env)
        if run == "warm" and r["misses"]:
          print("  warm misses:", *r["explain"], sep="\n    ", flush=True)
        print(
          f"| {step} | {r['global_batch']} | {run} | {r['lower_s']:.1f} | {r['compile_s']:.1f} "
          f"| {r['hits']} / {r['misses']} | {r['cache_files']} ({r['cache_mib']:.1f}) | "
          f"{os.getloadavg()[0]:.1f} |",
          flush=True,
        )
      summary.append((step, rows["cold"], rows["warm"]))
  print("\nwarm / cold:")
  for step, cold, warm in summary:
    print(
      f"  {step}: compile {warm['compile_s'] / cold['compile_s']:.3f} "
      f"({cold['compile_s']:.1f} s -> {warm['compile_s']:.1f} s); trace + lower + compile "
      f"{(warm['lower_s'] + warm['compile_s']) / (cold['lower_s'] + cold['compile_s']):.2f}"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
