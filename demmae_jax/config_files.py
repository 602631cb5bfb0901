"""The configuration files under `configs/` (big_vision style: `get_config(arg)` returns a
ConfigDict), loaded by name for code that is not a `config_flags` script: the experiment
harness, benchmarks and tests."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import ml_collections

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def module(name: str) -> ModuleType:
  """`configs/<name>.py` as a module."""
  spec = importlib.util.spec_from_file_location(f"_configs_{name}", CONFIGS / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def get_config(name: str, arg: str | None = None, **overrides) -> ml_collections.ConfigDict:
  """`configs/<name>.py:<arg>` with dotted overrides (`**{"optim.lr": 1e-3}`) applied while the
  config is locked, as `--config.key=value` is: a misspelt key is an error."""
  config = module(name).get_config(arg)
  for dotted, value in overrides.items():
    *sections, key = dotted.split(".")
    target = config
    for part in sections:
      target = target[part]
    target[key] = value
  return config
