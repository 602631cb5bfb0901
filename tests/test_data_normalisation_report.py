"""The normalisation report's measures, and its main finding on the real Delft data."""

import numpy as np
import pytest

from data_pipelines.normalisation_report import normalisation_report, separation


def test_separation_measures_on_known_distributions():
  rng = np.random.default_rng(0)
  a = rng.normal(size=20_000)
  same = separation(a, rng.normal(size=20_000))
  assert same["auc"] == pytest.approx(0.5, abs=0.01) and same["overlap"] > 0.95
  apart = separation(a + 100, a)
  assert apart["auc"] == 1.0 and apart["overlap"] == 0.0
  # two unit normals one std apart: AUC = Phi(1 / sqrt(2)) = 0.760, overlap = 2 Phi(-1/2) = 0.617
  shifted = separation(rng.normal(1, 1, 200_000), rng.normal(0, 1, 200_000))
  assert shifted["auc"] == pytest.approx(0.760, abs=0.005)
  assert shifted["overlap"] == pytest.approx(0.617, abs=0.01)
  ties = separation(np.array([1.0, 1.0]), np.array([1.0, 1.0]))
  assert ties["auc"] == 0.5


@pytest.mark.realdata
@pytest.mark.slow
def test_minmax_road_values_depend_on_tile_size_fixed_scale_ones_do_not():
  """Reads delft/ahn3_cropped_{1,2}.laz, delft/bgt_pand.sqlite, delft/bgt_wegdeel.sqlite."""
  report = normalisation_report(tile_sizes=(64, 224))
  road = lambda size, mode: report["tiles"][size][mode]["building_vs_road"]["mean_b"]
  assert road(64, "minmax") - road(224, "minmax") > 0.03  # measured 0.198 -> 0.154
  for mode in ("relative", "ndsm"):
    assert abs(road(64, mode) - road(224, mode)) < 0.01  # measured 0.088 -> 0.085, 0.078 -> 0.075
  for size in (64, 224):
    for mode in ("minmax", "zscore", "relative", "ndsm"):
      assert report["tiles"][size][mode]["building_vs_road"]["auc"] > 0.8  # buildings stand out
