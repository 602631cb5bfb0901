"""A segmenter scored on a tile split: the confusion matrix of its argmax, the metrics summary
(IoU, precision, recall, boundary IoU) and the first tiles with their predictions."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from flax import nnx

from demmae_jax import metrics
from demmae_jax.inference.apply import probabilities_fn
from demmae_jax.inference.segmenter import check_spec_against_data, reader_options


def confusion(
  model: nnx.Module,
  batches: Iterator[dict],
  num_classes: int,
  keep: int = 0,
  boundary: metrics.BoundaryIoU | None = None,
) -> tuple[np.ndarray, dict[str, list]]:
  """Confusion matrix of the model's argmax over finite batches of {image, label, valid}, and the
  first `keep` tiles with their predictions; `boundary` (if given) accumulates boundary IoU over
  the same pixels. A short last batch is padded (one compiled shape)."""
  probs = probabilities_fn(model)
  total = np.zeros((num_classes, num_classes), np.int64)
  kept: dict[str, list] = {"image": [], "label": [], "valid": [], "pred": []}
  size = None
  for batch in batches:
    n = batch["image"].shape[0]
    size = size or n
    images = (
      batch["image"]
      if n == size
      else np.concatenate(
        [batch["image"], np.zeros((size - n,) + batch["image"].shape[1:], np.float32)]
      )
    )
    pred = np.asarray(probs(images)).argmax(-1)[:n]
    total += np.asarray(metrics.confusion_matrix(pred, batch["label"], num_classes, batch["valid"]))
    if boundary is not None:
      boundary.update(pred, batch["label"], batch["valid"])
    room = keep - len(kept["pred"])
    for name, x in (
      ("image", batch["image"]),
      ("label", batch["label"]),
      ("valid", batch["valid"]),
      ("pred", pred),
    ):
      kept[name].extend(x[: max(room, 0)])
  return total, kept


def evaluate_split(
  model: nnx.Module,
  spec: dict,
  manifest_path: str,
  split: str,
  *,
  batch_size: int = 16,
  keep: int = 0,
  band_m: float = metrics.DEFAULT_BAND_M,
) -> tuple[dict, dict[str, np.ndarray]]:
  """(metrics summary, the first `keep` tiles' {image, label, valid, pred}) on a tile split; the
  summary includes boundary IoU of class 1 in a band of `band_m` metres."""
  from data_pipelines.reader import make_dataset, read_manifest

  check_spec_against_data(spec, read_manifest(manifest_path), manifest_path)
  batches = make_dataset(
    manifest_path,
    split,
    global_batch_size=batch_size,
    deterministic=True,
    process_index=0,
    process_count=1,
    **reader_options(spec),
  )
  boundary = metrics.BoundaryIoU.in_metres(spec["cell_size"], band_m)
  cm, kept = confusion(model, batches, spec["num_classes"], keep, boundary)
  if cm.sum() == 0:
    raise ValueError(f"{manifest_path}: split {split!r} has no labelled valid pixel to evaluate")
  summary = metrics.summarize(cm, positive=1, class_names=spec["class_names"], boundary=boundary)
  return summary, {name: np.stack(v) for name, v in kept.items() if v}
