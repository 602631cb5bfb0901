"""A run's workdir: orbax checkpoints of the train state in `workdir/checkpoints`, and the
workdir's identity (training writes them; export, evaluation and prediction read them).

One CheckpointManager keeps the last `keep` steps and, when the task has an eval metric, the best
one (orbax preservation policies); saves are asynchronous and atomic (orbax writes a temporary
directory and renames it), so a run killed mid-save leaves the previous checkpoints intact.
The workdir stores the config it was made for (`config.json`); a different config is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from data_pipelines.atomic import atomic_write_text, check_outputs, sweep_stale
from data_pipelines.errors import DataError

CONFIG_FILE = "config.json"


class _QuietMissingMetrics(logging.Filter):
  """Checkpoints between evaluations carry no metric by design; orbax warns at each one."""

  def filter(self, record):
    return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietMissingMetrics())


class WorkdirConfigMismatch(ValueError):
  pass


def unreadable(step_dir: Path, e: BaseException) -> DataError:
  """The error for a checkpoint orbax cannot read: its folder, the cause in brief, what to do."""
  root = e  # tensorstore's useful message ("byte range ... not valid") is the innermost cause
  while (root.__cause__ or root.__context__) is not None:
    root = root.__cause__ or root.__context__
  first = " ".join(str(root).split())[:300]
  return DataError(
    step_dir,
    f"checkpoint cannot be read: damaged or truncated "
    f"({root.__class__.__name__}: {first}). Restore it from a copy, or delete this "
    f"step's folder to use the previous checkpoint",
  )


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


# Config keys added after workdirs existed, with the value that reproduces the behaviour from
# before the key: a stored config without the key holds that value, so older runs still resume.
ADDED_KEYS = {"model.norm_pix_eps": 1.0e-6, "data.coarsen": 0.0}


def _with_added_keys(old: dict, new: dict) -> dict:
  old = json.loads(json.dumps(old))
  for dotted, value in ADDED_KEYS.items():
    *parents, leaf = dotted.split(".")
    o, n = old, new
    for p in parents:
      o, n = o.get(p), n.get(p) if isinstance(n, dict) else None
      if not isinstance(o, dict) or not isinstance(n, dict):
        break
    else:
      if leaf not in o and leaf in n:
        o[leaf] = value
  return old


# Keys a restart may change. "preset" is only the name of the values that follow: presets get
# renamed (dem_pretrain's raster `cpu` became `cpu_rasters`, `cpu_tiles` became `cpu`), and a run
# resumes under the new name of the same values, while the old name with new values is refused.
IGNORED = ("log", "distributed", "memory", "preset")


def check_config(
  workdir: Path,
  config: ml_collections.ConfigDict,
  ignore: tuple[str, ...] = IGNORED,
) -> bool:
  """Refuse a workdir that holds a run of a different config (keys in `ignore`, e.g. logging
  frequencies, may change between restarts), or that cannot be written. Writes nothing; True if
  the workdir has a config."""
  path = Path(workdir) / CONFIG_FILE
  check_outputs([path], [])
  if not path.exists():
    return False
  new = json.loads(config_to_json(config))
  old = _with_added_keys(json.loads(path.read_text()), new)
  diff = _diff(
    {k: v for k, v in old.items() if k not in ignore},
    {k: v for k, v in new.items() if k not in ignore},
  )
  if diff:
    raise WorkdirConfigMismatch(
      f"{workdir} holds a run of another configuration ({path}); differing keys: "
      + "; ".join(diff[:10])
      + ". Use a new --workdir, or the same config to resume."
    )
  return True


def check_or_store_config(
  workdir: Path,
  config: ml_collections.ConfigDict,
  ignore: tuple[str, ...] = IGNORED,
) -> None:
  """Store the config in a fresh workdir; in an existing one, refuse a different config (keys in
  `ignore`, e.g. logging frequencies or the memory limit to plan for, may change). Call it
  only once the config has been validated (a stored config makes the workdir that config's).
  Also removes the temporaries a killed run left in the workdir."""
  if check_config(workdir, config, ignore):
    sweep_stale(workdir)
    return
  workdir.mkdir(parents=True, exist_ok=True)
  sweep_stale(workdir)
  if jax.process_index() == 0:
    atomic_write_text(workdir / CONFIG_FILE, config_to_json(config), overwrite=True)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      if k not in a or k not in b:
        out.append(
          f"{prefix}{k}: {'missing' if k not in a else a[k]!r} -> "
          f"{'missing' if k not in b else b[k]!r}"
        )
      else:
        out += _diff(a[k], b[k], f"{prefix}{k}.")
    return out
  return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


class Checkpointer:
  """`save(step, state, meta, metrics)`, `latest_step()`, `restore(step, abstract_state)`."""

  def __init__(
    self,
    directory: Path,
    *,
    keep: int = 3,
    best_metric: str | None = None,
    best_mode: str = "max",
    async_save: bool = True,
  ):
    self.best_metric, self.best_mode = best_metric, best_mode
    policy = [policies.LatestN(n=keep)]
    if best_metric:
      policy.append(
        policies.BestN(
          get_metric_fn=lambda m: m[best_metric],
          reverse=best_mode == "min",
          n=1,
          keep_checkpoints_without_metrics=False,
        )
      )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(policy),
      # best_fn makes orbax record the metrics; which steps stay is the policy's choice.
      best_fn=(lambda m: m[best_metric]) if best_metric else None,
      best_mode=best_mode,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
    )
    self.manager = ocp.CheckpointManager(
      Path(directory).absolute(), options=options, item_names=("state", "meta")
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the best `best_metric` (None: no metric, or none recorded)."""
    if not self.best_metric:
      return None
    scored = [
      (m[self.best_metric], s)
      for s in self.manager.all_steps()
      if (m := self.manager.metrics(s)) and self.best_metric in m
    ]
    if not scored:
      return None
    sign = 1 if self.best_mode == "max" else -1
    return max(scored, key=lambda vs: (sign * vs[0], vs[1]))[1]

  def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
    metrics = (
      {self.best_metric: float(metrics[self.best_metric])}
      if self.best_metric and metrics and self.best_metric in metrics
      else None
    )
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      metrics=metrics,
      force=True,
    )

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """The state at `step` placed as `abstract_state` (ShapeDtypeStructs with shardings) says.
    A damaged or truncated checkpoint is a DataError naming its folder."""
    try:
      out = self.manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        ),
      )
    except Exception as e:  # orbax/tensorstore raise many types for a damaged file
      raise unreadable(self.step_dir(step), e) from e
    return out["state"], out["meta"]

  def variable_shapes(self, step: int) -> dict[str, tuple]:
    """{"params/<path>" or "rest/<path>": shape} of the model variables saved at `step`, read from
    the checkpoint's metadata (no array is loaded)."""
    try:
      # The handler reads the item's own metadata; a standalone Checkpointer would also look for
      # the step's _CHECKPOINT_METADATA inside the item folder and warn that it is missing.
      saved = ocp.StandardCheckpointHandler().metadata(self.step_dir(step) / "state")
      tree = getattr(saved, "tree", saved)
      flat = jax.tree_util.tree_flatten_with_path(
        {k: tree[k] for k in ("params", "rest")}, is_leaf=lambda x: hasattr(x, "shape")
      )[0]
    except Exception as e:  # a truncated _METADATA reads as None, or fails in orbax
      raise unreadable(self.step_dir(step), e) from e
    from demmae_jax.sharding import path_str

    return {
      path_str(p).removesuffix("/value"): tuple(x.shape) for p, x in flat if hasattr(x, "shape")
    }

  def restore_variables(self, step: int, target: dict) -> dict:
    """The `params` and `rest` of the state at `step` as `target` ({"params": ..., "rest": ...}
    of ShapeDtypeStructs with shardings) says, without reading the optimiser state."""
    try:
      out = self.manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
          )
        ),
      )
    except Exception as e:  # orbax/tensorstore raise many types for a damaged file
      raise unreadable(self.step_dir(step), e) from e
    return out["state"]

  def step_dir(self, step: int) -> Path:
    return Path(self.manager.directory) / str(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
