"""The programs under scripts/ loaded as modules, so that tests call their `main` in process."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> ModuleType:
  """scripts/<name>.py as a fresh module (its `if __name__ == "__main__"` block does not run)."""
  spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
