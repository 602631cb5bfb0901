"""The experiment harness (demmae_jax/experiments/, scripts/run_experiments.py): a miniature
sweep on the real Delft data (delft/ahn3_cropped_{1,2}.laz at 0.5 m, BGT buildings from
delft/bgt_pand.sqlite, via data_pipelines.prepare_delft) runs end to end, writes one result per
run, skips finished runs on a rerun without touching them, and reports tables and a figure."""

import json
from pathlib import Path

import numpy as np
import pytest

from demmae_jax import config_files
from demmae_jax.experiments import draws, plan, report, runner


def protocol(name="tiny", **overrides):
  return config_files.get_config("experiments", name, **overrides)


def test_plan_is_seed_major_and_shares_the_minmax_runs_of_the_ablation():
  cfg = protocol(
    datasets=("delft_roads",),
    sizes=(10, 50),
    seeds=2,
    arms=("dem_mae", "unet"),
    groups=("table1", "norm"),
    norm_datasets=("delft_roads",),
    norm_sizes=(50,),
    norm_arms=("unet",),
    norm_modes=("relative",),
  )
  runs = plan.plan(cfg)
  assert [r.seed for r in runs] == sorted(r.seed for r in runs)
  ids = [r.id for r in runs]
  assert len(ids) == len(set(ids))
  # per seed: 2 sizes x 2 arms of Table 1, plus only the relative run (minmax/unet/n50 exists)
  assert len(runs) == 2 * (4 + 1)
  assert "delft_roads/relative/unet/n50_s1" in ids
  # a comma list from the command line means the same as a tuple
  assert (
    plan.plan(
      protocol(
        datasets=("delft_roads",),
        sizes=("10,50",),
        seeds=2,
        arms=("dem_mae,unet",),
        groups=("table1,norm",),
        norm_datasets=("delft_roads",),
        norm_sizes=("50",),
        norm_arms=("unet",),
        norm_modes=("relative",),
      )
    )
    == runs
  )


def test_disjoint_count_counts_non_overlapping_tiles():
  # 64 px tiles at stride 32 on a 128 px square: 9 tiles, of which 4 are pairwise disjoint
  windows = [(c, r, 64, 64) for r in (0, 32, 64) for c in (0, 32, 64)]
  assert draws.disjoint_count(windows) == 4
  assert draws.disjoint_count([(0, 0, 64, 64)] * 3) == 1


def test_disjoint_first_draws_take_independent_tiles_before_overlapping_crops():
  # 64 px tiles at stride 16 over a 256 px square: 13 x 13 crops, 16 pairwise disjoint at most
  windows = [(c, r, 64, 64) for r in range(0, 193, 16) for c in range(0, 193, 16)]

  def disjoint_prefix(order):  # how many leading tiles are pairwise disjoint
    k = 1
    while k < len(order) and draws.disjoint_count([windows[i] for i in order[: k + 1]]) == k + 1:
      k += 1
    return k

  first = draws.draw_order(windows, np.random.default_rng(3))
  assert sorted(first) == list(range(len(windows)))  # a permutation: every crop can be drawn
  k = disjoint_prefix(first)
  assert 9 <= k <= 16
  # maximal: every later crop overlaps one of the first k (no independent view left for later)
  assert all(
    draws.disjoint_count([windows[j] for j in first[:k]] + [windows[i]]) <= k for i in first[k:]
  )
  uniform = draws.draw_order(windows, np.random.default_rng(3), "uniform")
  assert disjoint_prefix(uniform) < k // 2  # a uniform draw soon takes overlapping crops
  with pytest.raises(ValueError, match="unknown draw"):
    draws.draw_order(windows, np.random.default_rng(3), "disjoint")


def test_an_output_folder_refuses_another_protocol(tmp_path):
  runner.check_protocol(protocol(), tmp_path)
  runner.check_protocol(protocol(seeds=5, sizes=(10,)), tmp_path)  # what to run may grow
  with pytest.raises(ValueError, match="another protocol.*steps"):
    runner.check_protocol(protocol(steps=5), tmp_path)


def test_each_arm_gets_its_finetuning_preset_and_encoder():
  cfg = protocol("cpu", imagenet="mae_pretrain_vit_base.pth", steps=150, eval_every=50, warmup=20)
  get = lambda arm, norm="minmax": runner.finetune_config(  # noqa: E731
    cfg, plan.Run("delft_roads", arm, 10, 2, norm), Path("m.json"), "runs/dem_mae_cpu"
  )
  assert (get("dem_mae").preset, get("dem_mae").init) == ("cpu_roads", "runs/dem_mae_cpu")
  assert (get("random_frozen").preset, get("random_frozen").init) == ("cpu_roads", "")
  b = get("imagenet_mae")
  assert (b.init, b.channel_adapt, tuple(b.model.head.layers)) == (
    "mae_pretrain_vit_base.pth",
    "sum",
    (3, 5, 7, 11),
  )
  assert get("unet").preset == "cpu_unet_roads" and get("unet").model.kind == "unet"
  c = get("dem_mae", "ndsm")
  assert c.data.normalisation.mode == "ndsm" and c.freeze_backbone
  assert (
    c.seed,
    c.data.seed,
    c.total_steps,
    c.eval_every_steps,
    c.checkpoint.every_steps,
    c.optim.warmup_steps,
  ) == (2, 2, 150, 50, 50, 20)
  assert (c.data.train_split, c.data.eval_split, c.data.manifest) == ("train", "val", "m.json")


@pytest.mark.realdata
@pytest.mark.slow
def test_miniature_sweep_on_delft_runs_end_to_end_and_rerun_skips_finished_runs(tmp_path):
  cfg = protocol(
    datasets=("delft_buildings",),
    sizes=(10,),
    seeds=1,
    groups=("table1",),
    arms=("imagenet_mae", "random_frozen"),
    steps=1,
    eval_every=1,
    warmup=0,
    pictures=2,
  )
  out = tmp_path / "out"
  log: list[str] = []
  counts = runner.sweep(cfg, out, log=log.append)
  assert counts["ran"] == 1 and counts["skipped_no_weights"] == 1
  assert any("imagenet_mae SKIPPED" in m and "--imagenet" in m for m in log)
  assert any(m.startswith("[1/1]") and "ETA" in m for m in log)

  results = {r["arm"]: r for r in report.load_results(out)}
  assert set(results) == {"random_frozen"}
  base = json.loads(
    (out / "data" / "delft_buildings" / "prepared" / "tiles" / "manifest.json").read_text()
  )
  for r in results.values():
    assert 0.0 <= r["test_iou"] <= 1.0 and r["steps"] == 1 and r["best_step"] == 1
    assert r["preset"] == "tiny" and r["init"] == ""
    assert r["draw"]["drawn"] == 10 and set(r["draw"]["tile_ids"]) <= set(
      base["splits"]["train"]["tile_ids"]
    )
    assert r["test"]["pixels"] > 0
    assert r["test_boundary_iou"] == r["test"]["boundary"]["iou"] is not None
    tiles = np.load(
      runner.result_path(
        out, plan.Run(**{k: r[k] for k in ("dataset", "arm", "size", "seed", "norm")})
      ).with_suffix(".tiles.npz")
    )
    assert tiles["pred"].shape == (base["splits"]["test"]["count"], 32, 32)
  # the fixed validation tiles, the whole test area
  m = json.loads((out / "data" / "delft_buildings" / "n10_s0" / "manifest.json").read_text())
  assert m["splits"]["test"]["count"] == base["splits"]["test"]["count"]
  assert m["splits"]["val"]["count"] == 8

  # a rerun runs nothing and rewrites nothing
  stamps = {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*")}
  counts = runner.sweep(cfg, out, log=log.append)
  assert counts["ran"] == 0 and counts["skipped_finished"] == 1
  assert stamps == {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*")}

  # draws of one seed are nested; another seed draws other tiles
  data = draws.Data(cfg, out / "data", log.append)
  ids = lambda n, s: set(data.manifest(plan.Run("delft_buildings", "unet", n, s))[1]["tile_ids"])  # noqa: E731
  assert ids(10, 0) < ids(50, 0) and ids(10, 1) != ids(10, 0)

  # the report fills its marked part and keeps the text around it
  assert report.report(cfg, out, "the command") == out / "report.md"  # the run folder's own
  assert (out / "results_iou_vs_tiles.png").exists() and not (tmp_path / "results.md").exists()
  doc = tmp_path / "results.md"  # a hand-written page, as docs/results.md
  doc.write_text("# Results\n\nhand-written intro\n")
  report.report(cfg, out, "the command", doc)
  report.report(cfg, out, "the command", doc)
  text = doc.read_text()
  assert text.count(report.BEGIN) == 1 and "hand-written intro" in text
  assert "*55.5*" in text and "*27.9*" in text  # the paper's Table 1 beside ours
  assert "1 of the 2 runs this command plans have results" in text
  assert "delft_buildings/minmax/imagenet_mae (n10_s0)" in text and "--imagenet PATH" in text
  assert (
    "(c) same, random frozen encoder (control) | "
    f"{100 * results['random_frozen']['test_iou']:.1f} (1)"
  ) in text
  r = results["random_frozen"]
  assert f"| {r['id']} | {100 * r['test_iou']:.1f} | {100 * r['test_boundary_iou']:.1f} |" in text
  assert (tmp_path / "results_iou_vs_tiles.png").stat().st_size > 10_000
  assert (tmp_path / "results_pred_delft_buildings.png").exists()
