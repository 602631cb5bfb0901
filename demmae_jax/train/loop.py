"""The one training loop: init or restore -> jitted step -> log -> checkpoint, for any `Task`.

A task says what is trained (`build_model`, `trainable` filter), how (`loss_fn`), and optionally
how it is evaluated and pictured. The loop owns everything else: mesh placement, the optimiser,
the pure jitted `train_step(state, batch, rng)` with donated state, gradient accumulation,
checkpoints and resume, metrics, progress, SIGTERM and NaN handling.

Train state is a plain dict `{params, rest, opt_state, step}`: `params` are the trainable
variables (`nnx.split(model, task.trainable, ...)`), the only ones the optimiser and the gradient
see; `rest` is everything else (frozen backbone, fixed position embeddings, normalisation
statistics), carried through the step unchanged unless the model updates it.
Randomness in a step is `fold_in(rng, step)` (and `fold_in(., microbatch)`): a resumed run
draws the same masks as an uninterrupted one. Batches come from `batches(start_step)`, an
iterator of this process's rows of each global batch as NumPy dicts, starting at `start_step`.
"""

from __future__ import annotations

import copy
import dataclasses
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from data_pipelines.atomic import atomic_write_text
from demmae_jax import checkpoints, sharding as shd, workdirs
from demmae_jax.train import memory, optim, reporting
from demmae_jax.train.memory import DoesNotFit  # noqa: F401  (raised by train, with NonFiniteLoss)

Batch = dict[str, np.ndarray]
BatchSource = Callable[[int], Iterator[Batch]]


class Task:
  """Subclass and override. Everything a run needs to know about the model and its loss."""

  trainable: Any = nnx.Param  # nnx filter of the variables the optimiser updates
  best_metric: str | None = None  # eval metric whose best checkpoint is kept
  best_mode: str = "max"
  jit_init: bool = True  # False when build_model reads weights from files
  # True: `loss_fn`'s rng is one key per row of its (micro-)batch, key j = fold_in(step key,
  # global row j), so an example draws the same randomness however the batch is split.
  per_example_rng: bool = False
  # The loss is a mean over examples whose randomness does not depend on the split (see above),
  # so micro-batches of equal size give the full batch's loss and gradient: the memory plan may
  # then split the batch by itself (demmae_jax/train/memory.py).
  accumulation_exact: bool = True
  remat: bool | None = None  # whether the model's blocks are rematerialised (None: no switch)
  remat_flag: str | None = None  # the config key of that switch, for messages

  def with_remat(self, on: bool) -> Task | None:
    """This task with rematerialisation switched `on` or off: the same numbers, less memory, more
    compute. None when the model has no such switch."""
    return None

  def build_model(self) -> nnx.Module:
    raise NotImplementedError

  def loss_fn(
    self, model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss, metrics of scalars); pure and jittable; randomness only from `rng`."""
    raise NotImplementedError

  def layer_decay_depth(self) -> int | None:
    """Encoder depth for layer-wise lr decay (None: the model has no such structure)."""
    return None

  def evaluate(self, model: nnx.Module, step: int) -> dict[str, float]:
    """Called on every process every `eval_every_steps`; returns scalars (optional)."""
    return {}

  def picture_arrays(
    self, model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array
  ) -> dict[str, jax.Array]:
    """Arrays to draw (jitted by the loop, gathered to every host); {} for no pictures."""
    return {}

  def draw(self, arrays: dict[str, np.ndarray], step: int) -> dict[str, Any]:
    """{name: matplotlib figure} from `picture_arrays`' output; process 0 only."""
    return {}


class NonFiniteLoss(FloatingPointError):
  pass


@dataclasses.dataclass
class Result:
  state: dict
  step: int
  history: list[dict]
  preempted: bool = False


class Trainer:
  """Placement, optimiser and compiled step for one (task, config, mesh)."""

  def __init__(
    self,
    task: Task,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    *,
    grad_accum_steps: int | None = None,
  ):
    """`grad_accum_steps` replaces the config's (the memory plan's choice)."""
    self.task, self.config, self.mesh = task, config, mesh
    self.global_batch = int(config.global_batch)
    self.accum = self._check_accum(grad_accum_steps or int(config.get("grad_accum_steps", 1)))
    if task.jit_init:
      model, self._eager_model = nnx.eval_shape(task.build_model), None
    else:  # build_model reads files, which cannot be traced: build once, keep it for init_state
      model = self._eager_model = task.build_model()
    self.graphdef, params, rest = nnx.split(model, task.trainable, ...)
    if not jax.tree.leaves(params):
      raise ValueError("the task's `trainable` filter selects no variables: nothing to train")
    self.tx, self.schedule = optim.make(
      config.optim,
      params,
      total_steps=int(config.total_steps),
      global_batch=self.global_batch,
      depth=task.layer_decay_depth(),
    )
    abstract = {
      "params": params,
      "rest": rest,
      "opt_state": jax.eval_shape(self.tx.init, params),
      "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    rules = [tuple(r) for r in config.sharding.rules]
    self.state_shardings = shd.tree_shardings(
      abstract, mesh, rules, int(config.sharding.min_fsdp_size)
    )
    self.abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract,
      self.state_shardings,
    )
    self.rng = jax.random.key(int(config.seed))
    self._pictures = None

  def _check_accum(self, accum: int) -> int:
    par = shd.batch_parallelism(self.mesh)
    if accum < 1 or self.global_batch % (par * accum):
      raise ValueError(
        f"global_batch {self.global_batch} must be divisible by data x fsdp "
        f"({par}) x grad_accum_steps ({accum})"
      )
    return accum

  def with_accum(self, accum: int) -> Trainer:
    """This trainer (same task, placement and optimiser) with another number of micro-batches."""
    other = copy.copy(self)
    other.accum, other._pictures = other._check_accum(accum), None
    return other

  # ------------------------------------------------------------------ state
  def init_state(self) -> dict:
    """A fresh state, placed by the sharding rules. Built inside one jitted program (each device
    makes only its shards) unless the task reads weights from files (`jit_init = False`): the
    weights read are then placed by the rules, and the optimiser state is made by a jitted
    `tx.init` whose outputs are placed likewise (each device makes only its shards of it, never
    the whole state on one device)."""

    def init(model):
      _, params, rest = nnx.split(model, self.task.trainable, ...)
      return {
        "params": params,
        "rest": rest,
        "opt_state": self.tx.init(params),
        "step": jnp.zeros((), jnp.int32),
      }

    if self.task.jit_init:
      return jax.jit(lambda: init(self.task.build_model()), out_shardings=self.state_shardings)()
    model, self._eager_model = self._eager_model or self.task.build_model(), None
    _, params, rest = nnx.split(model, self.task.trainable, ...)
    del model
    sh = self.state_shardings
    params, rest = jax.device_put(params, sh["params"]), jax.device_put(rest, sh["rest"])
    return {
      "params": params,
      "rest": rest,
      "opt_state": jax.jit(self.tx.init, out_shardings=sh["opt_state"])(params),
      "step": jax.device_put(jnp.zeros((), jnp.int32), sh["step"]),
    }

  def model(self, state: dict) -> nnx.Module:
    return nnx.merge(self.graphdef, state["params"], state["rest"])

  # ------------------------------------------------------------------ step
  def train_step(self, state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
    """One optimiser step on one global batch (pure; jitted by `compile`)."""
    step_rng = jax.random.fold_in(rng, state["step"])
    if self.task.per_example_rng:  # travels with its row through the micro-batch split below
      batch = {
        **batch,
        "_rng": jax.lax.with_sharding_constraint(
          jax.vmap(jax.random.fold_in, (None, 0))(step_rng, jnp.arange(self.global_batch)),
          NamedSharding(self.mesh, P(shd.BATCH_AXES)),
        ),
      }

    def key_for(micro, i):
      return micro.pop("_rng") if self.task.per_example_rng else jax.random.fold_in(step_rng, i)

    def grads_on(params, rest, micro, key):
      def loss_of(p):
        model = nnx.merge(self.graphdef, p, rest)
        loss, aux = self.task.loss_fn(model, micro, key)
        _, _, new_rest = nnx.split(model, self.task.trainable, ...)
        return loss, (aux, new_rest)

      (loss, (aux, new_rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
      return loss, aux, new_rest, grads

    if self.accum == 1:
      batch = dict(batch)
      key = batch.pop("_rng") if self.task.per_example_rng else step_rng
      loss, aux, rest, grads = grads_on(state["params"], state["rest"], batch, key)
    else:
      # Micro-batch i takes rows i, i + accum, ...: each device splits its own rows, so the
      # reshape moves no data between devices.
      micro = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(
          x.reshape(-1, self.accum, *x.shape[1:]).swapaxes(0, 1),
          NamedSharding(self.mesh, P(None, shd.BATCH_AXES, *[None] * (x.ndim - 1))),
        ),
        batch,
      )

      def body(carry, xs):
        rest, gsum, lsum, asum = carry
        i, mb = xs
        mb = dict(mb)
        loss, aux, rest, grads = grads_on(state["params"], rest, mb, key_for(mb, i))
        add = lambda a, b: jax.tree.map(jnp.add, a, b)
        return (rest, add(gsum, grads), lsum + loss, add(asum, aux)), None

      zeros = jax.tree.map(jnp.zeros_like, state["params"])

      def first_micro():
        mb = jax.tree.map(lambda x: x[0], micro)
        return grads_on(state["params"], state["rest"], mb, key_for(mb, 0))[1]

      first_aux = jax.eval_shape(first_micro)
      aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first_aux)
      (rest, grads, loss, aux), _ = jax.lax.scan(
        body,
        (state["rest"], zeros, jnp.zeros((), jnp.float32), aux0),
        (jnp.arange(self.accum), micro),
      )
      scale = 1.0 / self.accum
      grads = jax.tree.map(lambda g: g * scale, grads)
      loss, aux = loss * scale, jax.tree.map(lambda a: a * scale, aux)

    grad_norm = optim.global_norm(grads)
    # A non-finite loss or gradient leaves the state as it was; the host stops the run. A cond
    # rather than a select: the update runs only when it is kept, and no pass over the old and
    # new state picks between them (9 % of the MAE-B step on CPU, docs/performance.md).
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update():
      updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
      return optax.apply_updates(state["params"], updates), rest, opt_state

    def keep():
      return state["params"], state["rest"], state["opt_state"]

    params, rest, opt_state = jax.lax.cond(ok, update, keep)
    new_state = {"params": params, "rest": rest, "opt_state": opt_state, "step": state["step"] + 1}
    out = {
      "loss": loss,
      "grad_norm": grad_norm,
      "lr": self.schedule(state["step"]),
      "finite": ok,
      **aux,
    }
    return new_state, out

  def jitted_step(self, batch_example: dict):
    batch_shardings = {
      k: shd.batch_sharding(self.mesh, np.ndim(v)) for k, v in batch_example.items()
    }

    def step(state, batch, rng):
      # The mesh in context while tracing: the model's activation constraints for the 'model'
      # axis read it (demmae_jax/models/partitioning.py).
      with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
        return self.train_step(state, batch, rng)

    return jax.jit(
      step,
      in_shardings=(self.state_shardings, batch_shardings, shd.replicated(self.mesh)),
      out_shardings=(self.state_shardings, shd.replicated(self.mesh)),
      donate_argnums=(0,),
    )

  def trace(self, batch_example: dict):
    """The step traced for batches shaped like `batch_example` (arrays or ShapeDtypeStructs;
    only the trailing dimensions count, the leading one is the global batch): `.jaxpr` to count
    FLOPs, `.lower().compile()` to run."""
    abstract_batch = {
      k: jax.ShapeDtypeStruct((self.global_batch,) + tuple(np.shape(v)[1:]), v.dtype)
      for k, v in batch_example.items()
    }
    return self.jitted_step(batch_example).trace(self.abstract_state, abstract_batch, self.rng)

  def compile(self, batch_example: dict):
    """Ahead-of-time compile for batches shaped like `batch_example` (see `trace`)."""
    return self.trace(batch_example).lower().compile()

  # ------------------------------------------------------------------ pictures
  def pictures(self, state: dict, batch: dict, step: int) -> dict[str, Any]:
    if self._pictures is None:
      self._pictures = jax.jit(
        lambda s, b, r: self.task.picture_arrays(self.model(s), b, r),
        out_shardings=shd.replicated(self.mesh),
      )
    arrays = self._pictures(state, batch, jax.random.fold_in(self.rng, step))
    if not arrays or jax.process_index() != 0:
      return {}
    return self.task.draw(jax.device_get(arrays), step)


def train(
  task: Task,
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  batches: BatchSource,
  *,
  mesh: jax.sharding.Mesh | None = None,
  stop_after: int | None = None,
  workdir_files: dict[str, str] | None = None,
) -> Result:
  """Train `task` to `config.total_steps` in `workdir`, resuming from its latest checkpoint.
  `stop_after` ends the run early after that many steps in this call (tests, demos).
  Nothing is written before the config has validated (the Trainer is built first): a config that
  fails leaves the workdir as it was, so its corrected rerun is not refused as another config.
  `workdir_files` ({name: text}) are written then too, beside config.json."""
  workdir = Path(workdir)
  mesh = mesh or shd.make_mesh(**config.mesh)
  trainer = Trainer(task, config, mesh)
  workdirs.check_or_store_config(workdir, config)
  if jax.process_index() == 0:
    for name, text in (workdir_files or {}).items():
      atomic_write_text(workdir / name, text, overwrite=True)
  total = int(config.total_steps)
  ckpt = workdirs.Checkpointer(
    workdir / "checkpoints",
    keep=int(config.checkpoint.keep),
    best_metric=task.best_metric,
    best_mode=task.best_mode,
    async_save=bool(config.checkpoint.get("async_save", True)),
  )
  is_main = jax.process_index() == 0
  rows = shd.process_batch_rows(mesh, trainer.global_batch)
  # ---------------------------------------------------------------- memory plan, then state
  # Planned before the state exists: on CPU the available host memory is then what the step
  # itself may take. The plan compiles the step that runs (memory.py).
  start = ckpt.latest_step()
  if start is not None:
    _check_stacked_layout(ckpt, start, workdir)
  if start is not None and start >= total:
    trainer._eager_model = None
    state, _ = ckpt.restore(start, trainer.abstract_state)
    ckpt.close()
    return Result(state, start, [])
  # The writer first: its imports (tensorboardX, ~150 MiB of RSS) are then in the host memory
  # the plan sees as taken.
  writer = reporting.MetricWriter(
    workdir, resume_step=start or 0, tensorboard=bool(config.log.get("tensorboard", True))
  )
  try:
    source = iter(batches(start or 0))
    first = next(source)
    _check_local_batch(first, rows)
    plan = memory.plan(trainer, first, workdir, log=memory.echo if is_main else None)
  except BaseException:
    writer.close()
    ckpt.close()
    raise
  memory.write_plan(workdir, plan, config, mesh)
  trainer, traced, step_fn = plan.trainer, plan.trial.traced, plan.trial.compiled
  if start is None:
    state, start = trainer.init_state(), 0
  else:
    trainer._eager_model = None  # the checkpoint replaces any initial weights
    state, meta = ckpt.restore(start, trainer.abstract_state)
    if meta["global_batch"] != trainer.global_batch:
      raise ValueError(f"checkpoint {start} was made with global batch {meta['global_batch']}")
  history: list[dict] = []

  # ---------------------------------------------------------------- SIGTERM: save and exit
  stop = {"signal": None}
  previous = {}
  try:
    previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda s, _f: stop.update(signal=s))
  except ValueError:  # not the main thread: no handler
    pass

  flops_per_step = reporting.jaxpr_flops(traced.jaxpr)  # global: the jaxpr is the whole batch
  peak, peak_note = reporting.peak_flops_per_device()
  peak_total = peak * jax.device_count()
  if is_main:
    print(
      f"train: {total} steps of {trainer.global_batch} on mesh {dict(mesh.shape)}, "
      f"resuming at {start}; {flops_per_step / 1e9:.2f} GFLOP/step; peak {peak_note}",
      flush=True,
    )

  log_every = int(config.log.every_steps)
  pic_every = int(config.log.get("picture_every_steps", 0) or 0)
  ckpt_every = int(config.checkpoint.every_steps)
  eval_every = int(config.get("eval_every_steps", 0) or 0)
  pending: list[tuple[int, dict]] = []
  progress = _progress(total, start, is_main and config.log.get("progress", True))
  # Input wait: host seconds blocked in `next(source)` since the last flush. The interval's wall
  # time ends in a sync (flush fetches every pending step), so wait / interval is the share of
  # the step time the loop spent waiting on input, with no per-step sync. An upper bound on the
  # device's idle time: a wait shorter than the steps still in flight (<= 2) hides behind them.
  t_last, steps_since, waited = time.perf_counter(), 0, 0.0

  def flush(step: int, extra: dict | None = None) -> dict:
    """Fetch pending step metrics (a sync), stop on non-finite loss, log the interval mean."""
    nonlocal t_last, steps_since, pending, waited
    fetched = jax.device_get([m for _, m in pending])
    steps = [s for s, _ in pending]
    pending = []
    for s, m in zip(steps, fetched):
      if not bool(m["finite"]):
        raise NonFiniteLoss(
          f"loss or gradient became non-finite at step {s + 1} (loss={float(m['loss'])}, "
          f"grad_norm={float(m['grad_norm'])}); stopping. The last good checkpoint is step "
          f"{ckpt.latest_step()} in {workdir / 'checkpoints'} (the state was not updated by "
          f"the bad step). Lower the lr, enable clip_grad_norm, or check the input for NaN."
        )
    now = time.perf_counter()
    row = {}
    if fetched:
      row = {
        k: float(np.mean([np.asarray(m[k], np.float64) for m in fetched]))
        for k in fetched[-1]
        if k != "finite"
      }
      row["lr"] = float(fetched[-1]["lr"])
      dt = now - t_last
      row["images_per_s"] = steps_since * trainer.global_batch / dt
      row["flops_per_s"] = steps_since * flops_per_step / dt
      row["mfu"] = row["flops_per_s"] / peak_total
      row["peak_memory_gib"] = memory.measured_peak() / 2**30  # against the plan's prediction
      row["step_ms"] = 1e3 * dt / steps_since
      row["input_wait_ms"] = 1e3 * waited / steps_since
      row["input_wait_fraction"] = waited / dt
    row.update(extra or {})
    if row:
      writer.write(step, row)
      history.append({"step": step, **row})
      if progress is not None and "loss" in row:
        progress.set_postfix(
          loss=f"{row.get('loss', float('nan')):.4g}", img_s=f"{row.get('images_per_s', 0):.1f}"
        )
    t_last, steps_since, waited = now, 0, 0.0
    return row

  def save(step: int, metrics: dict | None = None) -> None:
    ckpt.save(
      step,
      state,
      {
        "step": step,
        "global_batch": trainer.global_batch,
        "seed": int(config.seed),
        "batches_consumed": step,
      },
      metrics,
    )

  # ---------------------------------------------------------------- loop
  step = start
  preempted = False
  batch_local = first
  try:
    while step < total:
      batch = shd.global_batch(batch_local, mesh, trainer.global_batch)
      state, m = step_fn(state, batch, trainer.rng)
      step += 1
      steps_since += 1
      pending.append((step - 1, m))
      if len(pending) > 2:  # at most two steps in flight: bounded memory, honest progress
        jax.block_until_ready(pending[-3][1]["loss"])
      if progress is not None:
        progress.update(1)
      eval_row = None
      if eval_every and step % eval_every == 0:
        flush(step)
        eval_row = {f"eval_{k}": v for k, v in task.evaluate(trainer.model(state), step).items()}
        flush(step, eval_row)
      elif step % log_every == 0 or step == total or step == start + 1:  # a first loss at once
        flush(step)
      if pic_every and step % pic_every == 0:
        for name, fig in trainer.pictures(state, batch, step).items():
          reporting.save_figure(fig, workdir / "pictures" / f"{name}_step{step:07d}.png")
      done_here = stop_after is not None and step - start >= stop_after
      if stop["signal"] is not None or step % ckpt_every == 0 or step == total or done_here:
        if pending:
          flush(step)
        save(step, {k[5:]: v for k, v in eval_row.items()} if eval_row else None)
      if stop["signal"] is not None:
        preempted = True
        if is_main:
          print(
            f"train: signal {stop['signal']} received; saved step {step} and stopped", flush=True
          )
        break
      if done_here or step >= total:
        break
      t_wait = time.perf_counter()
      batch_local = next(source)
      waited += time.perf_counter() - t_wait
      _check_local_batch(batch_local, rows)
  finally:
    if progress is not None:
      progress.close()
    ckpt.close()
    writer.close()
    if is_main and pic_every and history:
      keys = ["loss"] + sorted(
        {k for h in history for k in h if k.startswith("eval_") and "loss" in k}
      )
      reporting.plot_history(writer.path, workdir / "pictures" / "loss.png", tuple(keys))
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  return Result(state, step, history, preempted)


def _check_stacked_layout(ckpt: workdirs.Checkpointer, step: int, workdir: Path) -> None:
  """A run saved before the transformer blocks were stacked (one array per block) cannot be
  resumed: its optimiser state is per block too. Its weights still load (export, evaluation,
  prediction stack them), so the message says how to continue from them."""
  old = sorted({p for p in ckpt.variable_shapes(step) if checkpoints.is_per_layer(p)})
  if old:
    raise ValueError(
      f"{workdir}: checkpoint step {step} stores the transformer blocks one array per block "
      f"(e.g. {old[0]}), as runs did before the blocks were stacked; it cannot be resumed. "
      f"Its weights load as they are: export them (demmae export --workdir {workdir} --out DIR) "
      f"and start a new run from DIR (--config.init=DIR), or evaluate / predict with it"
    )


def _check_local_batch(batch: Batch, rows: tuple[int, int]) -> None:
  n = rows[1] - rows[0]
  for k, v in batch.items():
    if np.shape(v)[0] != n:
      raise ValueError(
        f"batch[{k!r}] has {np.shape(v)[0]} rows; this process feeds rows "
        f"{rows[0]}:{rows[1]} of the global batch ({n} rows)"
      )


def _progress(total: int, start: int, enabled: bool):
  if not enabled:
    return None
  from tqdm import tqdm

  return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
