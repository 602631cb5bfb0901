"""Masked-autoencoder pretraining on real elevation, sharded over all devices, resumable.

  python scripts/pretrain.py --config configs/dem_pretrain.py:tiny --workdir runs/pretrain_tiny
  python scripts/pretrain.py --config configs/dem_pretrain.py:base --workdir gs://... \
      --config.mesh.fsdp=8 --config.global_batch=1024

Running it again with the same --workdir resumes from the latest checkpoint; a workdir made
with another config is refused. SIGTERM saves a checkpoint and exits with status 0.
Outputs in the workdir: config.json, checkpoints/, metrics.jsonl, tensorboard/, pictures/.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset, e.g. configs/dem_pretrain.py:tiny; override keys with "
    "--config.key=value (unknown keys are an error).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, pictures. "
                               "An existing one of the same config is resumed.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the memory plan per device for this config "
                              "and mesh (or the one the workdir recorded) and exit; nothing is "
                              "trained or written. See docs/memory.md.")
flags.mark_flags_as_required(["config", "workdir"])


def lidar_dsm(config, workdir: Path) -> list[Path]:
  """The DSM of `config.data.lidar_files`, rasterised once into the workdir (process 0)."""
  if not config.data.lidar_files:
    return []
  import jax
  from jax.experimental import multihost_utils
  from data_pipelines.lidar import las_to_rasters
  from data_pipelines.shared_data import shared_file
  out = workdir / "lidar_dsm"
  if jax.process_index() == 0 and not (out / "dsm.tif").exists():
    las_to_rasters([shared_file(f) for f in config.data.lidar_files], out,
                   cell_size=config.data.lidar_cell_size, progress=False)
  multihost_utils.sync_global_devices("lidar_dsm")
  return [out / "dsm.tif"]


def corpus_files(config, workdir: Path) -> tuple[list[Path], list[Path]]:
  """(training, evaluation) rasters of `config.data.corpus` for the normalisation mode; "auto"
  builds the corpus into WORKDIR/corpus first (process 0; an unfinished one is completed)."""
  import jax
  from jax.experimental import multihost_utils
  from data_pipelines.pretrain_corpus import CORPUS_JSON, build_corpus, corpus_rasters
  auto = config.data.corpus == "auto"
  path = workdir / "corpus" if auto else Path(config.data.corpus)
  if auto and jax.process_index() == 0 and not (path / CORPUS_JSON).exists():
    build_corpus(path, config.data.corpus_cell_size)
  multihost_utils.sync_global_devices("corpus")
  return corpus_rasters(path, config.data.normalisation.mode)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = _CONFIG.value
  from data_pipelines.raster_source import RasterCrops
  from data_pipelines.shared_data import shared_file
  from demmae_jax import sharding
  from demmae_jax.train import checkpointing, loop, pretrain

  workdir = Path(_WORKDIR.value)
  from data_pipelines.raster_source import NORMALISATIONS
  tiles = bool(config.data.corpus_tiles)  # TFRecord corpora: data_pipelines/corpus_reader.py
  if not tiles and config.data.normalisation.mode not in NORMALISATIONS:
    raise app.UsageError(f"data.normalisation.mode must be one of {NORMALISATIONS}")
  if config.data.normalisation.mode == "ndsm" and not (config.data.corpus or tiles):
    raise app.UsageError("normalisation 'ndsm' reads nDSM rasters: set --config.data.corpus (e.g. auto)")
  if config.data.corpus not in ("", "auto") and not (Path(config.data.corpus) / "corpus.json").exists():
    raise app.UsageError(f"{config.data.corpus} holds no corpus.json: build it with "
                         f"scripts/prepare_data.py corpus --out {config.data.corpus}")
  d = config.distributed
  sharding.maybe_initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
  mesh = sharding.make_mesh(**config.mesh)
  rows = sharding.process_batch_rows(mesh, config.global_batch)
  try:
    if _DRY_RUN.value:
      return pretrain.dry_run(config, workdir, mesh)
    checkpointing.check_config(workdir, config)  # refuse another run's workdir; writes nothing
    n = config.data.normalisation
    norm = dict(normalisation=n.mode, scale_m=n.scale_m, low_percentile=n.low_percentile)
    if tiles:
      from data_pipelines.corpus_reader import pretrain_sources
      source, eval_batch = pretrain_sources(config, workdir)
      files = eval_files = ()
    elif config.data.corpus:
      files, eval_files = corpus_files(config, workdir)
    else:
      files = [shared_file(f) for f in config.data.files] + lidar_dsm(config, workdir)
      eval_files = [shared_file(f) for f in config.data.eval_files]
    if not tiles:
      source = RasterCrops.from_files(files, crop=config.model.img_size,
                                      global_batch=config.global_batch, seed=config.data.seed,
                                      augment=config.data.augment, min_relief=config.data.min_relief,
                                      **norm)
      eval_batch = None
    if config.eval_every_steps and eval_files:
      held_out = RasterCrops.from_files(eval_files, crop=config.model.img_size,
                                        global_batch=config.data.eval_samples,
                                        seed=config.data.seed + 1, augment=False,
                                        min_relief=config.data.min_relief, **norm)
      eval_batch = held_out.batch(0)
    task = pretrain.MAEPretrain(config, eval_batch=eval_batch)
    result = loop.train(task, config, workdir,
                        lambda start: source.batches(start, rows), mesh=mesh)
  except (loop.NonFiniteLoss, checkpointing.WorkdirConfigMismatch, loop.DoesNotFit) as e:
    print(f"pretrain: error: {e}", file=sys.stderr)
    return 2
  last = next((h for h in reversed(result.history) if "loss" in h), {})
  print(f"pretrain: {'stopped by signal at' if result.preempted else 'finished'} step "
        f"{result.step}; loss {last.get('loss', float('nan')):.4f}; outputs in {workdir}: "
        f"checkpoints/, metrics.jsonl, tensorboard/, pictures/. Export the encoder with "
        f"scripts/export_encoder.py --workdir {workdir} --out DIR")
  return 0


if __name__ == "__main__":
  from demmae_jax.train import cli
  cli.run(main)
