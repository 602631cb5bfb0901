"""Per-device memory and FLOPs of the real train steps, from XLA's compiled analysis (no step runs).

  .venv/bin/python benchmarks/step_memory.py                      # ViT-B and ViT-L, ~20 compiles
  .venv/bin/python benchmarks/step_memory.py --presets base --batches 8 16 --no-fsdp --no-finetune
  .venv/bin/python benchmarks/step_memory.py --residuals-only     # seconds: tracing only
  .venv/bin/python benchmarks/step_memory.py --presets base --batches 8 --time-steps 3

For the MAE pretraining step of `configs/dem_pretrain.py:{base,large}` at 224 x 224 x C (C = 3 as
the paper, AdamW) it compiles float32 / bfloat16 compute x remat off / on at each per-device batch,
reads `compiled.memory_analysis()` and fits peak = fixed + per_image x batch, where peak =
arguments + outputs - aliased (donated state) + temporaries. From the fit it prints the largest
batch per device for a 16 GiB TPU v5e core and an 80 GiB H100 with the train state replicated,
and with the params + optimiser state sharded by FSDP over 8 (the replicated fit minus 7/8 of the
state; `--fsdp` also compiles the preset's own dtype/remat on a real fsdp = 8 mesh of forced host
devices to check that estimate). Then the frozen-backbone finetuning step of
`configs/finetune.py:buildings` (ViT-B + UperNet 512), and FLOPs per image: XLA's cost analysis
against the analytic count of benchmarks/mae_step.py, split encoder / decoder.

Beside XLA's numbers, `jax.ad_checkpoint`'s saved residuals give the activations the backward
needs per image whatever the backend (--residuals-only). `--time-steps` instead runs the compiled
step for achieved FLOP/s and MFU against `reporting.peak_flops_per_device`.

The analysis is XLA:CPU's buffer assignment. A TPU or GPU compiler fuses and lays out differently,
so these are estimates on paper for those devices, not measurements on them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

GiB = 2**30
DEVICES = {"TPU v5e core (16 GiB)": 16 * GiB, "H100 (80 GiB)": 80 * GiB}
FSDP = 8


def measure(trainer, batch) -> dict:
  """The library's analysis (what the trainer's memory plan reads), plus FLOPs and compile time."""
  from demmae_jax.train import memory, reporting

  t0 = time.perf_counter()
  mem, traced, compiled = memory.measure(trainer, batch)
  row = dict(
    argument=mem.argument,
    output=mem.output,
    alias=mem.alias,
    temp=mem.temp,
    state=memory.state_bytes(trainer.abstract_state),
    params=mem.params,
    peak=mem.peak,
    flops=reporting.compiled_flops(compiled),
    counted_flops=reporting.jaxpr_flops(traced.jaxpr),
    compile_s=time.perf_counter() - t0,
  )
  return row, compiled


def fit(batches, values) -> tuple[float, float]:
  """Least-squares (fixed, per_image) of values = fixed + per_image x batch."""
  import numpy as np

  slope, intercept = np.polyfit(np.asarray(batches, float), np.asarray(values, float), 1)
  return float(intercept), float(slope)


def max_batch(fixed: float, per_image: float, capacity: float) -> int:
  return max(int((capacity - fixed) // per_image), 0) if per_image > 0 else -1


def mib(x: float) -> str:
  return f"{x / 2**20:,.0f}"


def pretrain_table(preset: str, batches: list[int], channels: int, results: dict) -> None:
  from train_steps import pretrain

  size = pretrain(preset, batches[0], in_chans=channels)[0].task.mae_config.img_size
  print(
    f"\n## MAE pretraining step, {preset}, {size} x {size} x {channels}, AdamW, 1 device "
    f"(MiB per device)",
    flush=True,
  )
  print(
    "| compute | remat | batch | arguments | outputs - aliased | temporaries | peak | "
    "compile s |\n|---|---|---|---|---|---|---|---|"
  )
  fits = {}
  for dtype in ("float32", "bfloat16"):
    for remat in (False, True):
      rows = []
      for b in batches:
        trainer, batch = pretrain(preset, b, in_chans=channels, dtype=dtype, remat=remat)
        row, _ = measure(trainer, batch)
        rows.append(row)
        print(
          f"| {dtype} | {'on' if remat else 'off'} | {b} | {mib(row['argument'])} | "
          f"{mib(row['output'] - row['alias'])} | {mib(row['temp'])} | {mib(row['peak'])} | "
          f"{row['compile_s']:.0f} |",
          flush=True,
        )
      fixed, per_image = fit(batches, [r["peak"] for r in rows])
      _, temp_per_image = fit(batches, [r["temp"] for r in rows])
      fits[(dtype, remat)] = dict(
        fixed=fixed,
        per_image=per_image,
        temp_per_image=temp_per_image,
        state=rows[0]["state"],
        params=rows[0]["params"],
        flops=[r["flops"] / b for r, b in zip(rows, batches)],
        counted_flops=[r["counted_flops"] / b for r, b in zip(rows, batches)],
        rows=rows,
      )
  results[preset] = {f"{d}/remat={r}": v for (d, r), v in fits.items()}

  base = fits[("float32", False)]
  print(
    f"\nper-image and fixed memory (fit over batches {batches}); state = params + opt state "
    f"= {mib(base['state'])} MiB, of which params {mib(base['params'])} MiB"
  )
  print(
    "| compute | remat | fixed MiB | per image MiB | per image / f32 no-remat | "
    + " | ".join(f"max batch {k}: replicated / FSDP {FSDP}" for k in DEVICES)
    + " |\n|---|---|---|---|---|"
    + "---|" * len(DEVICES)
  )
  for (dtype, remat), f in fits.items():
    sharded_fixed = f["fixed"] - f["state"] * (FSDP - 1) / FSDP
    cols = [
      f"{max_batch(f['fixed'], f['per_image'], cap)} / "
      f"{max_batch(sharded_fixed, f['per_image'], cap)}"
      for cap in DEVICES.values()
    ]
    print(
      f"| {dtype} | {'on' if remat else 'off'} | {mib(f['fixed'])} | "
      f"{f['per_image'] / 2**20:,.1f} | {f['per_image'] / base['per_image']:.2f} | "
      + " | ".join(cols)
      + " |"
    )
  bf16, remat = fits[("bfloat16", False)], fits[("float32", True)]
  both = fits[("bfloat16", True)]
  print(
    f"ratios of per-image memory: bf16 / f32 {bf16['per_image'] / base['per_image']:.2f} "
    f"(expected ~0.5: activations are stored in bfloat16); remat / no remat "
    f"{remat['per_image'] / base['per_image']:.2f} (expected: each block keeps only its "
    f"input); both {both['per_image'] / base['per_image']:.2f}",
    flush=True,
  )


def fsdp_check(preset: str, batches: list[int], channels: int, results: dict) -> None:
  """Compile the preset's own dtype/remat on an fsdp=8 mesh; compare with the 1/8 estimate."""
  import jax

  from demmae_jax import sharding as shd
  from train_steps import pretrain

  if jax.device_count() < FSDP:
    print(f"fsdp check skipped: {jax.device_count()} devices", flush=True)
    return
  mesh = shd.make_mesh(data=1, fsdp=FSDP, model=1, devices=jax.devices()[:FSDP])
  trainer, _ = pretrain(preset, FSDP, mesh=mesh, in_chans=channels)
  c = trainer.task.mae_config
  key = f"{c.dtype}/remat={c.remat}"
  rows = []
  for b in batches:
    trainer, batch = pretrain(preset, b * FSDP, mesh=mesh, in_chans=channels)
    row, _ = measure(trainer, batch)
    rows.append(row)
  fixed, per_image = fit(batches, [r["peak"] for r in rows])
  one = results[preset][key]
  estimate = one["fixed"] - one["state"] * (FSDP - 1) / FSDP
  results[preset][f"fsdp{FSDP}/{key}"] = dict(fixed=fixed, per_image=per_image, rows=rows)
  print(
    f"\nfsdp={FSDP} mesh, {preset} as its preset ({key}), per device: state "
    f"{mib(rows[0]['state'])} MiB (1 device: {mib(one['state'])}), fixed {mib(fixed)} MiB "
    f"(estimate from 1 device: {mib(estimate)}), per image {per_image / 2**20:,.1f} MiB "
    f"(1 device: {one['per_image'] / 2**20:,.1f}); max batch per device "
    + ", ".join(f"{k}: {max_batch(fixed, per_image, cap)}" for k, cap in DEVICES.items()),
    flush=True,
  )


def finetune_table(batches: list[int], results: dict) -> None:
  from train_steps import finetune

  print(
    "\n## finetuning step, configs/finetune.py:buildings (frozen ViT-B/16 + UperNet 512, "
    "224 px, 1 channel), 1 device",
    flush=True,
  )
  rows = []
  for b in batches:
    trainer, batch = finetune("buildings", b)
    row, _ = measure(trainer, batch)
    rows.append(row)
    print(
      f"batch {b}: arguments {mib(row['argument'])} MiB (state {mib(row['state'])}, trainable "
      f"{mib(row['params'])}), temporaries {mib(row['temp'])}, peak {mib(row['peak'])} MiB; "
      f"{row['flops'] / b / 1e9:.1f} GFLOP/image; compile {row['compile_s']:.0f} s",
      flush=True,
    )
  fixed, per_image = fit(batches, [r["peak"] for r in rows])
  results["finetune_buildings"] = dict(fixed=fixed, per_image=per_image, rows=rows)
  print(
    f"fit: fixed {mib(fixed)} MiB + {per_image / 2**20:,.1f} MiB per image; max batch "
    + ", ".join(f"{k}: {max_batch(fixed, per_image, cap)}" for k, cap in DEVICES.items()),
    flush=True,
  )


def residual_bytes(preset: str, channels: int, dtype: str, remat: bool, batch: int) -> int:
  """Bytes JAX saves from the forward pass for the backward (`saved_residuals`), traced only:
  what any backend must keep at least, before its own scheduling and fusion."""
  import jax
  import numpy as np
  from flax import nnx
  from jax._src.ad_checkpoint import saved_residuals

  from train_steps import pretrain

  trainer, spec = pretrain(preset, batch, in_chans=channels, dtype=dtype, remat=remat)
  state = trainer.abstract_state

  def loss(params, rest, images):
    return trainer.task.loss_fn(
      nnx.merge(trainer.graphdef, params, rest), {"image": images}, jax.random.key(0)
    )[0]

  res = saved_residuals(loss, state["params"], state["rest"], spec["image"])
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, _ in res if hasattr(a, "dtype"))


def residual_table(presets: list[str], channels: int, results: dict) -> None:
  print("\n## activations saved for the backward per image (jax saved_residuals; MiB)")
  print(
    "| model | f32 | f32 remat | bf16 | bf16 remat | bf16 / f32 | remat / no remat (f32) |"
    "\n|---|---|---|---|---|---|---|"
  )
  for p in presets:
    per = {}
    for dtype in ("float32", "bfloat16"):
      for remat in (False, True):
        # the difference of batches 2 and 1 leaves out what does not grow with the batch
        per[(dtype, remat)] = residual_bytes(p, channels, dtype, remat, 2) - residual_bytes(
          p, channels, dtype, remat, 1
        )
    results.setdefault("residuals", {})[p] = {f"{d}/remat={r}": v for (d, r), v in per.items()}
    f32 = per[("float32", False)]
    print(
      f"| {p} | "
      + " | ".join(f"{v / 2**20:.1f}" for v in per.values())
      + f" | {per[('bfloat16', False)] / f32:.2f} | {per[('float32', True)] / f32:.3f} |",
      flush=True,
    )


def remat_probe() -> None:
  """Does XLA:CPU's compiled memory drop with jax.checkpoint? 12 residual blocks, unrolled in
  Python and under lax.scan (why models.vit.run_blocks scans rematerialised blocks)."""
  import jax
  import jax.numpy as jnp

  def block(w, x):
    return x + jnp.tanh(jnp.tanh(x @ w) @ w.T)

  def net(ws, x, remat, scan):
    f = jax.checkpoint(block) if remat else block
    if scan:
      return jax.lax.scan(lambda h, w: (f(w, h), None), x, ws)[0].sum()
    for i in range(ws.shape[0]):
      x = f(ws[i], x)
    return x.sum()

  ws = jax.ShapeDtypeStruct((12, 256, 1024), jnp.float32)
  x = jax.ShapeDtypeStruct((4096, 256), jnp.float32)  # 4 MiB; each hidden 16 MiB
  print("\nXLA:CPU temporaries of grad of 12 blocks (MiB), remat off / on:")
  for scan in (False, True):
    temps = [
      jax.jit(jax.grad(functools.partial(net, remat=r, scan=scan)))
      .lower(ws, x)
      .compile()
      .memory_analysis()
      .temp_size_in_bytes
      / 2**20
      for r in (False, True)
    ]
    print(f"  {'lax.scan' if scan else 'unrolled'}: {temps[0]:.0f} / {temps[1]:.0f}", flush=True)


def flops_table(presets: list[str], channels: int, results: dict) -> None:
  from demmae_jax.models import mae
  from mae_step import analytic_train_flops

  print("\n## FLOPs per image (forward + backward; G = 1e9)")
  print(
    "| model | analytic total | encoder blocks | decoder blocks | embed + projections | "
    "XLA f32 | counted f32 | counted f32 remat |\n|---|---|---|---|---|---|---|---|"
  )
  for p in presets:
    c = mae.preset(p, in_chans=channels)
    total = analytic_train_flops(c)
    enc = total - analytic_train_flops(c.replace(depth=0))
    dec = total - analytic_train_flops(c.replace(decoder_depth=0))
    r = results[p]
    # XLA's cost analysis counts a loop body once, so under remat (blocks in a scan) only the
    # jaxpr count (matmuls and convolutions, reporting.jaxpr_flops) holds.
    xla = r["float32/remat=False"]["flops"][0]
    counted, remat = (r[f"float32/remat={m}"]["counted_flops"][0] for m in (False, True))
    print(
      f"| {p} | {total / 1e9:.1f} | {enc / 1e9:.1f} ({enc / total:.0%}) | {dec / 1e9:.1f} "
      f"({dec / total:.0%}) | {(total - enc - dec) / 1e9:.1f} | {xla / 1e9:.1f} "
      f"({xla / total:.3f}x) | {counted / 1e9:.1f} ({counted / total:.3f}x) | {remat / 1e9:.1f} "
      f"({remat / total:.3f}x) |"
    )


def time_steps(preset: str, batch: int, channels: int, steps: int) -> None:
  """Run the compiled float32 and bfloat16 steps: achieved FLOP/s against the host's CPU peak."""
  import jax
  import numpy as np

  from demmae_jax.train import reporting
  from mae_step import matmul_rates
  from train_steps import pretrain

  peak, note = reporting.peak_flops_per_device()
  print(
    f"\n## achieved FLOP/s, {preset} batch {batch}, best of {steps} steps; peak {note}; "
    f"load average {os.getloadavg()[0]:.1f}"
  )
  jax_mm, torch_mm = matmul_rates()
  print(
    f"float32 matmul 4096^3 now: JAX {jax_mm / 1e9:.1f}, PyTorch {torch_mm / 1e9:.1f} GFLOP/s "
    f"({jax_mm / peak:.0%} / {torch_mm / peak:.0%} of that peak)",
    flush=True,
  )
  for dtype in ("float32", "bfloat16"):
    trainer, spec = pretrain(preset, batch, in_chans=channels, dtype=dtype)
    step = trainer.compile(spec)
    flops = reporting.compiled_flops(step)
    state = trainer.init_state()
    images = {"image": np.random.default_rng(0).random(spec["image"].shape, np.float32)}
    best = float("inf")
    for i in range(steps + 1):
      t0 = time.perf_counter()
      state, m = step(state, images, trainer.rng)
      jax.block_until_ready(m["loss"])
      if i:  # the first call pays allocation
        best = min(best, time.perf_counter() - t0)
    print(
      f"{dtype}: {best:.2f} s/step, {flops / best / 1e9:.1f} GFLOP/s (XLA count), MFU "
      f"{flops / best / peak:.1%} of the peak, {flops / best / jax_mm:.0%} of JAX's "
      f"matmul rate",
      flush=True,
    )
    del state


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--presets", nargs="+", default=["base", "large"])
  ap.add_argument("--batches", type=int, nargs="+", default=[8, 16], help="per device")
  ap.add_argument("--channels", type=int, default=3)
  ap.add_argument(
    "--no-fsdp", dest="fsdp", action="store_false", help="skip the compiles on a real fsdp=8 mesh"
  )
  ap.add_argument("--no-finetune", dest="finetune", action="store_false")
  ap.add_argument(
    "--time-steps",
    type=int,
    default=0,
    help="instead of the tables: run N steps of the first preset at the first batch "
    "(float32, bfloat16) for achieved FLOP/s",
  )
  ap.add_argument(
    "--residuals-only",
    action="store_true",
    help="only the saved-activation table (tracing, no compile)",
  )
  ap.add_argument("--json", help="write the measured numbers here")
  args = ap.parse_args()
  # (not when timing: the CPU peak per device is divided among forced devices)
  if (
    args.fsdp
    and not args.time_steps
    and "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")
  ):
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={FSDP}"
    )
  import jax

  print(
    f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} cores, load "
    f"average {os.getloadavg()[0]:.1f}; per-device batches {args.batches}",
    flush=True,
  )
  results = {}
  if args.time_steps:
    time_steps(args.presets[0], args.batches[0], args.channels, args.time_steps)
    return 0
  residual_table(args.presets, args.channels, results)
  remat_probe()
  if args.residuals_only:
    return 0
  for p in args.presets:
    pretrain_table(p, args.batches, args.channels, results)
    if args.fsdp:
      fsdp_check(p, args.batches, args.channels, results)
  if args.finetune:
    finetune_table(args.batches, results)
  flops_table(args.presets, args.channels, results)
  print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
