"""Masked-autoencoder pretraining as a `Task` of the generic loop; `run` trains it from the
config's rasters (or corpus) and `export` writes a run's MAE for finetuning.

The masking noise comes from the step's `rng` (the loop folds in the step), so masks are
reproducible across restarts and device counts. Pictures show, per sample: the DEM, the masked
input (removed patches grey), the reconstruction (visible patches pasted back, as the official
MAE visualisation) and the absolute error on the removed patches.
"""

from __future__ import annotations

import json
from pathlib import Path

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

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    num_pictures: int = 4,
    eval_batch: dict[str, np.ndarray] | None = None,
  ):
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

  def with_remat(self, on: bool) -> MAEPretrain:
    config = self.config.copy_and_resolve_references()
    with config.unlocked():
      config.model.remat = bool(on)
    return MAEPretrain(config, self.num_pictures, self.eval_batch)

  def build_model(self) -> mae_model.MaskedAutoencoder:
    init = self.config.get("init") or ""
    if not init:
      return mae_model.MaskedAutoencoder(
        self.mae_config, rngs=nnx.Rngs(params=int(self.config.seed))
      )
    from demmae_jax import api  # the ported-checkpoint reader (another module's I/O)

    # The architecture is the config's: a checkpoint of another one is refused by shape.
    return api.from_pretrained(
      init,
      config=self.mae_config,
      seed=int(self.config.seed),
      channel_adapt=self.config.get("channel_adapt") or None,
      encoder_only=bool(self.config.get("init_encoder_only", False)),
    )

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
    loss, baseline = self._eval(model, jnp.asarray(self.eval_batch["image"]), jax.random.key(20231))
    out = {"loss": float(loss)}
    if not self.mae_config.norm_pix_loss:
      out["visible_mean_loss"] = float(baseline)
    return out

  def picture_arrays(self, model, batch, rng):
    images = batch["image"][: self.num_pictures]
    _, pred, mask = model(images, key=rng)
    c = model.config
    pred = pred.astype(jnp.float32)
    if c.norm_pix_loss:  # back to pixel values with each patch's own statistics
      target = patchify(images, c.patch_size)
      mean = target.mean(-1, keepdims=True)
      std = (target.var(-1, keepdims=True, ddof=1) + 1e-6) ** 0.5
      pred = pred * std + mean
    grid = (images.shape[1] // c.patch_size, images.shape[2] // c.patch_size)
    pixel_mask = unpatchify(
      jnp.repeat(mask[..., None], c.patch_size**2 * c.in_chans, -1), c.patch_size, c.in_chans, grid
    )
    recon = unpatchify(pred, c.patch_size, c.in_chans, grid)
    return {
      "image": images,
      "mask": pixel_mask,
      "pasted": images * (1 - pixel_mask) + recon * pixel_mask,
    }

  def draw(self, arrays, step):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, mask, pasted = (
      np.asarray(arrays[k], np.float32)[..., 0] for k in ("image", "mask", "pasted")
    )
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
      panels = [
        (image[i], cmap, lo, hi),
        (masked, cmap, lo, hi),
        (pasted[i], cmap, lo, hi),
        (error, err_cmap, 0, max(hi - lo, 1e-6) * 0.5),
      ]
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
  example = {"image": jax.ShapeDtypeStruct((b - a, m.img_size, m.img_size, m.in_chans), np.float32)}
  memory.dry_run(MAEPretrain(config), config, example, mesh, workdir)
  return 0


def check_data(config: ml_collections.ConfigDict, *, reads: bool = True) -> None:
  """The data section's mistakes that would otherwise show only after setup (ValueError).
  `reads=False` (a dry run, which reads no data) allows a config without a data source."""
  from data_pipelines.pretrain_corpus import CORPUS_JSON
  from data_pipelines.raster_source import NORMALISATIONS

  d = config.data
  if reads and not (d.corpus_tiles or d.corpus or d.files or d.lidar_files):
    raise ValueError(
      f"no pretraining data: preset {config.get('preset', '')!r} reads TFRecord corpora "
      "(scripts/prepare_data.py corpus-beam); name them with "
      "--config.data.corpus_tiles=gs://BUCKET/corpus/* (comma-separated globs or corpus "
      "folders, local or gs://)"
    )
  tiles = bool(
    d.corpus_tiles
  )  # TFRecord corpora (data_pipelines/corpus_reader.py) join modes by "+"
  if not tiles and d.normalisation.mode not in NORMALISATIONS:
    raise ValueError(f"data.normalisation.mode must be one of {NORMALISATIONS}")
  if d.normalisation.mode == "ndsm" and not (d.corpus or tiles):
    raise ValueError(
      "normalisation 'ndsm' reads nDSM rasters: set --config.data.corpus (e.g. auto)"
    )
  if d.corpus not in ("", "auto") and not (Path(d.corpus) / CORPUS_JSON).exists():
    raise ValueError(
      f"{d.corpus} holds no {CORPUS_JSON}: build it with "
      f"scripts/prepare_data.py corpus --out {d.corpus}"
    )


def lidar_dsm(config: ml_collections.ConfigDict, workdir: Path) -> list[Path]:
  """The DSM of `config.data.lidar_files`, rasterised once into the workdir (process 0)."""
  if not config.data.lidar_files:
    return []
  from jax.experimental import multihost_utils

  from data_pipelines.lidar import las_to_rasters
  from data_pipelines.shared_data import shared_file

  out = workdir / "lidar_dsm"
  if jax.process_index() == 0 and not (out / "dsm.tif").exists():
    las_to_rasters(
      [shared_file(f) for f in config.data.lidar_files],
      out,
      cell_size=config.data.lidar_cell_size,
      progress=False,
    )
  multihost_utils.sync_global_devices("lidar_dsm")
  return [out / "dsm.tif"]


def corpus_files(config: ml_collections.ConfigDict, workdir: Path) -> tuple[list[Path], list[Path]]:
  """(training, evaluation) rasters of `config.data.corpus` for the normalisation mode; "auto"
  builds the corpus into WORKDIR/corpus first (process 0; an unfinished one is completed)."""
  from jax.experimental import multihost_utils

  from data_pipelines.pretrain_corpus import CORPUS_JSON, build_corpus, corpus_rasters

  auto = config.data.corpus == "auto"
  path = workdir / "corpus" if auto else Path(config.data.corpus)
  if auto and jax.process_index() == 0 and not (path / CORPUS_JSON).exists():
    build_corpus(path, config.data.corpus_cell_size)
  multihost_utils.sync_global_devices("corpus")
  return corpus_rasters(path, config.data.normalisation.mode)


def run(
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  *,
  mesh=None,
  stop_after: int | None = None,
):
  """Pretrain as `config` says in `workdir` (resuming it); returns the loop's Result. Training
  crops come from the config's rasters (plus its LiDAR, rasterised into the workdir) or corpus;
  evaluation, when configured, on fixed crops of the held-out rasters."""
  from data_pipelines.raster_source import RasterCrops
  from data_pipelines.shared_data import shared_file
  from demmae_jax import sharding, workdirs
  from demmae_jax.train import loop

  check_data(config)
  workdir = Path(workdir)
  mesh = mesh or sharding.make_mesh(**config.mesh)
  rows = sharding.process_batch_rows(mesh, config.global_batch)
  workdirs.check_config(workdir, config)  # refuse another run's workdir; writes nothing
  n = config.data.normalisation
  norm = dict(normalisation=n.mode, scale_m=n.scale_m, low_percentile=n.low_percentile)
  if config.data.corpus_tiles:  # a Beam-built TFRecord corpus, streamed
    from data_pipelines.corpus_reader import pretrain_sources

    source, eval_batch = pretrain_sources(config, workdir)
    eval_files = ()
  else:
    if config.data.corpus:
      files, eval_files = corpus_files(config, workdir)
    else:
      files = [shared_file(f) for f in config.data.files] + lidar_dsm(config, workdir)
      eval_files = [shared_file(f) for f in config.data.eval_files]
    crops = dict(crop=config.model.img_size, min_relief=config.data.min_relief, **norm)
    source = RasterCrops.from_files(
      files,
      global_batch=config.global_batch,
      seed=config.data.seed,
      augment=config.data.augment,
      **crops,
    )
    eval_batch = None
  if config.eval_every_steps and eval_files:
    held_out = RasterCrops.from_files(
      eval_files,
      global_batch=config.data.eval_samples,
      seed=config.data.seed + 1,
      augment=False,
      **crops,
    )
    eval_batch = held_out.batch(0)
  return loop.train(
    MAEPretrain(config, eval_batch=eval_batch),
    config,
    workdir,
    lambda start: source.batches(start, rows),
    mesh=mesh,
    stop_after=stop_after,
  )


def export(
  workdir: str | Path, out: str | Path, *, step: int | None = None, overwrite: bool = False
) -> tuple[Path, int]:
  """(directory, step): the MAE of pretraining run `workdir` at `step` (default: the latest),
  written whole (the decoder is small; finetuning reads the encoder only) as a checkpoint that
  `api.from_pretrained` loads: orbax `state/` + `config.json`, atomically."""
  from data_pipelines.atomic import check_outputs
  from demmae_jax import api

  workdir, out = Path(workdir), Path(out)
  check_outputs([out], [workdir])  # `out` replaced as a whole must not be or hold the workdir
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
  model, step = restore_mae(workdir, step)
  return api.save_model(model, out, overwrite=overwrite), step


def restore_mae(
  workdir: str | Path, step: int | None = None
) -> tuple[mae_model.MaskedAutoencoder, int]:
  """(the MAE of pretraining run `workdir` at `step` (default: the latest), that step). The
  architecture is the run's config.json's; its init file is not read (the checkpoint holds every
  weight)."""
  from demmae_jax import workdirs
  from demmae_jax.inference.restore import restore

  config_file = Path(workdir) / workdirs.CONFIG_FILE
  if not config_file.is_file():
    raise FileNotFoundError(f"{config_file} not found: not a pretraining workdir")
  config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
  model = nnx.eval_shape(
    lambda: mae_model.MaskedAutoencoder(model_config(config.model), rngs=nnx.Rngs(params=0))
  )
  return restore(model, workdir, "latest" if step is None else step)


def _eval_losses(model, images, key):
  loss, _, mask = model(images, key=key)
  target = patchify(images.astype(jnp.float32), model.config.patch_size)  # [N, L, p*p*C]
  visible = 1.0 - mask
  mean = (target.mean(-1) * visible).sum(1) / visible.sum(1)  # per image, visible pixels
  per_patch = ((target - mean[:, None, None]) ** 2).mean(-1)
  return loss, (per_patch * mask).sum() / mask.sum()
