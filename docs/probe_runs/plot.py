"""The probe curves of docs/pretraining.md (pretraining ablation): python docs/probe_runs/plot.py OUT.png"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

runs = {"city corpus, plain MSE, 8,000 steps": "docs/probe_runs/city_long_{t}.json",
        "city corpus, plain MSE": "docs/probe_runs/city_plain_{t}.json",
        "city corpus, norm-pixel targets": "docs/probe_runs/city_normpix_{t}.json",
        "all corpus (79 % rural), plain MSE": "docs/probe_runs/cpu_hr_last_block.json"}
missing = {("roads", "all corpus (79 % rural), plain MSE")}  # its roads probe was not run
fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
for ax, task in zip(axes, ("buildings", "roads")):
  for name, path in runs.items():
    if (task, name) in missing:
      continue
    try:
      rs = json.load(open(path.format(t=task)))["results"]
    except FileNotFoundError:
      continue
    ax.errorbar([r["step"] for r in rs], [100 * r["iou"] for r in rs],
                yerr=[100 * r["iou_std"] for r in rs], marker="o", capsize=3, label=name)
  ax.set_title(f"Delft {task}, 10 tiles, linear probe (3 draws)", fontsize=9)
  ax.set_xlabel("pretraining step (0 = random initialisation)")
  ax.set_ylabel("probe IoU %")
axes[0].legend(fontsize=7)
fig.tight_layout()
fig.savefig(sys.argv[1], dpi=110)
