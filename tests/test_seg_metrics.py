"""IoU, precision, recall, F1 and the confusion matrix, with ignore index and validity mask."""

import json

import jax
import numpy as np
import pytest

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
  s = metrics.summarize(
    np.asarray(metrics.confusion_matrix(pred, label, 2)), class_names=["background", "building"]
  )
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


# ------------------------------------------------------------------------------ boundary IoU
def _reference_band(mask, width, edge):
  """Independent of the erosion: mask pixels whose chessboard distance to the nearest non-mask
  pixel (beyond the edge too when it is a boundary) is at most `width`."""
  from scipy.ndimage import distance_transform_cdt

  pad = np.pad(mask, width + 1, constant_values=edge == "unknown")
  dist = distance_transform_cdt(pad, metric="chessboard")[
    width + 1 : -width - 1, width + 1 : -width - 1
  ]
  return mask & (dist <= width)


def _square(top, left, side, shape=(48, 48)):
  m = np.zeros(shape, np.uint8)
  m[top : top + side, left : left + side] = 1
  return m


def test_inner_band_of_a_hand_worked_square():
  m = _square(1, 1, 3, (5, 5))
  ring = np.array(
    [[0, 0, 0, 0, 0], [0, 1, 1, 1, 0], [0, 1, 0, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]], bool
  )
  np.testing.assert_array_equal(metrics.inner_band(m, 1), ring)
  np.testing.assert_array_equal(metrics.inner_band(m, 2), m.astype(bool))  # all within 2 px
  # a mask filling the image's left column: the image edge is a boundary only when asked
  left = np.zeros((4, 4), bool)
  left[:, :2] = True
  np.testing.assert_array_equal(metrics.inner_band(left, 1), left & (np.arange(4) == 1))
  np.testing.assert_array_equal(metrics.inner_band(left, 1, edge="boundary"), left)


def test_inner_band_matches_a_distance_transform_reference_on_random_masks():
  from scipy.ndimage import uniform_filter

  masks = uniform_filter(np.random.default_rng(1).random((6, 40, 40)), size=(1, 5, 5)) > 0.5
  for width in (1, 2, 3):
    for edge in ("unknown", "boundary"):
      got = metrics.inner_band(masks, width, edge=edge)  # a batch: tiles must not interact
      for i in range(len(masks)):
        np.testing.assert_array_equal(
          got[i],
          _reference_band(masks[i], width, edge),
          err_msg=f"tile {i} width {width} edge {edge}",
        )


def test_boundary_iou_identical_masks_is_one_and_an_empty_pair_is_none():
  label = _square(10, 12, 20)
  b = metrics.BoundaryIoU(2)
  b.update(label, label)
  assert b.value == 1.0 and b.union == 20**2 - 16**2
  empty = metrics.BoundaryIoU(2)
  empty.update(np.zeros((8, 8)), np.zeros((8, 8)))
  assert empty.value is None and empty.summary()["iou"] is None


def shifted_square_biou(side, width, shift):
  """A square against the same square shifted by `shift` < `width` px along columns: both bands
  are rings of side^2 - (side - 2 width)^2 pixels; they share the top and bottom strips over
  side - shift columns and, on the rows between, width - shift columns on each side."""
  ring = side**2 - (side - 2 * width) ** 2
  inter = 2 * width * (side - shift) + 2 * (width - shift) * (side - 2 * width)
  return inter / (2 * ring - inter)


def test_boundary_iou_of_a_shifted_square_is_the_analytic_value():
  for side, width, shift, expected in ((20, 2, 1, 0.6), (30, 3, 2, 0.5)):
    assert shifted_square_biou(side, width, shift) == expected  # 108 / 180 and 216 / 432
    b = metrics.BoundaryIoU(width)
    b.update(_square(8, 8 + shift, side), _square(8, 8, side))
    assert b.value == pytest.approx(expected), (side, width, shift)


def test_boundary_iou_punishes_a_dilated_prediction_that_iou_forgives():
  label = _square(12, 12, 20)
  for grow, expected_biou in ((1, 76 / 228), (2, 0.0)):
    pred = _square(12 - grow, 12 - grow, 20 + 2 * grow)  # dilated by `grow` px all round
    b = metrics.BoundaryIoU(2)
    b.update(pred, label)
    iou = metrics.summarize(np.asarray(metrics.confusion_matrix(pred, label, 2)))["iou"]
    assert iou == pytest.approx(400 / (20 + 2 * grow) ** 2)  # 0.83 and 0.69
    # 1 px: the bands share the label's outermost ring (76 px) of 144 + 160 - 76
    assert b.value == pytest.approx(expected_biou) and b.value < iou / 2


def test_boundary_iou_skips_ignored_and_invalid_pixels():
  # the building runs into the unlabelled area on the right: no boundary at the ignore edge
  label = _square(10, 10, 20, (40, 40)).astype(np.int32)
  pred = label.copy()
  label[:, 25:] = metrics.IGNORE_INDEX
  pred[:, 25:] = 1  # whatever the model says where there is no truth
  b = metrics.BoundaryIoU(2)
  b.update(pred, label)
  assert b.value == 1.0
  # ring of the square cut at column 25: top/bottom strips over columns 10-24, left strip
  assert b.union == 2 * 2 * 15 + 2 * 16
  # an invalid pixel where the prediction is wrong does not count, nor its false edge
  valid = np.ones_like(label)
  pred[20, 20], valid[20, 20] = 0, 0
  b = metrics.BoundaryIoU(2)
  b.update(pred, label, valid)
  assert b.value == 1.0 and b.union == 2 * 2 * 15 + 2 * 16
  naive = metrics.BoundaryIoU(2)
  naive.update(pred, label)  # without the validity mask the hole makes a false boundary
  assert naive.value < 1.0


def test_boundary_iou_accumulates_counts_over_tiles_not_a_mean_of_ratios():
  a_label, a_pred = _square(8, 8, 20), _square(8, 9, 20)  # 108 / 180
  b_label, b_pred = _square(8, 8, 30), _square(8, 10, 30)  # 0.5 only at width 3
  whole = metrics.BoundaryIoU(2)
  whole.update(np.stack([a_pred, b_pred]), np.stack([a_label, b_label]))
  parts = metrics.BoundaryIoU(2)
  for pred, label in ((a_pred, a_label), (b_pred, b_label)):
    parts.update(pred, label)
  assert (parts.intersection, parts.union) == (whole.intersection, whole.union)
  # width 2 on the 30 px square shifted by 2: strips 2*2*28 = 112 shared, 0 on the sides
  assert whole.intersection == 108 + 112 and whole.union == 180 + (2 * 224 - 112)
  assert whole.value == pytest.approx(220 / 516)


def test_band_width_in_pixels_from_metres_or_the_diagonal():
  assert metrics.band_px(1.0, 0.5) == 2 and metrics.band_px(1.0, 2.0) == 1
  assert metrics.band_px(1.0, 0.25) == 4 and metrics.band_px(1.5, 1.0) == 2
  assert (
    metrics.band_px_from_ratio((64, 64)) == 2 and metrics.band_px_from_ratio((8, 224, 224)) == 6
  )
  b = metrics.BoundaryIoU.in_metres(0.5)
  assert b.band_px == 2 and b.summary()["band_m"] == 1.0


def test_summary_and_markdown_carry_boundary_iou_only_when_given():
  label = _square(10, 12, 20)
  pred = _square(10, 13, 20)
  cm = np.asarray(metrics.confusion_matrix(pred, label, 2))
  assert "boundary_iou" not in metrics.summarize(cm)
  b = metrics.BoundaryIoU.in_metres(0.5)
  b.update(pred, label)
  s = metrics.summarize(cm, class_names=["background", "building"], boundary=b)
  assert s["boundary_iou"] == pytest.approx(0.6) and s["boundary"]["band_px"] == 2
  assert "boundary IoU (building, band 2 px = 1 m): **0.6000**" in metrics.to_markdown(s)
  json.dumps(s)
