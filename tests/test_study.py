"""The product study's bookkeeping (demmae_jax/study.py): aggregation over seeds, the doc block it
rewrites, the window each arm is scored with, and the arms' configs."""
import json

import pytest

from demmae_jax import study


def _result(out, run_id, arm, task, tile, area):
  path = out / "results" / f"{run_id}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"id": run_id, "arm": arm, "task": task, "tile_iou": tile,
                              "area_iou": area, "area": {"iou": area, "boundary_iou": area / 2}}))


def test_report_is_mean_and_sample_std_over_seeds(tmp_path):
  for seed, (tile, area) in enumerate([(0.70, 0.79), (0.72, 0.80), (0.74, 0.81)]):
    _result(tmp_path, f"delft/buildings/unet_ndsm/n10_s{seed}", "unet_ndsm", "buildings", tile, area)
  _result(tmp_path, "loao/roads/gothenburg/unet_ndsm/s0", "unet_ndsm", "roads", 0.5, 0.6)
  text = study.report(tmp_path)
  assert "| buildings | UNet, nDSM input (recommended) | 72.0 ± 2.0 (3) | 80.0 ± 1.0 (3) | 40.0 ± 0.5 (3) |" in text
  assert "| roads | gothenburg | UNet, nDSM input (recommended) | 50.0 (1) | 60.0 (1) | 30.0 (1) |" in text


def test_write_into_replaces_only_the_generated_block(tmp_path):
  doc = tmp_path / "r.md"
  doc.write_text(f"intro\n{study.BEGIN}\nold\n{study.END}\noutro\n")
  study.write_into(doc, "new table")
  assert doc.read_text() == f"intro\n{study.BEGIN}\nnew table\n{study.END}\noutro\n"
  (tmp_path / "plain.md").write_text("no markers")
  with pytest.raises(ValueError, match="no .* block"):
    study.write_into(tmp_path / "plain.md", "x")


def test_area_windows_follow_the_normalisation_and_the_architecture():
  unet = {"kind": "unet", "tile_size": 64, "normalisation": {"mode": "ndsm"}}
  assert study.area_predict(unet)["window"] == study.AREA_PREDICT["window"]
  assert study.area_predict({**unet, "normalisation": {"mode": "minmax"}})["window"] == 64
  assert study.area_predict({**unet, "kind": "hybrid"})["window"] == 64


@pytest.mark.parametrize("arm", sorted(study.ARMS))
def test_every_arm_builds_a_valid_finetuning_config(arm, tmp_path):
  c = study.finetune_config(arm, "roads", tmp_path / "m.json", seed=2)
  assert c.seed == 2 and c.data.seed == 2 and c.total_steps == study.RECIPE["total_steps"]
  assert c.data.manifest == str(tmp_path / "m.json")
  if arm == "hybrid_dem":
    assert c.init == study.DEM_ENCODER
