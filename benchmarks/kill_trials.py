"""SIGTERM and kill -9 of `prepare_data.py tiles`, `predict.py` and `finetune.py` at seeded random
points, on real data (the Delft AHN3 DSM and its BGT building tiles). Each trial:

  1. the folder holds earlier outputs (a tile set; a classes and a probabilities GeoTIFF; a
     finetuning workdir with a checkpoint), and the command would replace or extend them;
  2. the command starts and gets the signal at a seeded random point: in even trials anywhere in
     the run (a fraction in [0.05, 1] of the median duration of the latest uninterrupted runs: the
     machine's load changes), so during imports, model loading or compilation too; in odd trials
     inside the write window (once the command's first temporary output appears, plus a fraction
     of the window's length measured in the reference run), where a kill can leave temporaries;
  3. checked right after: every output is either byte-identical to the earlier one or byte-
     identical to what an uninterrupted run writes (never partial); for finetune the latest
     checkpoint restores and config.json / segmenter.json are unchanged; after SIGTERM no
     temporary is visible at all;
  4. the same command runs again: it must succeed, leave no temporary (a killed run's are swept),
     and give exactly the reference outputs (finetune: bit-identical parameters to an
     uninterrupted run, since a resumed run replays the same batches and randomness).

  nice -n 15 .venv/bin/python benchmarks/kill_trials.py --out /tmp/kill_trials --trials 20

prints a Markdown table (per command and signal: trials, signal before the end / after, outcomes)
and writes OUT/results.json. docs/bad_inputs.md holds the recorded run.
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TEMP_MARKS = (".tmp", "orbax-checkpoint-tmp")


def env():
  return dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")


def digest(path: Path) -> str:
  return hashlib.sha1(path.read_bytes()).hexdigest()


def content(path: Path) -> str:
  """Digest of a file's content: bytes, except TFRecords (records with their features in a fixed
  order: protobuf map order differs between identical runs) and a tile manifest (without
  `sources`, which are relative to where the folder is)."""
  if path.name.endswith(".tfrecord"):
    import tensorflow as tf

    h = hashlib.sha1()
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
      h.update(tf.train.Example.FromString(record).SerializeToString(deterministic=True))
    return h.hexdigest()
  if path.name == "manifest.json":
    m = json.loads(path.read_text())
    m.pop("sources", None)
    return hashlib.sha1(json.dumps(m, sort_keys=True).encode()).hexdigest()
  return digest(path)


def tree(folder: Path) -> dict[str, str]:
  """Relative path -> content digest of every file under `folder` (hidden ones too)."""
  return {str(p.relative_to(folder)): content(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
  return sorted(
    str(p.relative_to(folder)) for p in folder.rglob("*") if any(m in p.name for m in TEMP_MARKS)
  )


def run(cmd, log: Path, timeout=3600) -> tuple[int, float]:
  t0 = time.time()
  with open(log, "w") as f:
    rc = subprocess.run(
      cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), timeout=timeout
    ).returncode
  return rc, time.time() - t0


def watch(cmd, log: Path, folder: Path, marker, timeout=3600) -> tuple[int, float, float, float]:
  """Run to the end, noting when temporaries matching `marker` exist: (rc, seconds, first, last)."""
  t0, first, last = time.time(), None, None
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env())
    while proc.poll() is None and time.time() - t0 < timeout:
      if any(marker(p.name) for p in folder.rglob("*")):
        first = first if first is not None else time.time() - t0
        last = time.time() - t0
      time.sleep(0.02)
    proc.wait()
  return proc.returncode, time.time() - t0, first or 0.0, last or 0.0


def interrupt(
  cmd, delay: float, sig: int, log: Path, folder: Path, marker=None
) -> tuple[int, bool]:
  """(exit code, whether the signal was sent before the process ended). With `marker`, `delay`
  counts from the first temporary matching it."""
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env())
    if marker is not None:
      while proc.poll() is None and not any(marker(p.name) for p in folder.rglob("*")):
        time.sleep(0.01)
    try:
      proc.wait(timeout=delay)
      return proc.returncode, False
    except subprocess.TimeoutExpired:
      proc.send_signal(sig)
      return proc.wait(timeout=600), True


# ------------------------------------------------------------------------------ the commands
class Tiles:
  name = "prepare_data.py tiles"

  def __init__(self, base: Path, dsm: Path, label: Path):
    self.dsm, self.label = dsm, label

  def command(self, folder: Path):
    return [
      PY,
      str(ROOT / "scripts" / "prepare_data.py"),
      "tiles",
      "--dem",
      str(self.dsm),
      "--label",
      str(self.label),
      "--tile-size",
      "32",
      "--stride",
      "16",
      "--min-labelled",
      "0.25",
      "--out",
      str(folder / "t"),
      "--overwrite",
    ]

  def earlier(self, folder: Path, reference: Path):
    """An earlier tile set of other settings, which the command replaces (--overwrite)."""
    shutil.copytree(reference / "earlier_t", folder / "t")

  def outputs(self, folder: Path) -> dict[str, dict]:
    return {"t": tree(folder / "t") if (folder / "t").exists() else None}

  @staticmethod
  def writing(name: str) -> bool:  # the tile folder's temporary
    return name.startswith(".t.") and name.endswith(".tmp")


class Predict:
  name = "predict.py"

  def __init__(self, base: Path, dsm: Path, workdir: Path):
    self.dsm, self.workdir = dsm, workdir

  def command(self, folder: Path):
    return [
      PY,
      str(ROOT / "scripts" / "predict.py"),
      f"--workdir={self.workdir}",
      f"--input={self.dsm}",
      f"--output={folder / 'o.tif'}",
      f"--probabilities={folder / 'p.tif'}",
      "--overwrite",
      "--block=128",
    ]

  def earlier(self, folder: Path, reference: Path):
    for name in ("o.tif", "p.tif"):
      shutil.copy(reference / "earlier_predict" / name, folder / name)

  def outputs(self, folder: Path):
    return {n: digest(folder / n) if (folder / n).exists() else None for n in ("o.tif", "p.tif")}

  @staticmethod
  def writing(name: str) -> bool:  # the GeoTIFFs' temporaries (not the LAS scratch folder)
    return name.startswith((".o.tif.", ".p.tif.")) and "scratch" not in name


class Finetune:
  name = "finetune.py"

  def __init__(self, base: Path, manifest: Path):
    self.manifest = manifest

  def command(self, folder: Path):
    return [
      PY,
      str(ROOT / "scripts" / "finetune.py"),
      f"--config={ROOT / 'configs' / 'finetune.py'}:tiny",
      f"--workdir={folder / 'w'}",
      f"--config.data.manifest={self.manifest}",
      "--config.total_steps=8",
      "--config.optim.warmup_steps=2",
      "--config.eval_every_steps=0",
      "--config.checkpoint.every_steps=2",
      "--config.log.progress=False",
      "--config.log.tensorboard=False",
    ]

  def earlier(self, folder: Path, reference: Path):
    shutil.copytree(reference / "earlier_w", folder / "w")  # a run stopped at step 2

  def outputs(self, folder: Path):
    """The latest checkpoint's parameters (any step: a resumed run moves on) and the workdir's
    identity files (never rewritten)."""
    w = folder / "w"
    return {
      "params": params_digest(w),
      "identity": {
        n: digest(w / n) if (w / n).exists() else None for n in ("config.json", "segmenter.json")
      },
    }

  @staticmethod
  def writing(name: str) -> bool:  # a checkpoint being saved
    return "orbax-checkpoint-tmp" in name


def params_digest(workdir: Path) -> str | None:
  """Digest of the latest checkpoint's parameters (None: it does not restore)."""
  code = (
    "import sys, hashlib, numpy as np, jax\n"
    "from demmae_jax.inference.restore import load_trained\n"
    "from flax import nnx\n"
    "m, _, s = load_trained(sys.argv[1], 'latest')\n"
    "h = hashlib.sha1()\n"
    "for leaf in jax.tree.leaves(nnx.state(m, nnx.Param)): h.update(np.asarray(leaf).tobytes())\n"
    "print(s, h.hexdigest())\n"
  )
  done = subprocess.run([PY, "-c", code, str(workdir)], capture_output=True, text=True, env=env())
  return done.stdout.strip().splitlines()[-1] if done.returncode == 0 else None


# ------------------------------------------------------------------------------ setup
def setup(base: Path) -> dict:
  """Real inputs and reference outputs, made once: Delft rasters and building tiles, a
  finetuned workdir, and each command's uninterrupted result and duration."""
  from data_pipelines.prepare import prepare_delft

  base.mkdir(parents=True, exist_ok=True)
  ref = base / "reference"
  if not (ref / "done.json").exists():
    shutil.rmtree(ref, ignore_errors=True)
    ref.mkdir()
    manifest = prepare_delft(ref / "delft", "buildings", tile_size=32, stride=16, progress=False)
    delft = manifest.parent.parent
    info = {
      "manifest": str(manifest),
      "dsm": str(delft / "rasters" / "dsm.tif"),
      "label": str(delft / "labels" / "buildings.tif"),
    }
    # earlier outputs the trials' commands replace
    rc, _ = run(
      [
        PY,
        str(ROOT / "scripts" / "prepare_data.py"),
        "tiles",
        "--dem",
        info["dsm"],
        "--tile-size",
        "64",
        "--out",
        str(ref / "earlier_t"),
      ],
      ref / "earlier_t.log",
    )
    assert rc == 0, (ref / "earlier_t.log").read_text()[-2000:]
    ft = Finetune(ref, manifest)
    rc, _ = run(ft.command(ref), ref / "w.log")  # the model the predict trials use
    assert rc == 0, (ref / "w.log").read_text()[-2000:]
    shutil.move(ref / "w", ref / "model")
    info["workdir"] = str(ref / "model")
    os.makedirs(ref / "earlier_predict")
    pr = Predict(ref, Path(info["dsm"]), ref / "model")
    rc, _ = run(pr.command(ref / "earlier_predict") + ["--overlap=0"], ref / "earlier_predict.log")
    assert rc == 0, (ref / "earlier_predict.log").read_text()[-2000:]
    # the finetune trials start from a run stopped after its first checkpoint (step 2)
    code = (
      "import sys\nfrom demmae_jax import config_files\nfrom demmae_jax.train import finetune\n"
      "c = config_files.get_config('finetune', 'tiny', **{'data.manifest': sys.argv[1], 'total_steps': 8, "
      "'optim.warmup_steps': 2, 'eval_every_steps': 0, 'checkpoint.every_steps': 2, "
      "'log.progress': False, 'log.tensorboard': False})\n"
      "finetune.run(c, sys.argv[2], stop_after=2)\n"
    )
    done = subprocess.run(
      [PY, "-c", code, str(manifest), str(ref / "earlier_w")],
      capture_output=True,
      text=True,
      env=env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (ref / "done.json").write_text(json.dumps(info))
  info = json.loads((ref / "done.json").read_text())
  return info


def reference_outputs(cmd, base: Path) -> tuple[dict, float, float]:
  """The command's uninterrupted outputs, duration and write window (from the earlier outputs)."""
  ref = base / "reference"
  key = ref / f"ref_{cmd.__class__.__name__}.json"
  if key.exists():
    r = json.loads(key.read_text())
    return r["outputs"], r["seconds"], r["write_seconds"]
  folder = ref / f"run_{cmd.__class__.__name__}"
  shutil.rmtree(folder, ignore_errors=True)
  folder.mkdir()
  cmd.earlier(folder, ref)
  rc, seconds, first, last = watch(cmd.command(folder), folder / "log.txt", folder, cmd.writing)
  assert rc == 0, (folder / "log.txt").read_text()[-3000:]
  outputs = cmd.outputs(folder)
  write = max(last - first, 0.1)
  key.write_text(json.dumps({"outputs": outputs, "seconds": seconds, "write_seconds": write}))
  return outputs, seconds, write


# ------------------------------------------------------------------------------ a trial
def trial(
  cmd, base: Path, sig: int, delay: float, earlier: dict, reference: dict, index: int, aimed: bool
) -> dict:
  folder = base / "trials" / f"{cmd.__class__.__name__}_{signal.Signals(sig).name}_{index:02d}"
  shutil.rmtree(folder, ignore_errors=True)
  folder.mkdir(parents=True)
  cmd.earlier(folder, base / "reference")
  rc, in_time = interrupt(
    cmd.command(folder),
    delay,
    sig,
    folder / "interrupted.log",
    folder,
    cmd.writing if aimed else None,
  )
  after = cmd.outputs(folder)
  if isinstance(cmd, Finetune):  # the latest checkpoint restores; config and spec unchanged
    intact = after["params"] is not None and after["identity"] == earlier["identity"]
  else:  # each output the earlier one or the complete new one, never partial
    intact = all(after[k] in (earlier[k], reference[k]) for k in after)
  left = temporaries(folder)
  rc2, next_seconds = run(cmd.command(folder), folder / "next.log")
  final = cmd.outputs(folder)
  result = {
    "command": cmd.name,
    "signal": signal.Signals(sig).name,
    "delay_s": round(delay, 2),
    "aimed_at_write": aimed,
    "signal_before_end": in_time,
    "rc": rc,
    "outputs_intact": bool(intact),
    "temporaries_after_signal": left,
    "next_rc": rc2,
    "next_seconds": round(next_seconds, 1),
    "temporaries_after_next": temporaries(folder),
    "next_equals_reference": final == reference,
  }
  log = (folder / "interrupted.log").read_text(errors="replace")
  result["said_sigterm"] = "stopped by SIGTERM" in log or "signal 15 received" in log
  result["ok"] = (
    intact
    and rc2 == 0
    and not result["temporaries_after_next"]
    and result["next_equals_reference"]
    and (sig != signal.SIGTERM or not left)
  )
  if result["ok"]:
    shutil.rmtree(folder)  # keep the folders of failed trials to look at
  return result


def main() -> None:
  if sys.argv[1:2] == ["--table"]:  # the table of a results.json
    print(table(json.loads(Path(sys.argv[2]).read_text())))
    return
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--out", type=Path, required=True, help="working folder (reused between runs)")
  p.add_argument("--trials", type=int, default=20, help="trials per command and signal")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--commands", nargs="+", default=["tiles", "predict", "finetune"])
  a = p.parse_args()
  import numpy as np

  info = setup(a.out)
  commands = {
    "tiles": Tiles(a.out, Path(info["dsm"]), Path(info["label"])),
    "predict": Predict(a.out, Path(info["dsm"]), Path(info["workdir"])),
    "finetune": Finetune(a.out, Path(info["manifest"])),
  }
  results_path = a.out / "results.json"
  results = json.loads(results_path.read_text()) if results_path.exists() else []
  done = {(r["command"], r["signal"], r["index"]) for r in results}
  for name in a.commands:
    cmd = commands[name]
    reference, seconds, write = reference_outputs(cmd, a.out)
    probe = a.out / "probe"
    shutil.rmtree(probe, ignore_errors=True)
    probe.mkdir()
    cmd.earlier(probe, a.out / "reference")
    earlier = cmd.outputs(probe)
    shutil.rmtree(probe)
    print(
      f"{cmd.name}: an uninterrupted run takes {seconds:.1f} s, its outputs are being written "
      f"for {write:.1f} s",
      flush=True,
    )
    for sig in (signal.SIGTERM, signal.SIGKILL):
      rng = np.random.default_rng([a.seed, sig, list(commands).index(name)])
      fractions = rng.uniform(0.05, 1.0, a.trials)
      durations = [seconds]
      for i, fraction in enumerate(fractions):
        if (cmd.name, signal.Signals(sig).name, i) in done:
          continue
        aimed = i % 2 == 1
        delay = fraction * (write if aimed else float(np.median(durations[-5:])))
        r = trial(cmd, a.out, sig, delay, earlier, reference, i, aimed)
        durations.append(r["next_seconds"])
        r["index"] = i
        results.append(r)
        results_path.write_text(json.dumps(results, indent=1))
        print(json.dumps(r), flush=True)
  print(table(results))


def table(results: list[dict]) -> str:
  rows = [
    "| command | signal | trials | aimed at the write | interrupted | exit codes | "
    "outputs intact | said so (SIGTERM) | temporaries right after | next run ok | "
    "temporaries after next run | next run = uninterrupted run |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  keys = sorted({(r["command"], r["signal"]) for r in results})
  for command, sig in keys:
    rs = [r for r in results if (r["command"], r["signal"]) == (command, sig)]
    # the signal arrived before the work was done: an exit code other than 0, or a training run
    # that saved and stopped on it (exit 0 by design)
    during = [r for r in rs if r["rc"] != 0 or r["said_sigterm"]]
    codes = {}
    for r in rs:
      codes[r["rc"]] = codes.get(r["rc"], 0) + 1
    rows.append(
      f"| {command} | {sig} | {len(rs)} | {sum(r.get('aimed_at_write', False) for r in rs)} | "
      f"{len(during)} | " + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())) + " | "
      f"{sum(r['outputs_intact'] for r in rs)}/{len(rs)} | "
      + (f"{sum(r['said_sigterm'] for r in during)}/{len(during)}" if sig == "SIGTERM" else "n/a")
      + " | "
      f"{sum(bool(r['temporaries_after_signal']) for r in rs)} trials | "
      f"{sum(r['next_rc'] == 0 for r in rs)}/{len(rs)} | "
      f"{sum(bool(r['temporaries_after_next']) for r in rs)} trials | "
      f"{sum(r['next_equals_reference'] for r in rs)}/{len(rs)} |"
    )
  return "\n".join(rows)


if __name__ == "__main__":
  main()
