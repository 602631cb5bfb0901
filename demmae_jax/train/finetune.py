"""Segmentation finetuning (UperNet on a frozen MAE encoder, or the UNet baseline) as a `Task` of
the one training loop (`demmae_jax.train.loop`): same mesh, sharding, checkpoints and resume as
pretraining.

Frozen backbone: the task's `trainable` filter leaves the encoder out, so its parameters sit in
the loop's `rest` (outside the optimiser, no optimiser state) and the Segmenter wraps its features
in stop_gradient (no backward pass through it). Unfrozen (`freeze_backbone=False`), the encoder
trains with layer-wise lr decay (`optim.layer_decay`, e.g. 0.65). Frozen, `cache_features=True`
computes the encoder's maps of every training tile and symmetry once
(`demmae_jax.train.feature_cache`) and trains the head on them; checkpoints, evaluation and
prediction are the same as without.

Loss: pixel cross-entropy weighted per class (the manifest's inverse-frequency weights), over
pixels that are labelled (label != 255) and valid, plus 0.4 x the auxiliary FCN head's loss.

The workdir also gets `segmenter.json` (`model_spec`): everything `demmae_jax.inference` needs to
rebuild the model and feed it, so evaluation and prediction need only the workdir.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from demmae_jax import metrics, workdirs
from demmae_jax.inference.evaluate import confusion
from demmae_jax.inference.segmenter import (
  SPEC_FILE,
  build_from_spec,
  check_spec_against_data,
  reader_options,
)
from demmae_jax.models import hybrid as hybrid_model, mae as mae_model, upernet
from demmae_jax.train import feature_cache
from demmae_jax.train.loop import Task


# ------------------------------------------------------------------------------ model spec
def model_spec(
  config: ml_collections.ConfigDict, manifest: dict, backbone: mae_model.MAEConfig | None
) -> dict:
  """The JSON description of the model and its input, stored beside the checkpoints."""
  names = manifest.get("label_names") or {}
  class_names = [names.get(str(i), str(i)) for i in range(int(config.num_classes))]
  n = config.data.normalisation
  return {
    "kind": config.model.kind,
    "num_classes": int(config.num_classes),
    "class_names": class_names,
    "backbone": dataclasses.asdict(backbone) if backbone is not None else None,
    "freeze_backbone": bool(config.freeze_backbone),
    "head": dataclasses.asdict(head_config(config)) if config.model.kind == "upernet" else None,
    "unet": dict(config.model.unet) if config.model.kind == "unet" else None,
    "hybrid": dataclasses.asdict(hybrid_config(config)) if config.model.kind == "hybrid" else None,
    "tile_size": int(manifest["tile_size"]),
    "cell_size": float(manifest["cell_size"]),
    "normalisation": {
      "mode": n.mode,
      "channels": int(n.channels),
      "scale_m": float(n.scale_m),
      "low_percentile": float(n.low_percentile),
      "stats": manifest["stats"]["elevation"] if n.mode == "zscore" else None,
    },
  }


def head_config(config: ml_collections.ConfigDict) -> upernet.HeadConfig:
  h = config.model.head
  return upernet.HeadConfig(
    num_classes=int(config.num_classes),
    layers=tuple(h.layers),
    channels=int(h.channels),
    pool_scales=tuple(h.pool_scales),
    dropout=float(h.dropout),
    aux_channels=int(h.aux_channels),
    aux_index=int(h.aux_index),
  )


def hybrid_config(config: ml_collections.ConfigDict) -> hybrid_model.HybridConfig:
  h = config.model.hybrid
  return hybrid_model.HybridConfig(
    num_classes=int(config.num_classes),
    layers=tuple(h.layers),
    width=int(h.width),
    vit_channels=int(h.vit_channels),
  )


# ------------------------------------------------------------------------------ loss
def weighted_cross_entropy(
  logits: jax.Array, label: jax.Array, valid: jax.Array, class_weights: jax.Array
) -> jax.Array:
  """Mean over counted pixels of w[label] x CE, normalised by the summed weights (torch's
  CrossEntropyLoss(weight=w, ignore_index=255)); pixels with label 255 or valid 0 do not count."""
  keep = (label != metrics.IGNORE_INDEX) & (valid > 0)
  y = jnp.where(keep, label, 0)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ce = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
  w = class_weights[y] * keep
  return (ce * w).sum() / jnp.maximum(w.sum(), 1e-6)


class Finetune(Task):
  """`spec` as `model_spec`; `class_weights` [K]; `eval_batches()` a fresh finite iterator of
  validation batches (or None); `backbone_state` the pretrained encoder (None: random, the
  "random frozen" control arm, or when the state comes from a checkpoint)."""

  best_mode = "max"
  # The weighted cross-entropy is normalised by the batch's summed weights (not a mean over
  # examples) and dropout draws per micro-batch: the memory plan does not split the batch itself.
  accumulation_exact = False

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    spec: dict,
    class_weights,
    eval_batches: Callable[[], Iterator[dict]] | None = None,
    backbone_state=None,
  ):
    self.config, self.spec = config, spec
    self.class_weights = np.asarray(class_weights, np.float32)
    if self.class_weights.shape != (spec["num_classes"],):
      raise ValueError(
        f"class_weights {self.class_weights.tolist()} do not match {spec['num_classes']} classes"
      )
    self.aux_weight = (
      float(config.model.head.aux_weight)
      if spec["kind"] == "upernet" and spec["head"]["aux_channels"]
      else 0.0
    )
    self.eval_batches = eval_batches
    self.best_metric = "iou" if eval_batches is not None else None
    self.backbone_state = backbone_state
    self._eval_step = None
    model = nnx.eval_shape(lambda: build_from_spec(spec))
    self.trainable = upernet.trainable_filter(model)

  def build_model(self):
    return build_from_spec(self.spec, int(self.config.seed), self.backbone_state)

  def layer_decay_depth(self):
    # Frozen, only head parameters reach the optimiser and their layer scale is 1.
    return self.spec["backbone"]["depth"] if self.spec["backbone"] else None

  def loss_fn(self, model, batch, rng):
    """`batch` holds images, or the cached encoder maps (`feature_cache.FEATURE_KEYS`)."""
    weights = jnp.asarray(self.class_weights)
    if "image" in batch:
      forward = lambda **kw: model(batch["image"], **kw)
    else:
      forward = lambda **kw: model.head([batch[k] for k in feature_cache.FEATURE_KEYS], **kw)
    if self.aux_weight:
      logits, aux = forward(dropout_key=rng, with_aux=True)
      aux_loss = weighted_cross_entropy(aux, batch["label"], batch["valid"], weights)
    else:
      logits, aux_loss = forward(dropout_key=rng), 0.0
    main = weighted_cross_entropy(logits, batch["label"], batch["valid"], weights)
    cm = metrics.confusion_matrix(
      logits.argmax(-1), batch["label"], self.spec["num_classes"], batch["valid"]
    )
    return main + self.aux_weight * aux_loss, {
      "main_loss": main,
      "pixel_acc": jnp.trace(cm) / jnp.maximum(cm.sum(), 1),
    }

  def evaluate(self, model, step):
    if self.eval_batches is None:
      return {}
    cm, _ = confusion(model, self.eval_batches(), self.spec["num_classes"])
    s = metrics.summarize(cm)
    return {
      "iou": float("nan") if s["iou"] is None else s["iou"],
      "miou": float("nan") if s["miou"] is None else s["miou"],
      "accuracy": s["accuracy"],
    }


# ------------------------------------------------------------------------------ a run
def class_weights(config: ml_collections.ConfigDict, manifest: dict) -> np.ndarray:
  k = int(config.num_classes)
  if config.class_weights == "none":
    return np.ones(k, np.float32)
  if config.class_weights != "manifest":
    raise ValueError(f"class_weights must be 'manifest' or 'none', got {config.class_weights!r}")
  found = manifest["splits"]["train"].get("classes", {}).get("weights", {})
  missing = [i for i in range(k) if str(i) not in found]
  if missing:
    raise ValueError(
      f"{manifest.get('_dir')}: the manifest has no class weight for classes "
      f"{missing} (training labels hold {sorted(found)}); use class_weights='none'"
    )
  return np.array([found[str(i)] for i in range(k)], np.float32)


def _backbone(config: ml_collections.ConfigDict, tile: int, channels: int):
  """(MAEConfig, loaded nnx.State or None): the pretrained encoder at the tile size, or a random
  one of the configured architecture."""
  if config.model.kind not in ("upernet", "hybrid"):
    return None, None
  if config.init:
    from demmae_jax import api  # the checkpoint reader: our exports, official and HF files

    model = api.from_pretrained(
      config.init,
      encoder_only=True,
      img_size=tile,
      in_chans=channels,
      channel_adapt=config.channel_adapt or None,
      seed=int(config.seed),
    )
    return model.config, nnx.state(model)
  from demmae_jax.train.pretrain import model_config

  return model_config(config.model.backbone).replace(img_size=tile, in_chans=channels), None


def check_cache_features(config: ml_collections.ConfigDict) -> None:
  if not config.cache_features:
    return
  if config.model.kind != "upernet":
    raise ValueError(
      f"cache_features=True caches a ViT encoder's features, but model.kind="
      f"{config.model.kind!r} has no encoder; set cache_features=False"
    )
  if not config.freeze_backbone:
    raise ValueError(
      "cache_features=True needs freeze_backbone=True: a trained encoder's features "
      "change at every step; set cache_features=False to finetune the encoder"
    )


def build_feature_cache(config: ml_collections.ConfigDict, spec: dict, backbone_state=None):
  """(cache, backbone state): the frozen encoder's maps of the whole training split under the 8
  symmetries, and the encoder's exact arrays (the run must start from them: a random encoder
  built eagerly may differ in the last bit from one built inside the jitted init)."""
  from data_pipelines.reader import make_dataset

  model = build_from_spec(spec, int(config.seed), backbone_state)
  tiles = make_dataset(
    config.data.manifest,
    config.data.train_split,
    global_batch_size=int(config.eval_batch),
    augment=False,
    shuffle=False,
    repeat=False,
    drop_remainder=False,
    deterministic=True,
    process_index=0,
    process_count=1,
    **reader_options(spec),
  )
  cache = feature_cache.build(model, tiles, int(config.eval_batch))
  return cache, nnx.state(model.backbone)


def _model_and_data(config: ml_collections.ConfigDict):
  """(manifest, spec, pretrained backbone state or None) of a run, checked against each other."""
  from data_pipelines.reader import read_manifest

  check_cache_features(config)
  if not config.data.manifest:
    raise ValueError(
      "set --config.data.manifest to a tile set's manifest.json (scripts/prepare_data.py makes one)"
    )
  manifest = read_manifest(config.data.manifest)
  norm = config.data.normalisation
  backbone_cfg, backbone_state = _backbone(config, int(manifest["tile_size"]), int(norm.channels))
  spec = model_spec(config, manifest, backbone_cfg)
  check_spec_against_data(spec, manifest, config.data.manifest)
  return manifest, spec, backbone_state


def dry_run(config: ml_collections.ConfigDict, workdir: str | Path, *, mesh=None) -> int:
  """`scripts/finetune.py --dry_run`: the memory plan of `config` on `mesh` (or the one `workdir`
  recorded), for the manifest's tile size, printed; nothing is trained or written (with
  cache_features, for the cached maps' shapes, without building the cache)."""
  from demmae_jax import sharding
  from demmae_jax.train import memory

  manifest, spec, backbone_state = _model_and_data(config)
  mesh = mesh or sharding.make_mesh(**config.mesh)
  a, b = sharding.process_batch_rows(mesh, int(config.global_batch))
  t, c = spec["tile_size"], spec["normalisation"]["channels"]
  example = {
    "label": jax.ShapeDtypeStruct((b - a, t, t), np.int32),
    "valid": jax.ShapeDtypeStruct((b - a, t, t), np.float32),
  }
  images = jax.ShapeDtypeStruct((b - a, t, t, c), np.float32)
  if config.cache_features:  # the batches are the encoder's maps (feature_cache.FeatureCache)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_from_spec(spec)))
    maps = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encoder_maps(x), state, images)
    example.update(
      {k: jax.ShapeDtypeStruct(m.shape, m.dtype) for k, m in zip(feature_cache.FEATURE_KEYS, maps)}
    )
  else:
    example["image"] = images
  task = Finetune(config, spec, class_weights(config, manifest), None, backbone_state)
  memory.dry_run(task, config, example, mesh, workdir)
  return 0


def run(
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  *,
  mesh=None,
  stop_after: int | None = None,
):
  """Train as `config` says in `workdir` (resuming it); returns the loop's Result."""
  from data_pipelines.reader import make_dataset
  from demmae_jax import sharding
  from demmae_jax.train import loop

  manifest, spec, backbone_state = _model_and_data(config)
  workdir = Path(workdir)
  # Validate before anything is written to the workdir (loop.train writes config.json and the
  # spec once its Trainer has validated the rest): a failed config must not claim the workdir.
  workdirs.check_config(workdir, config)
  spec_path = workdir / SPEC_FILE
  if spec_path.exists() and json.loads(spec_path.read_text()) != json.loads(json.dumps(spec)):
    raise workdirs.WorkdirConfigMismatch(
      f"{spec_path} describes another model than this run would build (was the --config.init "
      f"checkpoint or the tile set changed?); use a new --workdir"
    )
  weights = class_weights(config, manifest)
  from demmae_jax.train import optim

  optim.schedule(config.optim, int(config.total_steps), int(config.global_batch))  # fail fast
  mesh = mesh or sharding.make_mesh(**config.mesh)
  reader = dict(**reader_options(spec), seed=int(config.data.seed), deterministic=True)

  def eval_batches():
    return make_dataset(
      config.data.manifest,
      config.data.eval_split,
      global_batch_size=int(config.eval_batch),
      process_index=0,
      process_count=1,
      **reader,
    )

  def train_batches(start):  # deterministic and skippable: a resumed run sees the same batches
    return make_dataset(
      config.data.manifest,
      config.data.train_split,
      global_batch_size=int(config.global_batch),
      skip_batches=start,
      coarsen=float(config.data.coarsen),
      densify=float(config.data.densify),
      **reader,
    )

  if config.cache_features:
    cache, backbone_state = build_feature_cache(config, spec, backbone_state)
    if jax.process_index() == 0:
      print(
        f"feature cache: {cache.num_tiles} tiles x {feature_cache.SYMMETRIES} symmetries, "
        f"{cache.nbytes / 2**20:.0f} MiB, built in {cache.seconds:.1f} s",
        flush=True,
      )
    rows = sharding.process_batch_rows(mesh, int(config.global_batch))
    train_batches = lambda start: cache.batches(
      start, int(config.global_batch), rows, int(config.data.seed)
    )

  task = Finetune(
    config, spec, weights, eval_batches if config.eval_every_steps else None, backbone_state
  )
  return loop.train(
    task,
    config,
    workdir,
    train_batches,
    mesh=mesh,
    stop_after=stop_after,
    workdir_files={SPEC_FILE: json.dumps(spec, indent=1)},
  )
