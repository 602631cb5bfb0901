#!/usr/bin/env python
"""Two local jax.distributed processes pretraining from a corpus (data_pipelines/corpus_reader.py)
against one process: each process reads only the shard streams of its batch rows, and the losses
must be the same (to float tolerance: the gradient reductions run in another order).

Both runs use 2 CPU devices in all (one process with two, or two processes with one each) and
the tiny preset on `--corpus` (e.g. the 64 px shared-data corpus of docs/data.md).

  python benchmarks/corpus_two_process.py --corpus /tmp/corpus_t64 --work /tmp/two_process [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env(devices: int) -> dict:
  return dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="2",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
  )


def _command(workdir: Path, corpus: str, steps: int, extra: list[str]) -> list[str]:
  return [
    sys.executable,
    str(ROOT / "scripts" / "pretrain.py"),
    "--config=configs/dem_pretrain.py:tiny",
    f"--workdir={workdir}",
    f"--config.data.corpus_tiles={corpus}",
    f"--config.total_steps={steps}",
    "--config.optim.warmup_steps=2",
    "--config.checkpoint.every_steps=1000",
    "--config.log.every_steps=1",
    "--config.log.picture_every_steps=0",
    "--config.log.progress=False",
    "--config.eval_every_steps=0",
    *extra,
  ]


def _losses(workdir: Path) -> list[float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if "loss" in r]


def main() -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--corpus", required=True)
  p.add_argument("--work", default="/tmp/corpus_two_process")
  p.add_argument("--steps", type=int, default=8)
  a = p.parse_args()
  work = Path(a.work)
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir(parents=True)
  one = work / "one"
  subprocess.run(
    _command(one, a.corpus, a.steps, []),
    env=_env(2),
    cwd=ROOT,
    check=True,
    stdout=subprocess.DEVNULL,
    stderr=open(work / "one.log", "w"),
  )
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  two = work / "two"
  procs = [
    subprocess.Popen(
      _command(
        two,
        a.corpus,
        a.steps,
        [
          f"--config.distributed.coordinator_address=127.0.0.1:{port}",
          "--config.distributed.num_processes=2",
          f"--config.distributed.process_id={i}",
        ],
      ),
      env=_env(1),
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=open(work / f"two_{i}.log", "w"),
    )
    for i in range(2)
  ]
  codes = [q.wait(timeout=900) for q in procs]
  if any(codes):
    print(f"two-process run failed: exit codes {codes}; see {work}/two_*.log")
    return 1
  l1, l2 = _losses(one), _losses(two)
  worst = max(abs(x - y) / abs(x) for x, y in zip(l1, l2))
  print(
    json.dumps(
      {
        "steps": a.steps,
        "one_process": [round(x, 6) for x in l1],
        "two_processes": [round(x, 6) for x in l2],
        "max_relative_difference": worst,
      }
    )
  )
  return 0 if len(l1) == len(l2) == a.steps and worst < 1e-4 else 1


if __name__ == "__main__":
  sys.exit(main())
