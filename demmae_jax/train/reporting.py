"""What a run reports: JSONL + TensorBoard scalars, model FLOP/s and MFU, PNG pictures.

FLOPs per step are counted on the train step's jaxpr (`jaxpr_flops`: every matmul and
convolution, scan bodies times their length, so rematerialised blocks under `lax.scan` count in
full, as XLA's cost analysis, which counts a loop body once, does not); MFU is
achieved FLOP/s over the peak of the devices, from the table below. CPUs have no data sheet
figure and these machines change host between sessions, so the CPU peak is worked out from the
host itself (`cpu_peak_per_core`), times the cores a CPU device may use.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.extend.core
import numpy as np

from data_pipelines.atomic import atomic_file

# Dense bfloat16 peak FLOP/s per device (vendor data sheets).
PEAK_FLOPS = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,  # v5e
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,  # Trillium
  "NVIDIA A100": 312e12,
  "NVIDIA H100": 989e12,
}
CPU_PEAK_ENV = "DEMMAE_CPU_PEAK_GFLOPS"  # per core; overrides what /proc/cpuinfo implies


def cpu_peak_per_core(cpuinfo: str | None = None) -> float:
  """float32 peak FLOP/s of one core: SIMD lanes (AVX-512: 16, AVX2: 8, else 4) x 2 FMA units x
  2 FLOPs x the highest clock /proc/cpuinfo reports; $DEMMAE_CPU_PEAK_GFLOPS overrides it (for a
  CPU with one FMA unit or a boost clock cpuinfo does not show); NaN when nothing is known."""
  if os.environ.get(CPU_PEAK_ENV):
    return float(os.environ[CPU_PEAK_ENV]) * 1e9
  if cpuinfo is None:
    try:
      cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
      return float("nan")
  mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)]
  found = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
  flags = set(found.group(1).split()) if found else set()
  if not mhz:
    return float("nan")
  lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4
  return lanes * 2 * 2 * max(mhz) * 1e6


def peak_flops_per_device(device: jax.Device | None = None) -> tuple[float, str]:
  """(peak FLOP/s, where the figure comes from) for `device` (default: the first)."""
  device = device or jax.devices()[0]
  kind = device.device_kind
  for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(name) or name in kind:
      return peak, f"{name} bf16 data sheet"
  if device.platform == "cpu":
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_core = cpu_peak_per_core()
    source = f"${CPU_PEAK_ENV}" if os.environ.get(CPU_PEAK_ENV) else "/proc/cpuinfo"
    return (
      per_core * cores / jax.local_device_count(),
      f"CPU peak {per_core / 1e9:.1f} GFLOP/s/core ({source}) x {cores} cores",
    )
  return float("nan"), f"no peak known for {kind!r}"


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled (per-device) program, from XLA's cost analysis."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def jaxpr_flops(jaxpr) -> float:
  """FLOPs of the matmuls (dot_general) and convolutions of a (closed) jaxpr of the global
  computation, recursing into sub-jaxprs (jit, custom_vjp, remat: once; scan: `length` times;
  cond: the costliest branch). Elementwise work is left out: in a ViT it is ~1 % (XLA's count of
  the MAE-B step is 1.007x this). A recomputed (remat) forward is counted: hardware FLOPs."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in lhs_contract])
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(rhs) / rhs[out_feature_dim]
    elif name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
    else:
      times = eqn.params["length"] if name == "scan" else 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        total += times * jaxpr_flops(sub)
  return float(total)


class MetricWriter:
  """Scalars to `workdir/metrics.jsonl` (one JSON object per line) and TensorBoard. Only process
  0 writes. On resume, lines of steps after the restored step (from a killed run) are dropped."""

  def __init__(self, workdir: Path, resume_step: int = 0, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = Path(workdir) / "metrics.jsonl"
    self.tb = None
    if not self.active:
      return
    if self.path.exists():
      kept = [
        line
        for line in self.path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= resume_step
      ]
      tmp = self.path.with_name(f".{self.path.name}.tmp")
      tmp.write_text("".join(line + "\n" for line in kept))
      os.replace(tmp, self.path)
    self.file = open(self.path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.active:
      return
    row = {"step": int(step), **{k: _py(v) for k, v in scalars.items()}}
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()
    if self.tb:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.active:
      self.file.close()
      if self.tb:
        self.tb.close()


def _py(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def read_jsonl(path: Path) -> list[dict]:
  return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def save_figure(fig, path: Path) -> None:
  """Write a matplotlib figure atomically (temporary file, then rename) and close it."""
  import matplotlib.pyplot as plt

  try:
    with atomic_file(path, overwrite=True) as tmp:
      fig.savefig(tmp, dpi=fig.dpi, format=Path(path).suffix.lstrip(".") or "png")
  finally:
    plt.close(fig)


def plot_history(jsonl: Path, png: Path, keys: tuple[str, ...] = ("loss",)) -> None:
  """Curves of `keys` against step from a metrics.jsonl, as a PNG (written atomically)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_jsonl(jsonl)
  fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
  for k in keys:
    pts = [(r["step"], r[k]) for r in rows if k in r]
    if pts:
      ax.plot(*zip(*pts), label=k)
  ax.set_xlabel("step")
  ax.set_yscale("log")
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  save_figure(fig, png)
