"""MAE pretraining step: the Trainer's step users run against the PyTorch reference, side by side.

The JAX side is `loop.Trainer(MAEPretrain(config), ...)`'s compiled step, the function
scripts/pretrain.py runs (masks, the config's AdamW and schedule, gradient norm, NaN guard, donated
state) for `configs/dem_pretrain.py:<preset>` in float32; the PyTorch side is
`transformers.ViTMAEForPreTraining` of the same shapes doing the same step (`torch.optim.AdamW`
without decay on biases and norms, a cosine schedule, the global gradient norm, no update on a
non-finite loss or gradient). Prints, from one
run on the same machine: images/s of each step and their ratio, the float32 matmul rate of this CPU
in JAX and in PyTorch (the practical roofline), the FLOPs of the step (jaxpr count, XLA's cost
analysis, analytic) and each step's fraction of the roofline. The steps take turns (`--rounds`),
so that a change of load on a shared machine hits both; the best step of each is compared.

  python benchmarks/mae_step.py --preset base --batch 8 --channels 3 --steps 3 --rounds 3
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from demmae_jax.models import mae


def analytic_train_flops(c: mae.MAEConfig) -> float:
  """Forward FLOPs (2 per multiply-add) x 3 for forward + backward, per image."""
  length = c.num_patches
  keep = int(length * (1 - c.mask_ratio)) + 1

  def blocks(tokens, width, depth):
    per_block = 24 * width**2 * tokens + 4 * tokens**2 * width
    return depth * per_block

  pix = c.patch_size**2 * c.in_chans
  fwd = (
    2 * length * pix * c.embed_dim
    + blocks(keep, c.embed_dim, c.depth)
    + 2 * keep * c.embed_dim * c.decoder_embed_dim
    + blocks(length + 1, c.decoder_embed_dim, c.decoder_depth)
    + 2 * (length + 1) * c.decoder_embed_dim * pix
  )
  return 3.0 * fwd


def timeit(fn, steps: int) -> float:
  fn()  # warm-up (compile / allocator)
  best = float("inf")
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def matmul_rates(n: int = 4096) -> tuple[float, float]:
  import torch

  a = jnp.asarray(np.random.rand(n, n).astype(np.float32))
  mm = jax.jit(lambda x: x @ x)
  t_jax = timeit(lambda: mm(a).block_until_ready(), 3)
  ta = torch.rand(n, n)
  t_torch = timeit(lambda: ta @ ta, 3)
  flops = 2.0 * n**3
  return flops / t_jax, flops / t_torch


def jax_step(preset: str, channels: int, batch: int, breakdown: bool = False):
  """The Trainer's step of `configs/dem_pretrain.py:<preset>` (what scripts/pretrain.py runs:
  per-example masks from the step's rng, the config's AdamW and lr schedule, the gradient norm and
  the NaN guard, donated state), in float32 with `channels` input channels at global batch
  `batch` on one device. Returns (run one step, XLA's FLOPs, the jaxpr's FLOPs, MAEConfig)."""
  from demmae_jax import sharding as shd
  from demmae_jax.train import loop, pretrain
  from demmae_jax.train.reporting import jaxpr_flops
  from train_steps import load_config

  config = load_config("dem_pretrain", preset)
  config.global_batch = batch
  config.model.update(in_chans=channels, dtype="float32")  # as PyTorch's float32 step
  config.lock()
  mesh = shd.make_mesh(data=1, fsdp=1, model=1, devices=jax.devices()[:1])
  trainer = loop.Trainer(pretrain.MAEPretrain(config), config, mesh)
  m = trainer.task.mae_config
  images = np.random.default_rng(0).standard_normal(
    (batch, m.img_size, m.img_size, channels), dtype=np.float32
  )
  traced = trainer.trace({"image": images})
  compiled = traced.lower().compile()
  state = [trainer.init_state()]
  on_device = shd.global_batch({"image": images}, mesh, batch)
  if breakdown:
    params, rest = state[0]["params"], state[0]["rest"]
    keys = jax.vmap(jax.random.fold_in, (None, 0))(trainer.rng, jnp.arange(batch))
    loss_fn = lambda p: trainer.task.loss_fn(nnx.merge(trainer.graphdef, p, rest), on_device, keys)[
      0
    ]
    grads = jax.jit(jax.grad(loss_fn))(params)
    opt_state = state[0]["opt_state"]
    parts = {
      "forward": (jax.jit(loss_fn), (params,)),
      "forward+backward": (jax.jit(jax.value_and_grad(loss_fn)), (params,)),
      "AdamW update": (
        jax.jit(lambda g, s, p: trainer.tx.update(g, s, p)[0]),
        (grads, opt_state, params),
      ),
    }
    for name, (fn, args) in parts.items():
      print(f"  JAX {name}: {timeit(lambda: jax.block_until_ready(fn(*args)), 3):.3f} s")  # noqa: B023

  def run():
    state[0], metrics = compiled(state[0], on_device, trainer.rng)
    metrics["loss"].block_until_ready()

  run.hlo_text = compiled.as_text()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return run, float(cost.get("flops", float("nan"))), jaxpr_flops(traced.jaxpr), m


# ------------------------------------------------------------------------------ profiles
_SHAPE = re.compile(r"[a-z]\d*\[([\d,]*)\]")


def _dims(text: str) -> list[int]:
  m = _SHAPE.search(text)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def hlo_matmul_flops(hlo_text: str) -> dict[str, float]:
  """FLOPs of the dots inside each top-level instruction of a compiled HLO module (a fusion
  counts the dots of the computation it calls): {instruction name: FLOPs}."""
  computations: dict[str, list[str]] = {}
  shapes: dict[tuple[str, str], list[int]] = {}  # (computation, value) -> dims
  name = None
  for line in hlo_text.splitlines():
    head = re.match(r"^(ENTRY )?%?([\w.\-]+) \((.*)\) -> .*\{$", line)
    if head:
      name = "ENTRY" if head.group(1) else head.group(2)
      computations[name] = []
      for pname, ptype in re.findall(r"([\w.\-]+): (\w+\[[\d,]*\])", head.group(3)):
        shapes[(name, pname)] = _dims(ptype)
    elif name is not None and line.strip() not in ("", "}"):
      inst = line.strip()
      m = re.match(r"(?:ROOT )?%?([\w.\-]+) = (\S+) ", inst)
      if m:
        shapes[(name, m.group(1))] = _dims(m.group(2))
      computations[name].append(inst)

  def dot_flops(comp: str, inst: str) -> float:
    m = re.match(r"(?:ROOT )?%?[\w.\-]+ = (\S+) dot\(%?([\w.\-]+), ", inst)
    if not m:
      return 0.0
    out, lhs = _dims(m.group(1)), shapes.get((comp, m.group(2)), [])
    contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst)
    k = math.prod(lhs[int(c)] for c in contract.group(1).split(",") if c) if contract else 1
    return 2.0 * math.prod(out) * k

  def flops_of(comp: str, inst: str, depth: int = 0) -> float:
    total = dot_flops(comp, inst)
    if depth < 4:
      for callee in re.findall(r"calls=%?([\w.\-]+)", inst):
        total += sum(flops_of(callee, i, depth + 1) for i in computations.get(callee, []))
    return total

  result = {}
  for inst in computations.get("ENTRY", []):
    m = re.match(r"(?:ROOT )?%?([\w.\-]+) = ", inst)
    if m:
      result[m.group(1)] = flops_of("ENTRY", inst)
  return result


def _kind(op: str, flops: float) -> str:
  if flops:
    return "matmul (dot / YNNPACK fusions)"
  for key, kind in (
    ("scatter", "scatter / gather"),
    ("gather", "scatter / gather"),
    ("copy", "copy / transpose"),
    ("transpose", "copy / transpose"),
  ):
    if key in op:
      return kind
  return "other fusions (norms, softmax, GELU, loss, AdamW)"


def profile_jax(fn, hlo_text: str, steps: int) -> dict:
  """Per-op time of `fn` (a jitted call) from a JAX profiler trace: each XLA:CPU thunk's events,
  grouped into matmuls (with their achieved FLOP/s) and the rest."""
  import glob
  import gzip
  import json
  import tempfile

  flops = hlo_matmul_flops(hlo_text)
  fn()
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    t0 = time.perf_counter()
    for _ in range(steps):
      fn()
    wall = (time.perf_counter() - t0) / steps
    jax.profiler.stop_trace()
    trace = json.load(gzip.open(glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)[0]))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  per_op: dict[str, float] = {}
  for e in events:
    op = (e.get("args") or {}).get("hlo_op")
    if e.get("ph") == "X" and op and not e["name"].startswith("end:"):
      per_op[op] = per_op.get(op, 0.0) + e["dur"] * 1e-6 / steps
  kinds: dict[str, list[float]] = {}
  for op, t in per_op.items():
    k = kinds.setdefault(_kind(op, flops.get(op, 0.0)), [0.0, 0.0])
    k[0] += t
    k[1] += flops.get(op, 0.0)
  top = sorted(per_op.items(), key=lambda kv: -kv[1])[:8]
  return {"wall": wall, "kinds": kinds, "top": [(op, t, flops.get(op, 0.0)) for op, t in top]}


def profile_torch(run, steps: int) -> dict:
  """Self time per aten op of the PyTorch step, grouped as profile_jax groups XLA's ops."""
  from torch.profiler import ProfilerActivity, profile

  run()
  with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
    t0 = time.perf_counter()
    for _ in range(steps):
      run()
    wall = (time.perf_counter() - t0) / steps
  kinds: dict[str, list[float]] = {}
  matmuls = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product")
  for ev in prof.key_averages():
    if ev.key.startswith("aten::"):
      is_mm = ev.key.startswith(matmuls)
      kind = (
        "matmul (mm / bmm / SDPA)"
        if is_mm
        else "copy / transpose"
        if ev.key in ("aten::copy_", "aten::clone", "aten::contiguous")
        else "scatter / gather"
        if "gather" in ev.key or "scatter" in ev.key
        else "other ops (norms, softmax, GELU, loss, AdamW)"
      )
      k = kinds.setdefault(kind, [0.0, 0.0])
      k[0] += ev.self_cpu_time_total * 1e-6 / steps
      k[1] += (ev.flops or 0) / steps if is_mm else 0.0
  return {"wall": wall, "kinds": kinds}


def print_profile(name: str, prof: dict) -> None:
  total = sum(t for t, _ in prof["kinds"].values())
  print(
    f"  {name}: {prof['wall']:.3f} s/step under the profiler; per-op time sums to {total:.3f} s"
  )
  for kind, (t, f) in sorted(prof["kinds"].items(), key=lambda kv: -kv[1][0]):
    rate = f" at {f / t / 1e9:.0f} GFLOP/s ({f / 1e9:.0f} GFLOP)" if f and t else ""
    print(f"    {kind:52s} {t:6.3f} s {t / total:4.0%}{rate}")
  for op, t, f in prof.get("top", []):
    print(f"      {op:40s} {t:6.3f} s" + (f" {f / t / 1e9:5.0f} GFLOP/s" if f else ""))


def torch_step(config: mae.MAEConfig, images: np.ndarray, noise: np.ndarray):
  import torch
  from transformers import ViTMAEConfig, ViTMAEForPreTraining

  hf = ViTMAEConfig(
    hidden_size=config.embed_dim,
    num_hidden_layers=config.depth,
    num_attention_heads=config.num_heads,
    intermediate_size=int(config.embed_dim * config.mlp_ratio),
    decoder_hidden_size=config.decoder_embed_dim,
    decoder_num_hidden_layers=config.decoder_depth,
    decoder_num_attention_heads=config.decoder_num_heads,
    decoder_intermediate_size=int(config.decoder_embed_dim * config.mlp_ratio),
    image_size=config.img_size,
    patch_size=config.patch_size,
    num_channels=config.in_chans,
    mask_ratio=config.mask_ratio,
    layer_norm_eps=1e-6,
  )
  model = ViTMAEForPreTraining(hf).train()
  # The Trainer's step, as PyTorch code would write it: decay on matrices only (optim.decay_mask),
  # a cosine schedule, the global gradient norm, and no update on a non-finite loss or gradient.
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [
    {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
    {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
  ]
  opt = torch.optim.AdamW(groups, lr=1.5e-4, betas=(0.9, 0.95))
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100_000)
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  tnoise = torch.from_numpy(noise)

  def run():
    opt.zero_grad(set_to_none=True)
    loss = model(pixel_values=pixels, noise=tnoise).loss
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if torch.isfinite(loss) and torch.isfinite(grad_norm):
      opt.step()
    sched.step()

  return run


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--preset", default="base")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--channels", type=int, nargs="+", default=[3, 1])
  parser.add_argument("--steps", type=int, default=5, help="timed steps (best of) per side")
  parser.add_argument(
    "--rounds",
    type=int,
    default=2,
    help="the two steps take turns this many times (best step of all rounds)",
  )
  parser.add_argument(
    "--breakdown",
    action="store_true",
    help="also time the JAX forward, forward+backward and AdamW update apart",
  )
  parser.add_argument(
    "--profile",
    action="store_true",
    help="also profile both steps per op: time in matmuls (and their FLOP/s) against the rest",
  )
  parser.add_argument(
    "--cores",
    type=int,
    default=None,
    help="pin the process to this many cores (both sides' thread pools then size "
    "to them); on a loaded machine --cores 1 avoids oversubscribed threads",
  )
  args = parser.parse_args()
  if args.cores:  # before the first JAX computation creates the CPU client and its thread pool
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])

  import torch

  cores = len(os.sched_getaffinity(0))
  torch.set_num_threads(cores)
  jax_rate, torch_rate = matmul_rates()
  print(f"cpu cores: {cores} of {os.cpu_count()}  jax {jax.__version__}  torch {torch.__version__}")
  print(
    f"float32 matmul 4096^3: JAX {jax_rate / 1e9:.1f} GFLOP/s, PyTorch "
    f"{torch_rate / 1e9:.1f} GFLOP/s (ratio {jax_rate / torch_rate:.2f})"
  )
  roofline = max(jax_rate, torch_rate)
  print(
    f"load average {os.getloadavg()[0]:.1f} at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
  )
  for channels in args.channels:
    run_jax, xla_flops, counted, config = jax_step(
      args.preset, channels, args.batch, args.breakdown
    )
    rng = np.random.default_rng(0)
    images = rng.standard_normal(
      (args.batch, config.img_size, config.img_size, channels), dtype=np.float32
    )
    noise = rng.random((args.batch, config.num_patches), dtype=np.float32)
    run_torch = torch_step(config, images, noise)
    t_jax = t_torch = float("inf")
    for r in range(args.rounds):  # taking turns: a change of load hits both sides
      t_jax = min(t_jax, timeit(run_jax, args.steps))
      t_torch = min(t_torch, timeit(run_torch, args.steps))
      print(
        f"  round {r + 1}: best JAX {t_jax:.3f} s, PyTorch {t_torch:.3f} s, load average "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
      )
    analytic = analytic_train_flops(config) * args.batch
    ideal = analytic / roofline
    print(
      f"\n{args.preset} {config.img_size}x{config.img_size}x{channels}, batch {args.batch}, "
      f"AdamW, float32; JAX: the Trainer's step (loop.Trainer + MAEPretrain)"
    )
    print(
      f"  FLOPs/image: analytic {analytic / args.batch / 1e9:.1f} G, jaxpr count "
      f"{counted / args.batch / 1e9:.1f} G, XLA cost analysis {xla_flops / args.batch / 1e9:.1f} G"
    )
    print(
      f"  JAX     {args.batch / t_jax:6.2f} img/s ({t_jax:.3f} s/step), "
      f"{ideal / t_jax:.0%} of matmul roofline"
    )
    print(
      f"  PyTorch {args.batch / t_torch:6.2f} img/s ({t_torch:.3f} s/step), "
      f"{ideal / t_torch:.0%} of matmul roofline"
    )
    print(f"  speed ratio JAX / PyTorch: {t_torch / t_jax:.2f}x", flush=True)
    if args.profile:
      print_profile("JAX", profile_jax(run_jax, run_jax.hlo_text, args.steps))
      print_profile("PyTorch", profile_torch(run_torch, args.steps))


if __name__ == "__main__":
  main()
