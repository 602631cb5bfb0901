"""The memory plan of a training step, made before the first step (docs/memory.md).

The step is compiled ahead of time (as the loop always did) and XLA's memory analysis of the
compiled program, per device (arguments + outputs - donated + temporaries), is compared with the
memory of the devices it will run on: an accelerator's allocator limit, or on CPU the host memory
available now, shared by the local CPU devices. `config.memory.limit` (or $DEMMAE_MEMORY_LIMIT)
replaces that figure, to plan for another machine or to test.

`config.memory.fit`:
  auto    if the step does not fit, keep the global batch and split each device's rows into
          micro-batches (the loop's gradient accumulation) and, if the model has the switch and
          that leaves fewer than `min_micro_batch` rows (or none fits), rematerialise its blocks;
          the largest micro-batch that fits, found by interpolating peak memory linearly in the
          micro-batch and checking each guess with its own compile (3 compiles, typically);
          only for tasks whose loss the split leaves unchanged (`Task.accumulation_exact`);
  strict  stop instead, with the numbers and the flags that would fit;
  off     only print the plan.
When even the smallest plan (one row per device per micro-batch, with remat and without) does not
fit, the run stops with one message before anything is allocated; when parameters, gradients and
optimiser state alone exceed the memory, it stops before compiling anything.

The chosen plan is written to `workdir/memory_plan.json`; a resumed run on the same mesh uses it
as it is (another machine's plan that does not fit here is an error naming the file).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

PLAN_FILE = "memory_plan.json"
LIMIT_ENV = "DEMMAE_MEMORY_LIMIT"
MODES = ("auto", "strict", "off")
GiB, MiB = 2**30, 2**20


def echo(line: str) -> None:
  print(line, flush=True)


class DoesNotFit(ValueError):
  """The step cannot run in the devices' memory under the allowed plans; the message says why,
  with the numbers and the flags that would fit."""


# ------------------------------------------------------------------------------ bytes
def parse_bytes(text: str | int | float) -> int:
  """'16GiB', '16G', '1.5 GB', '800MiB', '123456' -> bytes (G/GB/GiB all mean 2**30)."""
  if isinstance(text, (int, float)):
    return int(text)
  m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
  if not m:
    raise ValueError(f"memory size {text!r}: use e.g. 16GiB, 800MiB or a number of bytes")
  scale = {"": 1, "k": 2**10, "m": MiB, "g": GiB, "t": 2**40}[m.group(2).lower()]
  return int(float(m.group(1)) * scale)


def fmt(n: float) -> str:
  if abs(n) >= GiB:
    return f"{n / GiB:.2f} GiB"
  return f"{n / MiB:.0f} MiB" if abs(n) >= 100 * MiB else f"{n / MiB:.1f} MiB"


def host_available() -> tuple[int, str]:
  """(bytes, source): the host memory a new allocation can take now: MemAvailable, capped by a
  cgroup's limit minus its usage when the process runs in one."""
  found = []
  try:
    meminfo = Path("/proc/meminfo").read_text()
    kb = int(re.search(r"^MemAvailable:\s+(\d+)", meminfo, re.M).group(1))
    found.append((kb * 1024, "MemAvailable"))
  except (OSError, AttributeError):
    found.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"))
  for limit, usage in (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
  ):
    try:
      cap = Path(limit).read_text().strip()
      if cap != "max" and int(cap) < 2**60:
        found.append((int(cap) - int(Path(usage).read_text()), "cgroup limit - usage"))
    except (OSError, ValueError):
      pass
  return min(found)


def host_rss() -> tuple[int, int]:
  """(current, peak) resident memory of this process in bytes."""
  try:
    status = Path("/proc/self/status").read_text()
    rss, hwm = (
      int(re.search(rf"^{k}:\s+(\d+)", status, re.M).group(1)) * 1024 for k in ("VmRSS", "VmHWM")
    )
    return rss, hwm
  except (OSError, AttributeError):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak, peak


def measured_peak(devices=None) -> int:
  """Peak bytes so far: an accelerator's largest `peak_bytes_in_use` over the local devices; on
  CPU the process's peak resident memory (all local devices, the runtime and the input pipeline:
  what the host must hold)."""
  devices = devices or jax.local_devices()
  if devices[0].platform != "cpu":
    peaks = [int((d.memory_stats() or {}).get("peak_bytes_in_use", 0)) for d in devices]
    if any(peaks):
      return max(peaks)
  return host_rss()[1]


def device_memory(devices, limit: str | int | None = None) -> tuple[int, str]:
  """(bytes one device may use, where the figure comes from) for the local `devices` of a mesh:
  `limit` or $DEMMAE_MEMORY_LIMIT when set; an accelerator's allocator limit minus what is in use;
  on CPU the available host memory divided among the local CPU devices (they share it)."""
  limit = limit or os.environ.get(LIMIT_ENV)
  if limit:
    return parse_bytes(limit), f"limit {limit} (config.memory.limit or ${LIMIT_ENV})"
  devices = list(devices)
  d = devices[0]
  if d.platform != "cpu":
    stats = d.memory_stats() or {}
    if "bytes_limit" in stats:
      free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
      return free, f"{d.device_kind}: allocator limit {fmt(stats['bytes_limit'])} - in use"
  avail, source = host_available()
  n = sum(1 for x in devices if x.platform == "cpu")
  return avail // n, f"host {source} {fmt(avail)}" + (f" / {n} CPU devices" if n > 1 else "")


def budget(mesh, config) -> tuple[int, int, str]:
  """(usable bytes per device, device bytes, note): the device's memory minus the margin kept for
  the runtime, the input pipeline and checkpoint copies; the minimum over processes."""
  mem = config.get("memory") or {}
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  total, note = device_memory(local, mem.get("limit") or None)
  if jax.process_count() > 1:  # every process must make the same plan
    from jax.experimental import multihost_utils

    # in MiB: without jax_enable_x64 the gather is 32-bit, and bytes past 2 GiB would wrap
    mib = multihost_utils.process_allgather(np.int32(min(total // MiB, 2**31 - 1)))
    total = int(np.min(mib)) * MiB
    note += ", the smallest over processes"
  margin = float(mem.get("margin", 0.1))
  return int(total * (1 - margin)), total, note + (f"; {margin:.0%} kept free" if margin else "")


# ------------------------------------------------------------------------------ analysis
def state_bytes(abstract_state: Any, part: str | None = None) -> int:
  """Bytes of the train state per device (or of one part: params, rest, opt_state), from the
  shard shapes of its placement."""
  tree = abstract_state if part is None else abstract_state[part]
  return sum(
    int(np.prod(s.sharding.shard_shape(s.shape))) * s.dtype.itemsize for s in jax.tree.leaves(tree)
  )


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Per-device bytes of one compiled train step."""

  argument: int  # XLA: train state + batch + rng, as placed
  output: int
  alias: int  # outputs written in place of donated arguments (the state)
  temp: int  # activations kept for the backward, gradients, optimiser temporaries
  params: int  # shard shapes of the state parts
  opt_state: int
  rest: int

  @property
  def peak(self) -> int:
    return self.argument + self.output - self.alias + self.temp

  @property
  def batch(self) -> int:
    return max(self.argument - self.params - self.opt_state - self.rest, 0)

  def describe(self) -> str:
    extra = self.output - self.alias  # 0 but for the step counter when the state is donated
    return (
      f"parameters {fmt(self.params)}, optimiser state {fmt(self.opt_state)}, other state "
      f"{fmt(self.rest)}, batch {fmt(self.batch)}, activations + gradients + temporaries "
      f"{fmt(self.temp)}" + (f", undonated outputs {fmt(extra)}" if extra > MiB else "")
    )


def step_memory(compiled, abstract_state) -> StepMemory:
  """XLA's memory analysis of a compiled train step, beside its state's own sizes."""
  m = compiled.memory_analysis()
  return StepMemory(
    argument=int(m.argument_size_in_bytes),
    output=int(m.output_size_in_bytes),
    alias=int(m.alias_size_in_bytes),
    temp=int(m.temp_size_in_bytes),
    params=state_bytes(abstract_state, "params"),
    opt_state=state_bytes(abstract_state, "opt_state"),
    rest=state_bytes(abstract_state, "rest"),
  )


def measure(trainer, example: dict) -> tuple[StepMemory, Any, Any]:
  """(memory, traced, compiled) of `trainer`'s step for batches shaped like `example`."""
  traced = trainer.trace(example)
  compiled = traced.lower().compile()
  return step_memory(compiled, trainer.abstract_state), traced, compiled


# ------------------------------------------------------------------------------ the plan
@dataclasses.dataclass
class Trial:
  accum: int
  remat: bool | None  # the switch this plan flips (None: the task as configured)
  remat_on: bool | None  # whether its blocks are rematerialised (None: the model has no switch)
  micro: int  # rows per device per micro-batch
  memory: StepMemory
  trainer: Any
  traced: Any
  compiled: Any
  seconds: float


@dataclasses.dataclass
class Plan:
  trial: Trial
  usable: int
  device: int
  note: str
  reason: str
  fits: bool
  flags: str  # the config overrides that give this plan ("" = as configured)
  recorded: bool = False  # the workdir's own plan, reused

  @property
  def trainer(self):
    return self.trial.trainer

  def record(self, config, mesh) -> dict:
    t = self.trial
    return {
      "grad_accum_steps": t.accum,
      "remat": t.remat_on,
      "micro_batch_per_device": t.micro,
      "global_batch": int(config.global_batch),
      "mesh": dict(mesh.shape),
      "device_kind": mesh.devices.flat[0].device_kind,
      "predicted_peak_bytes": t.memory.peak,
      "usable_bytes": self.usable,
      "device_bytes": self.device,
      "memory_note": self.note,
      "memory": dataclasses.asdict(t.memory),
      "reason": self.reason,
      "host_rss_at_plan_bytes": host_rss()[0],
      "host_peak_rss_at_plan_bytes": host_rss()[1],
      "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


class Planner:
  """Compiles candidate plans of `trainer` (its task and config, on its mesh) for batches shaped
  like `example` and chooses one; `log` gets the lines to print (None: silent)."""

  def __init__(self, trainer, example: dict, *, log: Callable[[str], None] | None = echo):
    self.base, self.example, self.log = trainer, example, log or (lambda s: None)
    config = trainer.config
    mem = config.get("memory") or {}
    self.mode = mem.get("fit", "auto")
    if self.mode not in MODES:
      raise ValueError(f"memory.fit must be one of {MODES}, got {self.mode!r}")
    self.min_micro = int(mem.get("min_micro_batch", 8))
    self.allow_remat = bool(mem.get("allow_remat", True))
    self.usable, self.device, self.note = budget(trainer.mesh, config)
    from demmae_jax import sharding as shd

    self.rows = trainer.global_batch // shd.batch_parallelism(trainer.mesh)
    self.accum0 = trainer.accum
    self.remat0 = getattr(trainer.task, "remat", None)
    self.trials: dict[tuple[int, bool | None], Trial] = {}
    self._variants = {None: trainer.task}

  # -------------------------------------------------------------- candidates
  def _task(self, remat: bool | None):
    if remat not in self._variants:
      self._variants[remat] = self.base.task.with_remat(remat)
    return self._variants[remat]

  def can_remat(self) -> bool:
    return self.allow_remat and self.remat0 is False and self._task(True) is not None

  def trial(self, accum: int, remat: bool | None = None) -> Trial:
    if remat == self.remat0:
      remat = None
    key = (accum, remat)
    if key not in self.trials:
      t0 = time.perf_counter()
      if remat is None:
        trainer = self.base.with_accum(accum)
      else:
        from demmae_jax.train.loop import Trainer

        trainer = Trainer(
          self._task(remat), self.base.config, self.base.mesh, grad_accum_steps=accum
        )
      mem, traced, compiled = measure(trainer, self.example)
      t = Trial(
        accum,
        remat,
        self.remat0 if remat is None else remat,
        self.rows // accum,
        mem,
        trainer,
        traced,
        compiled,
        time.perf_counter() - t0,
      )
      if self.trials or not self.fits(t):  # the configured plan fitting needs no line of its own
        self.log(
          f"memory: {self._name(t)}: {fmt(mem.peak)} per device "
          f"({'fits' if self.fits(t) else 'does not fit'} in {fmt(self.usable)}; "
          f"compiled in {t.seconds:.0f} s)"
        )
      self.trials[key] = t
    return self.trials[key]

  def fits(self, t: Trial) -> bool:
    return t.memory.peak <= self.usable

  def _name(self, t: Trial) -> str:
    r = t.remat_on
    return f"{t.accum} micro-batch{'es' if t.accum > 1 else ''} of {t.micro} per device" + (
      "" if r is None else f", remat {'on' if r else 'off'}"
    )

  def flags(self, t: Trial) -> str:
    out = [f"--config.grad_accum_steps={t.accum}"] if t.accum != self.accum0 else []
    if t.remat is not None:
      out.append(f"--config.{self.base.task.remat_flag}={t.remat}")
    return " ".join(out)

  # -------------------------------------------------------------- search
  def largest(self, remat: bool | None) -> Trial | None:
    """The plan with the largest micro-batch that fits at this remat setting (None: even one row
    per device does not), by linear interpolation of peak memory in the micro-batch between a
    plan that fits and one that does not, each guess checked by its own compile."""
    lo = self.trial(self.rows, remat)
    if not self.fits(lo):
      return None
    hi = self.trial(self.accum0, remat)
    if self.fits(hi):
      return hi
    sizes = [m for m in range(1, self.rows + 1) if self.rows % m == 0]
    while True:
      slope = (hi.memory.peak - lo.memory.peak) / (hi.micro - lo.micro)
      inside = [
        m
        for m in sizes
        if lo.micro < m < hi.micro and lo.memory.peak + slope * (m - lo.micro) <= self.usable
      ]
      if not inside:
        return lo
      t = self.trial(self.rows // max(inside), remat)
      lo, hi = (t, hi) if self.fits(t) else (lo, t)

  def lower_bound(self) -> int:
    """Bytes per device any plan needs: the state, a gradient per parameter and the running sum
    of the micro-batch gradients."""
    m = self.base.abstract_state
    return state_bytes(m) + (2 if self.rows > 1 else 1) * state_bytes(m, "params")

  def choose(self, recorded: dict | None = None) -> Plan:
    """The plan to train with (see the module doc); raises DoesNotFit."""
    b = self.base
    self.log(
      f"memory: planning the step of global batch {b.global_batch} on mesh "
      f"{dict(b.mesh.shape)} ({self.rows} rows per device); {fmt(self.usable)} usable per "
      f"device ({self.note}); fit={self.mode}"
    )
    if recorded is not None:
      remat = recorded.get("remat")
      t = self.trial(
        int(recorded["grad_accum_steps"]),
        None if remat is None or remat == self.remat0 else bool(remat),
      )
      reason = f"the plan recorded in the workdir ({recorded.get('time', '?')})"
      if not self.fits(t) and self.mode != "off":
        raise DoesNotFit(
          f"the workdir's memory plan ({PLAN_FILE}: {self._name(t)}) needs {fmt(t.memory.peak)} "
          f"per device and {fmt(self.usable)} is usable here ({self.note}). Delete {PLAN_FILE} "
          f"to plan again for this machine (the global batch and the losses stay the same), or "
          f"set --config.memory.fit=off to try anyway."
        )
      return self._plan(t, reason, recorded=True)
    if self.mode != "off" and self.lower_bound() > self.usable:
      raise DoesNotFit(self._too_big(None))
    first = self.trial(self.accum0)
    if self.fits(first) or self.mode == "off":
      return self._plan(first, "as configured")
    best = self.search()
    if best is None:
      raise DoesNotFit(self._too_big(self.smallest()))
    needs = (
      f"as configured ({self._name(first)}) the step needs {fmt(first.memory.peak)} per "
      f"device, {fmt(self.usable)} is usable ({self.note})"
    )
    chosen = f"{self._name(best)}: {fmt(best.memory.peak)} per device"
    if self.mode == "strict":
      raise DoesNotFit(
        f"{needs}, and memory.fit=strict forbids changing the plan. The plan that "
        f"fits: {chosen}: add {self.flags(best)} (or drop "
        f"--config.memory.fit=strict to let the run choose it)."
      )
    if best.accum != self.accum0 and not getattr(b.task, "accumulation_exact", True):
      raise DoesNotFit(
        f"{needs}. Splitting the batch would fit ({chosen}) but this task's loss is "
        f"not a mean over examples, so micro-batches would change it slightly: "
        f"choose it yourself with {self.flags(best)}."
      )
    return self._plan(best, f"{needs}; the global batch is kept: {chosen}")

  def search(self) -> Trial | None:
    """The largest micro-batch that fits without changing remat; remat when that leaves fewer than
    `min_micro_batch` rows per micro-batch (or none fits) and remat allows more. Not remat first:
    with one row per micro-batch, the weights remat stacks for its scan can outweigh the
    activations it saves (ViT-B: 2.97 GiB with remat, 2.72 without)."""
    plain = self.largest(None)
    enough = plain is not None and plain.micro >= min(self.min_micro, self.rows)
    if enough or (plain is not None and not self.can_remat()):
      return plain
    if not self.can_remat():
      return None
    remat = self.largest(True)
    if remat is None or (plain is not None and plain.micro >= remat.micro):
      return plain
    return remat

  def smallest(self) -> Trial:
    """The least memory of the plans tried with one row per device per micro-batch."""
    return min((t for t in self.trials.values() if t.micro == 1), key=lambda t: t.memory.peak)

  def _too_big(self, t: Trial | None) -> str:
    m = self.base.abstract_state
    state, grads = state_bytes(m), state_bytes(m, "params")
    if t is None:
      what = (
        f"the train state alone (parameters {fmt(state_bytes(m, 'params'))} + optimiser "
        f"state {fmt(state_bytes(m, 'opt_state'))} + other {fmt(state_bytes(m, 'rest'))}) "
        f"plus its gradients take {fmt(self.lower_bound())} per device"
      )
      peak = self.lower_bound()
    else:
      what = f"even the smallest plan ({self._name(t)}) needs {fmt(t.memory.peak)} per device"
      peak = t.memory.peak
    # FSDP over n devices divides the state (and the gradients) by about n.
    sharded = state + grads
    room = self.usable - (peak - sharded)
    fsdp = self.base.mesh.shape["fsdp"]
    hint = ""
    if room > 0 and math.ceil(sharded * fsdp / room) > fsdp:
      n = math.ceil(sharded * fsdp / room)
      hint = (
        f" Sharding parameters, gradients and optimiser state over "
        f"{'about' if t else 'at least'} {n} devices (--config.mesh.fsdp={n} on a machine "
        f"with them) " + ("would fit." if t else "would fit them; activations come on top.")
      )
    if t is not None and peak <= self.device:
      hint += (
        f" It would fit in the margin kept free: --config.memory.margin="
        f"{max(0.0, 1 - peak / self.device) // 0.01 / 100:.2f} (at your own risk)."
      )
    tried = "splitting the batch" + (" or rematerialising" if self.can_remat() else "")
    if not self.allow_remat and self.remat0 is False and self._task(True) is not None:
      hint += (
        f" Remat was not tried (memory.allow_remat=False): "
        f"--config.{self.base.task.remat_flag}=True may fit."
      )
    return (
      f"{what}; {fmt(self.usable)} is usable per device ({self.note}). No {tried} makes "
      f"this step fit here.{hint} Otherwise use a smaller model or image size, or a device "
      f"with more memory."
    )

  def _plan(self, t: Trial, reason: str, recorded: bool = False) -> Plan:
    fits = self.fits(t)
    for other in self.trials.values():
      if other is not t and other.trainer is not t.trainer:
        other.trainer._eager_model = None  # a file-initialised model kept for nothing
    p = Plan(t, self.usable, self.device, self.note, reason, fits, self.flags(t), recorded)
    head = self.usable - t.memory.peak
    self.log(
      f"memory plan: {self._name(t)} (grad_accum_steps {t.accum}); per device "
      f"{t.memory.describe()} -> peak {fmt(t.memory.peak)} of {fmt(self.usable)} usable, "
      f"headroom {fmt(head)}{'' if fits else ' (DOES NOT FIT; memory.fit=off)'}; why: "
      f"{reason}"
    )
    return p


def read_plan(workdir: str | Path) -> dict | None:
  path = Path(workdir) / PLAN_FILE
  return json.loads(path.read_text()) if path.exists() else None


def plan(
  trainer,
  example: dict,
  workdir: str | Path | None = None,
  *,
  log: Callable[[str], None] | None = echo,
) -> Plan:
  """The plan for `trainer`'s step: the workdir's recorded one when it was made for the same
  global batch and mesh, else a new one (see the module doc)."""
  recorded = read_plan(workdir) if workdir is not None else None
  if recorded is not None and (
    recorded.get("global_batch") != trainer.global_batch
    or recorded.get("mesh") != dict(trainer.mesh.shape)
  ):
    if log:
      log(
        f"memory: {PLAN_FILE} was made for global batch {recorded.get('global_batch')} on mesh "
        f"{recorded.get('mesh')}; planning again for this mesh"
      )
    recorded = None
  return Planner(trainer, example, log=log).choose(recorded)


def write_plan(workdir: str | Path, plan_: Plan, config, mesh) -> None:
  from data_pipelines.atomic import atomic_write_text

  if jax.process_index() == 0 and not plan_.recorded:
    atomic_write_text(
      Path(workdir) / PLAN_FILE, json.dumps(plan_.record(config, mesh), indent=1), overwrite=True
    )


def dry_run(
  task,
  config,
  example: dict,
  mesh,
  workdir: str | Path | None = None,
  *,
  log: Callable[[str], None] | None = echo,
) -> Plan:
  """The plan a training run of `task` would make (or reuse from `workdir`), printed; nothing is
  allocated, trained or written. Raises DoesNotFit as the run would."""
  from demmae_jax.train.loop import Trainer

  p = plan(Trainer(task, config, mesh), example, workdir, log=log)
  if log:
    log(
      f"dry run: the step needs {fmt(p.trial.memory.peak)} per device of {fmt(p.usable)} usable; "
      f"the same command without --dry_run trains with this plan"
      + (f" (as {p.flags} would)" if p.flags else "")
    )
  return p
