"""The configuration files of the `configs` package (big_vision style: `get_config(arg)` returns
a ConfigDict), loaded by name for code that is not a `config_flags` script: the experiment
harness, benchmarks and tests."""

from __future__ import annotations

import importlib
from types import ModuleType

import ml_collections


def module(name: str) -> ModuleType:
  """`configs.<name>` (configs/<name>.py)."""
  return importlib.import_module(f"configs.{name}")


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
