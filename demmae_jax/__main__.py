"""`demmae` (also `python -m demmae_jax`): one command-line tool for every stage (pyproject [project.scripts]).

  demmae COMMAND [ARGS...]     runs the stage's script or module with ARGS
  demmae --help                lists the commands;  demmae COMMAND --help  the command's flags

The scripts under scripts/ stay the implementations (this runs them as `__main__`, so their
error contract and exit codes are unchanged); the GIS stages are modules of demmae_jax.gis. The
scripts live in the source checkout beside the package (an editable install, `pip install -e .`);
without them the command says so.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
# command -> ("script", file under scripts/) or ("module", dotted name), one line of help
COMMANDS = {
  "prepare": (("script", "prepare_data.py"), "LiDAR/rasters + labels -> tile sets; labelled areas"),
  "pretrain": (("script", "pretrain.py"), "masked-autoencoder pretraining of the DEM encoder"),
  "export": (("script", "export_encoder.py"), "export a pretrained encoder"),
  "finetune": (("script", "finetune.py"), "finetune a segmenter on labelled tiles"),
  "train": (("script", "train_model.py"), "train a segmentation model (recipes)"),
  "evaluate": (("script", "evaluate.py"), "IoU and pictures of a finetuned model on a split"),
  "predict": (("script", "predict.py"), "predict a GeoTIFF/LAZ: COGs, uncertainty, polygons, STAC"),
  "baseline": (("script", "baseline.py"), "the height-rule baseline"),
  "study": (("script", "run_study.py"), "the model study (docs/results_product.md)"),
  "experiments": (
    ("script", "run_experiments.py"),
    "the paper's protocol: Table 1 sizes x arms x seeds",
  ),
  "convert": (
    ("script", "convert_weights.py"),
    "port ImageNet MAE weights (.pth, timm, Hugging Face)",
  ),
  "probe": (("script", "probe.py"), "few-label linear probe of a pretraining run's encoder"),
  "change": (("module", "demmae_jax.gis.change"), "building change between two surveys"),
  "gis-evaluate": (
    ("module", "demmae_jax.gis.evaluate"),
    "calibration, object F1 and heights of a prediction",
  ),
}


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = [__doc__.strip().splitlines()[0], "", "usage: demmae COMMAND [ARGS...]", "", "commands:"]
  lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
  lines += ["", "demmae COMMAND --help shows a command's flags."]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  try:
    return _dispatch(list(sys.argv[1:] if argv is None else argv))
  except BrokenPipeError:
    # the reader went away (`demmae predict --help | head`): stop quietly, as a Unix filter does;
    # stdout goes to devnull so that the interpreter's exit flush does not raise again
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _dispatch(argv: list[str]) -> int:
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"demmae: error: unknown command {name!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
    return 2
  (kind, target), _ = COMMANDS[name]
  if kind == "script":
    path = SCRIPTS / target
    if not path.exists():
      print(
        f"demmae: error: {path}: no such script; `demmae {name}` needs the source checkout "
        f"(pip install -e .)",
        file=sys.stderr,
      )
      return 2
    sys.argv = [str(path), *rest]
    run = lambda: runpy.run_path(str(path), run_name="__main__")  # noqa: E731
  else:
    sys.argv = [f"demmae {name}", *rest]
    run = lambda: runpy.run_module(target, run_name="__main__", alter_sys=True)  # noqa: E731
  try:
    run()
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
