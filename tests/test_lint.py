"""`ruff check` finds nothing and `ruff format` changes nothing (both configured in
pyproject.toml): a new finding or an unformatted file fails here, not only under `make lint` or
pre-commit."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("demmae_jax", "data_pipelines", "scripts", "configs", "benchmarks", "tests")


def _ruff() -> list[str] | None:
  exe = Path(sys.executable).with_name("ruff")
  if exe.exists():
    return [str(exe)]
  found = shutil.which("ruff")
  return [found] if found else None


def test_ruff_check_is_clean():
  ruff = _ruff()
  if ruff is None:
    pytest.skip("ruff is not installed (requirements-test.txt pins it; `make venv` installs it)")
  out = subprocess.run(
    [*ruff, "check", "--no-cache", "--output-format", "concise", *PATHS],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format_leaves_the_tree_unchanged():
  ruff = _ruff()
  if ruff is None:
    pytest.skip("ruff is not installed (requirements-test.txt pins it; `make venv` installs it)")
  out = subprocess.run(
    [*ruff, "format", "--check", "--no-cache", *PATHS], cwd=ROOT, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stdout + out.stderr
