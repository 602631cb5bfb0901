"""A cheap few-label probe of a (pretrained) MAE encoder, so that "does pretraining help" is a
curve over pretraining steps rather than one finetuning run (issue 12).

The encoder is frozen; its last block's patch tokens (standardised with the training tokens'
mean and spread, as MAE's linear probe puts a BatchNorm first) are mapped by one linear layer to
the patch's pixels (p x p logits per token); that layer is fitted on a few labelled tiles (each
seen in the 8 square symmetries) with the class-weighted cross-entropy and scored by IoU of the
positive class on the validation tiles. A randomly initialised encoder of the same architecture
is the probe's floor: what a linear map reads off random projections of the patches.

    curve = probe_run("runs/pretrain_hr", [draw manifests], steps=[250, 500, ...])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from demmae_jax.models.vit import unpatchify

IGNORE = 255


@dataclasses.dataclass(frozen=True)
class ProbeData:
  images: np.ndarray  # [N, H, W, C] float32, normalised as the encoder was pretrained
  labels: np.ndarray  # [N, H, W] uint8 (0 background, 1 positive, 255 ignore)


def load_split(
  manifest: str, split: str, normalisation: str, scale_m: float = 30.0, channels: int = 1
) -> ProbeData:
  """Every tile of `split`, in manifest order; pixels without a measurement are ignored."""
  from data_pipelines.reader import make_dataset

  batches = list(
    make_dataset(
      manifest,
      split,
      global_batch_size=64,
      normalisation=normalisation,
      scale_m=scale_m,
      channels=channels,
      augment=False,
      shuffle=False,
      repeat=False,
      drop_remainder=False,
      process_index=0,
      process_count=1,
    )
  )
  images = np.concatenate([b["image"] for b in batches]).astype(np.float32)
  labels = np.concatenate([b["label"] for b in batches]).astype(np.int32)
  valid = np.concatenate([b["valid"] for b in batches]) > 0
  labels = np.where(valid, labels, IGNORE).astype(np.uint8)
  return ProbeData(images, labels)


def symmetries(data: ProbeData) -> ProbeData:
  """The 8 symmetries of the square of every tile (rotations, then the same transposed)."""
  views_i, views_l = [], []
  for transpose in (False, True):
    img = np.swapaxes(data.images, 1, 2) if transpose else data.images
    lab = np.swapaxes(data.labels, 1, 2) if transpose else data.labels
    for k in range(4):
      views_i.append(np.rot90(img, k, axes=(1, 2)))
      views_l.append(np.rot90(lab, k, axes=(1, 2)))
  return ProbeData(np.concatenate(views_i), np.concatenate(views_l))


def token_reader(model, layer: int | None = None, batch: int = 64):
  """images [N, H, W, C] -> [N, L, D] patch tokens of block `layer` (default the last; no masking,
  cls dropped); one compiled encoder per model, reused for every call."""
  from flax import nnx

  graphdef, state = nnx.split(model)
  layer = model.config.depth - 1 if layer is None else layer

  @jax.jit
  def encode(state, x):
    return nnx.merge(graphdef, state).encode(x, layers=(layer,))[0][:, 1:]

  def read(images: np.ndarray) -> np.ndarray:
    return np.concatenate(
      [
        np.asarray(encode(state, jnp.asarray(images[i : i + batch])), np.float32)
        for i in range(0, len(images), batch)
      ]
    )

  return read


def fit_and_score(
  train_tokens: np.ndarray,
  train: ProbeData,
  val_tokens: np.ndarray,
  val: ProbeData,
  patch: int,
  *,
  steps: int = 300,
  lr: float = 3e-3,
  seed: int = 0,
) -> dict:
  """Fit the linear token -> pixel-logit map on `train`; IoU, precision, recall on `val`."""
  mean, std = train_tokens.mean((0, 1)), train_tokens.std((0, 1)) + 1e-6
  standardise = lambda t: jnp.asarray((t - mean) / std)  # noqa: E731
  xt, xv = standardise(train_tokens), standardise(val_tokens)
  grid = (train.labels.shape[1] // patch, train.labels.shape[2] // patch)
  yt = jnp.asarray(train.labels)
  known = yt != IGNORE
  positive = jnp.where(known, yt == 1, False)
  # class weights: each class contributes half of the loss, as a few tiles are rarely balanced
  share = jnp.clip(positive.sum() / jnp.maximum(known.sum(), 1), 0.05, 0.95)
  weight = jnp.where(known, jnp.where(positive, 0.5 / share, 0.5 / (1 - share)), 0.0)
  d = xt.shape[-1]
  params = {
    "w": jax.random.normal(jax.random.key(seed), (d, patch * patch)) * d**-0.5 * 0.1,
    "b": jnp.zeros((patch * patch,)),
  }

  def logits(p, x):
    return unpatchify(x @ p["w"] + p["b"], patch, 1, grid)[..., 0]

  def loss_fn(p):
    ce = optax.sigmoid_binary_cross_entropy(logits(p, xt), positive.astype(jnp.float32))
    return (ce * weight).sum() / weight.sum()

  opt = optax.adamw(lr, weight_decay=1e-4)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state = opt.init(params)
  for _ in range(steps):
    params, state, loss = step(params, state)
  pred = np.asarray(logits(params, xv) > 0)
  lab = val.labels
  keep = lab != IGNORE
  tp = int((pred & (lab == 1) & keep).sum())
  fp = int((pred & (lab == 0) & keep).sum())
  fn = int((~pred & (lab == 1) & keep).sum())
  return {
    "iou": tp / max(tp + fp + fn, 1),
    "precision": tp / max(tp + fp, 1),
    "recall": tp / max(tp + fn, 1),
    "train_loss": float(loss),
  }


def probe_model(
  model,
  draws: Sequence[ProbeData],
  val: ProbeData,
  *,
  steps: int = 300,
  seed: int = 0,
  layer: int | None = None,
) -> dict:
  """The probe on each few-label draw (its symmetries), scored on `val`: mean and per draw."""
  patch = model.config.patch_size
  tokens = token_reader(model, layer)
  val_tokens = tokens(val.images)
  per_draw = []
  for i, draw in enumerate(draws):
    train = symmetries(draw)
    per_draw.append(
      fit_and_score(tokens(train.images), train, val_tokens, val, patch, steps=steps, seed=seed + i)
    )
  ious = [r["iou"] for r in per_draw]
  return {"iou": float(np.mean(ious)), "iou_std": float(np.std(ious)), "draws": per_draw}


def probe_run(
  workdir,
  draw_manifests: Sequence[str],
  val_manifest: str | None = None,
  *,
  steps: Iterable[int | None] = (None,),
  include_random: bool = True,
  probe_steps: int = 300,
  layer: int | None = None,
  log=print,
) -> list[dict]:
  """The probe at each kept checkpoint `steps` of pretraining run `workdir` (None = the latest),
  and for the same architecture at random initialisation (step 0). Data are read with the run's
  own input normalisation; `layer` is the block read (default the last); validation is
  `val_manifest`'s (default: the first draw's) val split."""
  import json
  from pathlib import Path

  import ml_collections

  from demmae_jax.train import pretrain

  workdir = Path(workdir)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  with config.unlocked():
    config.init = ""
  norm = config.data.normalisation
  read = dict(
    normalisation=norm.mode,
    scale_m=float(norm.get("scale_m", 30.0)),
    channels=int(config.model.in_chans),
  )
  draws = [load_split(m, "train", **read) for m in draw_manifests]
  val = load_split(val_manifest or draw_manifests[0], "val", **read)
  task = pretrain.MAEPretrain(config)
  results = []
  if include_random:
    rec = {"step": 0, **probe_model(task.build_model(), draws, val, steps=probe_steps, layer=layer)}
    log(f"probe: random init: IoU {rec['iou']:.3f} +- {rec['iou_std']:.3f}")
    results.append(rec)
  for s in steps:
    model, step = pretrain.restore_mae(workdir, s)
    rec = {"step": int(step), **probe_model(model, draws, val, steps=probe_steps, layer=layer)}
    log(f"probe: step {step}: IoU {rec['iou']:.3f} +- {rec['iou_std']:.3f}")
    results.append(rec)
  return results
