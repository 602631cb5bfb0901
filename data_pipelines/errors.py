"""One error type for bad input, always naming the file and the problem."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
  """Bad or unusable input data; the message starts with the offending file."""

  def __init__(self, path: str | Path, problem: str):
    self.path = str(path)
    self.problem = problem
    super().__init__(f"{path}: {problem}")
