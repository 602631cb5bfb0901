"""The memory plan's prediction against the memory a run really takes, on CPU (host RSS).

  .venv/bin/python benchmarks/plan_vs_rss.py --presets tiny cpu_rasters --steps 3
  .venv/bin/python benchmarks/plan_vs_rss.py --workdirs runs/base_as_typed   # a run made already

For each `configs/dem_pretrain.py` preset it runs `scripts/pretrain.py` for a few steps in a fresh
workdir (its own process: the peak is that process's alone), then reads the workdir:
`memory_plan.json` (the plan's per-device peak, from XLA's analysis of the compiled step, and the
process's RSS when the plan was made, before any train state existed: Python, JAX, the input
rasters) and `metrics.jsonl` (`peak_memory_gib`: the process's peak RSS, VmHWM, at each logged
step). On one CPU device, the measured cost of training is peak RSS - RSS at the plan; the plan
predicts it as its per-device peak (train state + batch + activations + temporaries).
Extra arguments after `--` go to every run (e.g. `-- --config.memory.limit=10GiB`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB, MiB = 2**30, 2**20


def run(preset: str, steps: int, workdir: Path, extra: list[str]) -> None:
  cmd = [
    sys.executable,
    str(ROOT / "scripts" / "pretrain.py"),
    f"--config={ROOT / 'configs' / 'dem_pretrain.py'}:{preset}",
    f"--workdir={workdir}",
    f"--config.total_steps={steps}",
    "--config.optim.warmup_steps=1",
    "--config.log.every_steps=1",
    "--config.log.progress=False",
    "--config.log.picture_every_steps=0",
    "--config.eval_every_steps=0",
    "--config.checkpoint.every_steps=1000000",
    *extra,
  ]
  env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
  subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def summarise(name: str, workdir: Path) -> dict:
  plan = json.loads((workdir / "memory_plan.json").read_text())
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  peaks = [r["peak_memory_gib"] * GiB for r in rows if "peak_memory_gib" in r]
  if not peaks:
    raise SystemExit(f"{workdir}: no logged step with peak_memory_gib")
  predicted, before = plan["predicted_peak_bytes"], plan["host_rss_at_plan_bytes"]
  measured = max(peaks) - before
  m = plan["memory"]
  return dict(
    name=name,
    plan=f"{plan['grad_accum_steps']} x {plan['micro_batch_per_device']}"
    + (", remat" if plan.get("remat") else ""),
    global_batch=plan["global_batch"],
    state=m["params"] + m["opt_state"] + m["rest"],
    temp=m["temp"],
    predicted=predicted,
    before=before,
    peak=max(peaks),
    measured=measured,
    ratio=measured / predicted,
    steps=len(peaks),
  )


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--presets", nargs="*", default=["tiny", "cpu_rasters"])
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--workdirs", nargs="*", default=[], help="summarise runs made already")
  ap.add_argument("extra", nargs="*", help="after --: overrides for every run")
  args = ap.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for p in args.presets:
      wd = Path(tmp) / p
      run(p, args.steps, wd, args.extra)
      rows.append(summarise(" ".join([p, *args.extra]), wd))
      print(f"{p}: done", file=sys.stderr, flush=True)
  rows += [summarise(Path(w).name, Path(w)) for w in args.workdirs]
  mib = lambda x: f"{x / MiB:,.0f}"
  print(
    "| run | global batch | plan (micro-batches x rows) | state | temporaries | predicted "
    "peak | RSS at plan | peak RSS | measured (peak - at plan) | measured / predicted |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['name']} | {r['global_batch']} | {r['plan']} | {mib(r['state'])} | "
      f"{mib(r['temp'])} | **{mib(r['predicted'])}** | {mib(r['before'])} | {mib(r['peak'])} | "
      f"**{mib(r['measured'])}** | {r['ratio']:.2f} |"
    )
  print("(MiB; one CPU device; peak RSS over the logged steps)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
