"""Which runs a protocol (configs/experiments.py) asks for: arms, labelled sets, sizes, seeds."""

from __future__ import annotations

import dataclasses

ARMS = ("dem_mae", "imagenet_mae", "random_frozen", "unet")
ARM_NAMES = {
  "dem_mae": "(a) MAE pretrained on DEMs, frozen + UperNet",
  "imagenet_mae": "(b) MAE from ImageNet weights, frozen + UperNet",
  "random_frozen": "(c) same, random frozen encoder (control)",
  "unet": "(d) UNet from scratch",
}
DATASETS = ("delft_buildings", "delft_roads", "alexandria_buildings", "delft_buildings_lidar")


@dataclasses.dataclass(frozen=True)
class Run:
  dataset: str
  arm: str
  size: int | str  # number of training tiles, or "all" (Table 2: the whole noisy pool)
  seed: int
  norm: str = "minmax"

  @property
  def id(self) -> str:
    return f"{self.dataset}/{self.norm}/{self.arm}/n{self.size}_s{self.seed}"

  @property
  def task(self) -> str:
    return "roads" if "roads" in self.dataset else "buildings"


def items(value, kind=str) -> tuple:
  """A config tuple; `--config.sizes=10,50` on the command line arrives as ('10,50',) or '10,50'."""
  if isinstance(value, (str, int)):
    value = (value,)
  return tuple(
    kind(x) for v in value for x in (str(v).split(",") if isinstance(v, str) else [v]) if str(x)
  )


def plan(cfg) -> list[Run]:
  """The runs of `cfg.groups` in order (seed-major, so every comparison of one seed finishes
  before the next seed starts), without duplicates: the minmax runs of the normalisation ablation
  are the Table 1 runs."""
  runs: list[Run] = []
  sizes, datasets, arms = items(cfg.sizes, int), items(cfg.datasets), items(cfg.arms)
  n_sizes, n_sets, n_arms = (
    items(cfg.norm_sizes, int),
    items(cfg.norm_datasets),
    items(cfg.norm_arms),
  )
  modes = ("minmax",) + items(cfg.norm_modes)
  for seed in range(int(cfg.seeds)):
    for group in items(cfg.groups):
      if group == "table1":
        runs += [Run(d, a, n, seed) for n in sizes for d in datasets for a in arms]
      elif group == "table2":
        runs += [Run("delft_buildings_lidar", a, "all", seed) for a in items(cfg.table2_arms)]
      elif group == "norm":
        runs += [
          Run(d, a, n, seed, m) for n in n_sizes for d in n_sets for m in modes for a in n_arms
        ]
      else:
        raise ValueError(f"unknown group {group!r}: table1, table2 or norm")
  for r in runs:
    if r.arm not in ARMS or r.dataset not in DATASETS:
      raise ValueError(f"unknown arm or dataset in {r.id}: arms {ARMS}, datasets {DATASETS}")
  return list(dict.fromkeys(runs))
