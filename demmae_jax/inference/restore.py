"""A trained model out of its workdir: the one way weights are read from a training run's
checkpoints (export, evaluation, prediction). Only the model's variables are read (the train
state's `params` and `rest`), never the optimiser state, and they are checked by name and shape
against the model first, so a checkpoint of another model is an error naming every difference.
Checkpoints made before the transformer blocks were stacked (one array per block,
`backbone/blocks/3/attn/qkv/kernel`) are read per block and stacked as the model stores them.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from demmae_jax import sharding, workdirs
from demmae_jax.checkpoints import compare_shapes, layer_groups, stacked_shapes
from demmae_jax.inference.segmenter import SPEC_FILE, build_from_spec, read_spec

Step = int | str  # a step number, "latest", or "best"


def restore(
  model: nnx.Module,
  workdir: str | Path,
  step: Step = "latest",
  *,
  best_metric: str | None = None,
  best_mode: str = "max",
  what: str = "the model",
) -> tuple[nnx.Module, int]:
  """(`model` with the variables of `workdir`'s checkpoint at `step`, that step). `model` may be
  abstract (`nnx.eval_shape`): only its structure is used. "best" is the best by `best_metric`
  (the latest when no metric was recorded). The arrays are replicated over all devices."""
  workdir = Path(workdir)
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory} not found: {workdir} is not a training workdir")
  ckpt = workdirs.Checkpointer(
    directory, best_metric=best_metric, best_mode=best_mode, async_save=False
  )
  try:
    steps = ckpt.manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"{directory} holds no checkpoint")
    if step == "best":
      step = ckpt.best_step() or ckpt.latest_step()
    elif step == "latest":
      step = ckpt.latest_step()
    if step not in steps:
      raise FileNotFoundError(
        f"no checkpoint of step {step} in {directory}; there are {sorted(steps)}"
      )
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
    want = {sharding.path_str(p): x for p, x in leaves}
    # {"params/<path>" or "rest/<path>": shape}: the trainable ones and the others, as trained
    group, saved = {}, {}
    for key, shape in ckpt.variable_shapes(step).items():
      name, path = key.split("/", 1)
      group[path], saved[path] = name, shape
    # Blocks saved one array per layer: compared, and later stacked, as the model holds them.
    per_layer = {k: v for k, v in layer_groups(saved, str(workdir)).items() if k in want}
    diff = compare_shapes(
      stacked_shapes(saved, str(workdir)), {k: x.shape for k, x in want.items()}
    )
    if diff:
      raise ValueError(
        "\n".join(
          [f"{workdir}: checkpoint step {step} does not fit {what}; variable paths:"]
          + diff.lines("checkpoint")
        )
      )
    replicated = sharding.replicated(sharding.make_mesh(data=-1))
    target: dict = {"params": {}, "rest": {}}
    for path, x in want.items():
      for p in per_layer.get(path, [path]):
        _put(
          target[group[p]],
          p.split("/") + ["value"],
          jax.ShapeDtypeStruct(saved[p] if p != path else x.shape, x.dtype, sharding=replicated),
        )
    restored = ckpt.restore_variables(step, target)
  finally:
    ckpt.close()
  values = {}
  for name in ("params", "rest"):
    values.update(
      {
        sharding.path_str(p).removesuffix("/value"): x
        for p, x in jax.tree_util.tree_flatten_with_path(restored[name])[0]
      }
    )
  for path, layers in per_layer.items():
    values[path] = jnp.stack([values.pop(p) for p in layers])
  nnx.replace_by_pure_dict(
    state, jax.tree_util.tree_unflatten(treedef, [values[sharding.path_str(p)] for p, _ in leaves])
  )
  return nnx.merge(graphdef, state), int(step)


def load_trained(workdir: str | Path, step: Step = "best") -> tuple[nnx.Module, dict, int]:
  """(model, spec, step) from a finetuning workdir: the best validation checkpoint (or the
  latest when no evaluation ran), "latest", or a step number. A checkpoint whose arrays do not
  fit the model the spec describes (another head, class count or backbone) is a clear error."""
  spec = read_spec(workdir)
  model = nnx.eval_shape(lambda: build_from_spec(spec))
  what = (
    f"the model in {SPEC_FILE} ({spec['kind']}, {spec['num_classes']} classes "
    f"{spec['class_names']})"
  )
  model, step = restore(model, workdir, step, best_metric="iou", what=what)
  return model, spec, step


def _put(tree: dict, keys: list[str], value) -> None:
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value
