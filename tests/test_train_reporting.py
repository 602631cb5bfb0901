"""Observability pieces: the peak-FLOP/s table, FLOPs from XLA's cost analysis, and the
metrics file after a resume."""

import math
import os
import types

import jax
import jax.numpy as jnp
import pytest

from demmae_jax.train import reporting


def _device(kind, platform="tpu"):
  return types.SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize(
  "kind, peak",
  [
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
  ],
)
def test_peak_table_matches_device_kinds(kind, peak):
  assert reporting.peak_flops_per_device(_device(kind))[0] == peak


ZEN3 = (
  "processor\t: 0\ncpu MHz\t\t: 2445.404\nflags\t\t: fpu sse sse2 avx fma avx2\n\n"
  "processor\t: 1\ncpu MHz\t\t: 2596.142\nflags\t\t: fpu sse sse2 avx fma avx2\n"
)
SKYLAKE = "processor\t: 0\ncpu MHz\t\t: 2600.000\nflags\t\t: fpu avx fma avx2 avx512f avx512bw\n"


@pytest.mark.parametrize(
  "cpuinfo, gflops",
  [
    (ZEN3, 8 * 4 * 2596.142e-3),  # AVX2: 8 lanes x 2 FMA x 2
    (SKYLAKE, 16 * 4 * 2.6),  # AVX-512: 166.4
    ("cpu MHz : 1000\nflags : sse sse2\n", 4 * 4 * 1.0),
  ],
)
def test_cpu_peak_per_core_from_simd_width_and_highest_clock(cpuinfo, gflops, monkeypatch):
  monkeypatch.delenv(reporting.CPU_PEAK_ENV, raising=False)
  assert reporting.cpu_peak_per_core(cpuinfo) == pytest.approx(gflops * 1e9)
  assert math.isnan(reporting.cpu_peak_per_core("flags : avx2 fma\n"))  # no clock: unknown


def test_cpu_device_peak_is_the_host_figure_times_cores_and_env_overrides(monkeypatch):
  monkeypatch.delenv(reporting.CPU_PEAK_ENV, raising=False)
  cores = len(os.sched_getaffinity(0))
  peak, note = reporting.peak_flops_per_device(_device("cpu", "cpu"))
  assert peak == pytest.approx(reporting.cpu_peak_per_core() * cores / jax.local_device_count())
  assert "/proc/cpuinfo" in note
  monkeypatch.setenv(reporting.CPU_PEAK_ENV, "50")
  peak, note = reporting.peak_flops_per_device(_device("cpu", "cpu"))
  assert (
    peak == pytest.approx(50e9 * cores / jax.local_device_count())
    and reporting.CPU_PEAK_ENV in note
  )
  assert math.isnan(reporting.peak_flops_per_device(_device("Some NPU", "npu"))[0])


def test_flops_come_from_the_compiled_program():
  m, k, n = 64, 128, 32
  compiled = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
  assert reporting.compiled_flops(compiled) == pytest.approx(2 * m * k * n, rel=0.01)


def test_resumed_run_drops_metric_lines_after_the_restored_step(tmp_path):
  w = reporting.MetricWriter(tmp_path, tensorboard=False)
  for step in range(1, 6):
    w.write(step, {"loss": 1.0 / step})
  w.close()
  w = reporting.MetricWriter(tmp_path, resume_step=3, tensorboard=False)
  w.write(4, {"loss": 0.2})
  w.close()
  rows = reporting.read_jsonl(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.2)]


def test_jaxpr_flops_count_matmuls_convolutions_and_every_scan_step():
  a, b = jnp.ones((64, 128)), jnp.ones((128, 32))
  assert reporting.jaxpr_flops(jax.make_jaxpr(jnp.matmul)(a, b)) == 2 * 64 * 128 * 32
  # the forward matmul + the one for the gradient of `a` (b is a constant)
  grad = jax.make_jaxpr(jax.grad(lambda a: (a @ b).sum()))(a)
  assert reporting.jaxpr_flops(grad) == 2 * (2 * 64 * 128 * 32)
  x, k = jnp.ones((2, 16, 16, 3)), jnp.ones((3, 3, 3, 8))
  conv = jax.make_jaxpr(
    lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  )(x, k)
  assert reporting.jaxpr_flops(conv) == 2 * (2 * 16 * 16 * 8) * (3 * 3 * 3)
  w = jnp.ones((5, 32, 32))
  scan = jax.make_jaxpr(lambda h, w: jax.lax.scan(lambda h, wi: (h @ wi, None), h, w)[0])(
    jnp.ones((4, 32)), w
  )
  assert reporting.jaxpr_flops(scan) == 5 * 2 * 4 * 32 * 32
