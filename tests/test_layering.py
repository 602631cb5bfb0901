"""The import rules of docs/architecture.md, written as import-linter contracts in pyproject.toml
(`[tool.importlinter]`) and checked here with `lint-imports`: every import of `demmae_jax/` and
`data_pipelines/` (also those inside functions, and relative ones), direct or through a chain of
other modules, that a contract forbids fails this test, naming the contract and the chain.

The AST walk that stood here before checked direct imports only; import-linter checks all it did
and the indirect chains too, so it is gone."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("demmae_jax", "data_pipelines")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
  exe = Path(sys.executable).with_name("lint-imports")
  if not exe.exists():
    exe = shutil.which("lint-imports")
  if exe is None:
    pytest.skip(
      "import-linter is not installed (requirements-test.txt pins it; `make venv` installs it)"
    )
  # The packages of `root`, not an installed copy; no cache file left in the tree.
  env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
  return subprocess.run(
    [str(exe), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
    cwd=root,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_the_library_keeps_its_import_rules():
  out = _lint_imports(ROOT)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "0 broken" in out.stdout


def test_a_forbidden_import_is_detected(tmp_path):
  for package in PACKAGES:
    shutil.copytree(
      ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
    )
  with open(tmp_path / "demmae_jax" / "inference" / "restore.py", "a") as f:
    f.write("\n\ndef _bad():\n  from demmae_jax.train import loop  # noqa: F401\n")
  with open(tmp_path / "data_pipelines" / "reader.py", "a") as f:
    f.write("\nimport subprocess  # noqa: E402, F401\n")
  out = _lint_imports(tmp_path)
  assert out.returncode == 1, out.stdout + out.stderr
  assert "using a trained model needs no training code BROKEN" in out.stdout
  assert "demmae_jax.inference.restore -> demmae_jax.train.loop" in out.stdout
  assert (
    "the library never runs or imports a program: scripts call the library BROKEN" in out.stdout
  )
  assert "data_pipelines.reader -> subprocess" in out.stdout
  assert "the data pipelines know no model KEPT" in out.stdout
