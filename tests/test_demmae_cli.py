"""The `demmae` tool: declared as a console entry point, lists its commands, runs a stage's
script with its own --help (exit 0) and refuses an unknown command (exit 2)."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from demmae_jax import __main__ as cli

ROOT = Path(__file__).resolve().parent.parent


def test_entry_point_is_declared_and_every_command_has_a_target():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert project["scripts"]["demmae"] == "demmae_jax.__main__:main"
  for name, ((kind, target), _) in cli.COMMANDS.items():
    if kind == "script":
      assert (ROOT / "scripts" / target).exists(), name


def test_help_lists_the_commands_and_unknown_ones_are_refused(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert all(f"  {name}" in out for name in ("prepare", "predict", "change", "gis-evaluate"))
  assert cli.main(["nosuch"]) == 2
  assert "unknown command 'nosuch'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["predict", "finetune", "change"])
def test_command_help_exits_0(command):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  done = subprocess.run(
    [sys.executable, "-m", "demmae_jax", command, "--help"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert "--" in done.stdout and len(done.stdout.splitlines()) > 5


def test_help_into_a_closed_pipe_exits_quietly():
  """`demmae --help | head -0`: the reader is gone before the help is written; no traceback."""
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  child = subprocess.Popen(
    [sys.executable, "-m", "demmae_jax", "--help"],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )
  child.stdout.close()  # closed before the child can write: its print hits EPIPE
  err = child.stderr.read().decode()
  assert child.wait() == 0 and "Traceback" not in err, err
