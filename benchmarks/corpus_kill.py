#!/usr/bin/env python
"""kill -9 in the middle of a corpus build, then the same command again: is the output the
uninterrupted build's, byte for byte (every file, no temporary left)?

Builds the shared data (scripts/prepare_data.py corpus-beam --shared-data) once without
interruption, then per trial starts the same build into a fresh folder, SIGKILLs its whole process
group (the Beam workers too) after a random delay within the uninterrupted build's duration,
reruns it to completion and compares every file's SHA-256 with the uninterrupted build's.

  python benchmarks/corpus_kill.py --work /tmp/corpus_kill --trials 3 [--workers 2] [-- BUILD FLAGS]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def digest(folder: Path) -> dict[str, str]:
  return {
    str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(folder.rglob("*"))
    if p.is_file()
  }


def build_command(out: Path, workers: int, flags: list[str]) -> list[str]:
  beam = (
    [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    if workers > 1
    else []
  )
  return [
    sys.executable,
    str(ROOT / "scripts" / "prepare_data.py"),
    "corpus-beam",
    "--shared-data",
    "--out",
    str(out),
    *flags,
    *beam,
  ]


def run(cmd: list[str], log: Path) -> float:
  t = time.time()
  with open(log, "w") as f:
    subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
  return time.time() - t


def main() -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--work", default="/tmp/corpus_kill")
  p.add_argument("--trials", type=int, default=3)
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "flags",
    nargs="*",
    default=["--cell-size", "0.5", "--tile-size", "64", "--stride", "32", "--held-out", "none"],
  )
  a = p.parse_args()
  work = Path(a.work)
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir(parents=True)
  ref = work / "uninterrupted"
  seconds = run(build_command(ref, a.workers, a.flags), work / "uninterrupted.log")
  want = digest(ref)
  print(f"uninterrupted: {seconds:.1f} s, {len(want)} files", flush=True)
  import random

  rng = random.Random(a.seed)
  results = []
  for trial in range(a.trials):
    out = work / f"trial{trial}"
    delay = rng.uniform(0.2, 0.9) * seconds
    with open(work / f"trial{trial}.killed.log", "w") as f:
      proc = subprocess.Popen(
        build_command(out, a.workers, a.flags),
        stdout=f,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
      )
      time.sleep(delay)
      finished_before_kill = proc.poll() is not None
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
    built = len(list((out / "sources").glob("*/source.json"))) if (out / "sources").exists() else 0
    leftovers = sorted(str(p.relative_to(out)) for p in out.rglob(".*")) if out.exists() else []
    run(build_command(out, a.workers, a.flags), work / f"trial{trial}.rerun.log")
    got = digest(out)
    same = got == want
    results.append(
      {
        "trial": trial,
        "kill_after_s": round(delay, 1),
        "finished_before_kill": finished_before_kill,
        "sources_complete_at_kill": built,
        "temporaries_at_kill": len(leftovers),
        "identical_after_rerun": same,
        "differing": sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))[:5],
      }
    )
    print(json.dumps(results[-1]), flush=True)
  ok = all(r["identical_after_rerun"] for r in results)
  print(
    f"{sum(r['identical_after_rerun'] for r in results)}/{len(results)} trials identical to "
    "the uninterrupted build"
  )
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
