"""Masked-autoencoder pretraining as a `Task` of the generic loop.

The masking noise comes from the step's `rng` (the loop folds in the step), so masks are
reproducible across restarts and device counts. Pictures show, per sample: the DEM, the masked
input (removed patches grey), the reconstruction (visible patches pasted back, as the official
MAE visualisation) and the absolute error on the removed patches.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from demmae_jax.models import mae as mae_model
from demmae_jax.models.vit import patchify, unpatchify
from demmae_jax.train.loop import Task


def model_config(cfg: ml_collections.ConfigDict) -> mae_model.MAEConfig:
  """MAEConfig from the config's `model` section: a preset name plus field overrides."""
  fields = {k: v for k, v in cfg.to_dict().items() if k != "preset"}
  return mae_model.preset(cfg.preset, **fields)


class MAEPretrain(Task):
  trainable = nnx.Param
  # Each image's mask is drawn from its own key: the masks, hence the loss (a mean over images of
  # equal mask counts), do not depend on how the batch is split into micro-batches or devices.
  per_example_rng = True
  remat_flag = "model.remat"

  def __init__(self, config: ml_collections.ConfigDict, num_pictures: int = 4,
               eval_batch: dict[str, np.ndarray] | None = None):
    """`eval_batch`: fixed held-out images (the same on every process) for `evaluate`."""
    self.config = config
    self.mae_config = model_config(config.model)
    self.num_pictures = num_pictures
    self.jit_init = not config.get("init")
    self.eval_batch = eval_batch
    if eval_batch is not None:
      self.best_metric, self.best_mode = "loss", "min"
    self._eval = None

  @property
  def remat(self) -> bool:
    return bool(self.mae_config.remat)

  def with_remat(self, on: bool) -> "MAEPretrain":
    config = self.config.copy_and_resolve_references()
    with config.unlocked():
      config.model.remat = bool(on)
    return MAEPretrain(config, self.num_pictures, self.eval_batch)

  def build_model(self) -> mae_model.MaskedAutoencoder:
    init = self.config.get("init") or ""
    if not init:
      return mae_model.MaskedAutoencoder(self.mae_config,
                                         rngs=nnx.Rngs(params=int(self.config.seed)))
    from demmae_jax import mae  # the ported-checkpoint reader (another module's I/O)
    # The architecture is the config's: a checkpoint of another one is refused by shape.
    return mae.from_pretrained(init, config=self.mae_config, seed=int(self.config.seed),
                               channel_adapt=self.config.get("channel_adapt") or None,
                               encoder_only=bool(self.config.get("init_encoder_only", False)))

  def loss_fn(self, model, batch, rng):
    loss, _, mask = model(batch["image"], key=rng)
    return loss, {"masked_fraction": mask.mean()}

  def evaluate(self, model, step):
    """Masked loss on the held-out batch with fixed masks, and the loss of the trivial
    reconstruction (every removed patch = the mean of the image's visible pixels)."""
    if self.eval_batch is None:
      return {}
    if self._eval is None:
      self._eval = nnx.jit(_eval_losses)
    loss, baseline = self._eval(model, jnp.asarray(self.eval_batch["image"]),
                                jax.random.key(20231))
    out = {"loss": float(loss)}
    if not self.mae_config.norm_pix_loss:
      out["visible_mean_loss"] = float(baseline)
    return out

  def picture_arrays(self, model, batch, rng):
    images = batch["image"][:self.num_pictures]
    _, pred, mask = model(images, key=rng)
    c = model.config
    pred = pred.astype(jnp.float32)
    if c.norm_pix_loss:  # back to pixel values with each patch's own statistics
      target = patchify(images, c.patch_size)
      mean = target.mean(-1, keepdims=True)
      std = (target.var(-1, keepdims=True, ddof=1) + 1e-6)**0.5
      pred = pred * std + mean
    grid = (images.shape[1] // c.patch_size, images.shape[2] // c.patch_size)
    pixel_mask = unpatchify(jnp.repeat(mask[..., None], c.patch_size**2 * c.in_chans, -1),
                            c.patch_size, c.in_chans, grid)
    recon = unpatchify(pred, c.patch_size, c.in_chans, grid)
    return {"image": images, "mask": pixel_mask,
            "pasted": images * (1 - pixel_mask) + recon * pixel_mask}

  def draw(self, arrays, step):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    image, mask, pasted = (np.asarray(arrays[k], np.float32)[..., 0]
                           for k in ("image", "mask", "pasted"))
    n = image.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(8, 2 * n + 0.4), squeeze=False)
    for i in range(n):
      lo, hi = image[i].min(), image[i].max()
      masked = np.ma.masked_where(mask[i] > 0, image[i])
      error = np.ma.masked_where(mask[i] == 0, np.abs(pasted[i] - image[i]))
      cmap = plt.get_cmap("terrain").copy()
      cmap.set_bad("0.6")  # grey: removed patches in the input, visible ones in the error
      err_cmap = plt.get_cmap("magma").copy()
      err_cmap.set_bad("0.6")
      panels = [(image[i], cmap, lo, hi), (masked, cmap, lo, hi), (pasted[i], cmap, lo, hi),
                (error, err_cmap, 0, max(hi - lo, 1e-6) * 0.5)]
      for ax, (img, cm, vmin, vmax) in zip(axes[i], panels):
        ax.imshow(img, cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax, title in zip(axes[0], ["DEM", "masked input", "reconstruction", "|error| (masked)"]):
      ax.set_title(title, fontsize=9)
    fig.suptitle(f"step {step}", fontsize=9)
    fig.tight_layout()
    return {"reconstruction": fig}


def dry_run(config: ml_collections.ConfigDict, workdir, mesh) -> int:
  """`scripts/pretrain.py --dry_run`: the memory plan of `config` on `mesh` (or the one `workdir`
  recorded), printed; no data is read, nothing is trained or written."""
  from demmae_jax import sharding
  from demmae_jax.train import memory
  a, b = sharding.process_batch_rows(mesh, int(config.global_batch))
  m = model_config(config.model)
  example = {"image": jax.ShapeDtypeStruct((b - a, m.img_size, m.img_size, m.in_chans),
                                           np.float32)}
  memory.dry_run(MAEPretrain(config), config, example, mesh, workdir)
  return 0


def _eval_losses(model, images, key):
  loss, _, mask = model(images, key=key)
  target = patchify(images.astype(jnp.float32), model.config.patch_size)  # [N, L, p*p*C]
  visible = 1.0 - mask
  mean = (target.mean(-1) * visible).sum(1) / visible.sum(1)  # per image, visible pixels
  per_patch = ((target - mean[:, None, None])**2).mean(-1)
  return loss, (per_patch * mask).sum() / mask.sum()
