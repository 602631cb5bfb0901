"""Object-level scores: one-to-one matching at an IoU threshold, precision/recall/F1, height
errors, and touching footprints dissolved into blocks."""
import numpy as np
import pytest
import shapely

from demmae_jax.gis import objects


def test_match_is_one_to_one_and_scores_count_misses_and_false_alarms():
  ref = [shapely.box(0, 0, 10, 10), shapely.box(20, 0, 30, 10), shapely.box(40, 0, 50, 10)]
  pred = [shapely.box(1, 0, 11, 10),  # IoU 9/11 with ref 0
          shapely.box(0, 0, 10, 10),  # IoU 1 with ref 0: takes it, the shifted one is left over
          shapely.box(20, 0, 30, 4),  # IoU 0.4 with ref 1: below 0.5
          shapely.box(60, 0, 70, 10)]  # nothing there
  pairs = objects.match(pred, ref, 0.5)
  assert pairs == [(1, 0, 1.0)]
  s = objects.object_scores(pred, ref, 0.5)
  assert (s["matched"], s["precision"], s["recall"]) == (1, 0.25, pytest.approx(1 / 3))
  assert s["f1"] == pytest.approx(2 * 0.25 * (1 / 3) / (0.25 + 1 / 3))
  assert objects.object_scores(pred, ref, 0.3)["matched"] == 2
  assert objects.object_scores([], ref)["recall"] == 0.0


def test_height_errors():
  e = objects.height_errors([10.0, 12.0, np.nan, 5.0], [9.0, 13.0, 4.0, 5.0])
  assert e["n"] == 3 and e["bias_m"] == pytest.approx(0.0)
  assert e["mae_m"] == pytest.approx(2 / 3) and e["rmse_m"] == pytest.approx(np.sqrt(2 / 3))
  assert e["pearson_r"] == pytest.approx(np.corrcoef([10, 12, 5], [9, 13, 5])[0, 1])


def test_dissolve_merges_terraced_houses_and_keeps_attributes_of_single_ones():
  houses = [shapely.box(0, 0, 5, 8), shapely.box(5, 0, 10, 8), shapely.box(10, 0, 15, 8),
            shapely.box(30, 0, 40, 10)]
  blocks, attrs = objects.dissolve(houses, {"h": np.array([6.0, 7.0, 8.0, 12.0])})
  assert len(blocks) == 2
  big = int(np.argmax(shapely.area(blocks)))
  assert blocks[big].area == pytest.approx(120.0, rel=1e-3) and np.isnan(attrs["h"][big])
  assert attrs["h"][1 - big] == 12.0 and blocks[1 - big].area == pytest.approx(100.0, rel=1e-3)
