"""Where the shared real data lives: resolved in one place.

`../shared/data` beside the project's root, or `$DEMMAE_SHARED_DATA`.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_VAR = "DEMMAE_SHARED_DATA"


class SharedDataMissing(FileNotFoundError):
  pass


def shared_data_dir() -> Path:
  """The shared data folder; a clear error if it is not there."""
  path = Path(os.environ.get(ENV_VAR) or PROJECT_ROOT.parent / "shared" / "data")
  if not path.is_dir():
    raise SharedDataMissing(
      f"shared real data not found at {path}: put the project beside ../shared/data "
      f"or set {ENV_VAR} to its location"
    )
  return path


def shared_file(relative: str) -> Path:
  """A file inside the shared data folder, e.g. 'delft/ahn3_cropped_1.laz'."""
  path = shared_data_dir() / relative
  if not path.exists():
    raise SharedDataMissing(
      f"{path} is missing from the shared data folder ({ENV_VAR} to override)"
    )
  return path
