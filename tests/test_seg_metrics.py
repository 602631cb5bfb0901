"""IoU, precision, recall, F1 and the confusion matrix, with ignore index and validity mask."""
import json

import jax
import numpy as np

from demmae_jax import metrics


def test_confusion_matrix_skips_ignore_and_invalid_pixels():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 3, (4, 16, 16))
  label[:, :2] = metrics.IGNORE_INDEX
  pred = rng.integers(0, 3, (4, 16, 16))
  valid = (rng.random((4, 16, 16)) > 0.2).astype(np.float32)
  cm = np.asarray(jax.jit(metrics.confusion_matrix, static_argnums=2)(pred, label, 3, valid))
  keep = (label != 255) & (valid > 0)
  expected = np.bincount(label[keep] * 3 + pred[keep], minlength=9).reshape(3, 3)
  np.testing.assert_array_equal(cm, expected)
  assert cm.sum() == keep.sum()


def test_summary_of_a_known_binary_case():
  # label:      1 1 1 0 0 0 | pred: 1 1 0 1 0 0  -> tp 2, fn 1, fp 1, tn 2
  label = np.array([1, 1, 1, 0, 0, 0, 255])
  pred = np.array([1, 1, 0, 1, 0, 0, 1])
  s = metrics.summarize(np.asarray(metrics.confusion_matrix(pred, label, 2)),
                        class_names=["background", "building"])
  assert s["positive_class"] == "building"
  assert s["iou"] == 2 / 4 and s["per_class"]["background"]["iou"] == 2 / 4
  b = s["per_class"]["building"]
  assert b["precision"] == 2 / 3 and b["recall"] == 2 / 3 and b["f1"] == 2 / 3
  assert s["confusion_matrix"] == [[2, 1], [1, 2]] and s["pixels"] == 6
  md = metrics.to_markdown(s)
  assert "IoU (building): **0.5000**" in md and "| building | 1 | 2 |" in md
  json.dumps(s)  # plain types only


def test_absent_class_has_no_iou_rather_than_a_made_up_one():
  s = metrics.summarize(np.array([[10, 0], [0, 0]]))
  assert s["iou"] is None and s["per_class"]["0"]["iou"] == 1.0 and s["miou"] == 1.0
  assert "n/a" in metrics.to_markdown(s)
