"""A finetuned segmenter as its workdir describes it (`segmenter.json`, the spec): everything
needed to rebuild the model and feed it (architecture, classes, normalisation, tile and cell
size), so evaluation and prediction need only the workdir, never the pretraining checkpoint.
The spec is written by `demmae_jax.train.finetune.model_spec`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from demmae_jax.models import hybrid as hybrid_model, mae as mae_model, unet as unet_model, upernet

SPEC_FILE = "segmenter.json"


def read_spec(workdir: str | Path) -> dict:
  path = Path(workdir) / SPEC_FILE
  if not path.exists():
    raise FileNotFoundError(
      f"{path} not found: {workdir} is not a finetuning workdir (made by scripts/finetune.py)"
    )
  return json.loads(path.read_text())


def build_from_spec(spec: dict, seed: int = 0, backbone_state=None) -> nnx.Module:
  """The model `spec` describes; random weights unless `backbone_state` (an MAE's nnx.State)."""
  rngs = nnx.Rngs(params=seed)
  if spec["kind"] == "unet":
    u = spec["unet"]
    return unet_model.UNet(
      unet_model.UNetConfig(
        in_chans=spec["normalisation"]["channels"],
        num_classes=spec["num_classes"],
        width=u["width"],
        depth=u["depth"],
      ),
      rngs=rngs,
    )
  backbone = mae_model.MaskedAutoencoder(
    mae_model.MAEConfig(**spec["backbone"]), rngs=nnx.Rngs(params=seed + 1)
  )
  if backbone_state is not None:
    nnx.update(backbone, jax.tree.map(jnp.array, backbone_state))  # a copy: the loop donates state
  if spec["kind"] == "hybrid":
    h = spec["hybrid"]
    return hybrid_model.ViTUNet(
      backbone,
      hybrid_model.HybridConfig(**{**h, "layers": tuple(h["layers"])}),
      freeze_backbone=spec["freeze_backbone"],
      rngs=rngs,
    )
  head = spec["head"]
  head = upernet.HeadConfig(
    **{**head, "layers": tuple(head["layers"]), "pool_scales": tuple(head["pool_scales"])}
  )
  return upernet.Segmenter(backbone, head, freeze_backbone=spec["freeze_backbone"], rngs=rngs)


def check_spec_against_data(spec: dict, manifest: dict, source: str) -> None:
  """A model for K classes and tiles of T pixels must see data of at most K classes and size T."""
  weights = manifest["splits"]["train"].get("classes", {}).get("frequencies", {})
  labels = [int(k) for k in weights]
  if labels and max(labels) >= spec["num_classes"]:
    raise ValueError(
      f"{source}: the tiles hold label {max(labels)} but the model has "
      f"{spec['num_classes']} classes ({spec['class_names']})"
    )
  if manifest["tile_size"] != spec["tile_size"]:
    raise ValueError(
      f"{source}: tiles are {manifest['tile_size']} px but the model was built for "
      f"{spec['tile_size']} px"
    )


def reader_options(spec: dict) -> dict:
  """The tile reader's normalisation arguments for the model `spec` describes."""
  n = spec["normalisation"]
  return dict(
    normalisation=n["mode"],
    channels=n["channels"],
    scale_m=n["scale_m"],
    low_percentile=n["low_percentile"],
  )


def input_normalise(spec: dict):
  """The model's input normalisation on predictor windows: (dem, valid) -> [B, t, t, C]; for an
  nDSM model the raster predicted on must be the nDSM itself."""
  from data_pipelines.normalisation import normalise_numpy, parse_mode

  n = spec["normalisation"]
  modes = parse_mode(n["mode"])
  if len(modes) > 1:
    raise ValueError(f"the predictor reads one raster; a model on {n['mode']!r} needs several")
  kw = dict(
    stats=n["stats"],
    scale_m=n["scale_m"],
    low_percentile=n["low_percentile"],
    channels=n["channels"],
  )
  if modes[0] == "ndsm":
    return lambda dem, valid: normalise_numpy(dem, valid, "ndsm", ndsm=dem, **kw)
  return lambda dem, valid: normalise_numpy(dem, valid, modes[0], **kw)


def input_raster_name(spec: dict) -> str:
  """Which source of a tile set the model reads: 'ndsm' for an nDSM model, else 'elevation'."""
  return "ndsm" if spec["normalisation"]["mode"] == "ndsm" else "elevation"


# A roof stands above the ground: where a building model reads height above ground, cells lower
# than this are background whatever the network says. A physical prior, not tuned on a test
# area: 0.6-2.6 % of the building-labelled cells of the five labelled surveys lie below 2 m
# (label and DSM offsets at walls), and a network meets ground as flat and exactly zero as a
# DSM made from its DEM (Gothenburg) nowhere in LiDAR training data (docs/results_product.md).
MIN_BUILDING_HEIGHT_M = 2.0


def min_height_m(spec: dict) -> float | None:
  """The height above ground below which the model's positive class is overruled (None: never):
  MIN_BUILDING_HEIGHT_M for building models on nDSM input."""
  if input_raster_name(spec) == "ndsm" and spec["class_names"][1] == "building":
    return MIN_BUILDING_HEIGHT_M
  return None


def window_multiple(spec: dict) -> int | None:
  """The side a prediction window of this model must be a multiple of, or None when only the
  training tile size works (a ViT's position embeddings fix its input size)."""
  if spec["kind"] == "unet":
    return 2 ** int(spec["unet"]["depth"])
  return None


# Normalisations whose value at a pixel does not depend on the window around it: only with
# these does a window larger than the training tile feed the network what it was trained on
# (per-tile min-max or percentiles over 256 px would rescale the heights of a 64 px-tile model).
WINDOW_FREE_NORMALISATIONS = ("ndsm", "zscore")


def check_window(spec: dict, window: int) -> None:
  if window != spec["tile_size"]:
    modes = spec["normalisation"]["mode"].split("+")
    if any(m not in WINDOW_FREE_NORMALISATIONS for m in modes):
      raise ValueError(
        f"the model normalises each {spec['tile_size']} px tile by its own statistics "
        f"({spec['normalisation']['mode']}): predict with windows of that size, not "
        f"{window} (larger windows need a per-pixel normalisation: ndsm or zscore)"
      )
  m = window_multiple(spec)
  if m is None and window != spec["tile_size"]:
    raise ValueError(
      f"a {spec['kind']} model takes windows of its tile size "
      f"({spec['tile_size']} px) only, not {window}"
    )
  if m is not None and (window % m or window < m):
    raise ValueError(
      f"prediction windows of a {spec['kind']} model must be multiples of {m} px; got {window}"
    )
