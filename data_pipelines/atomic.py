"""Atomic outputs: write beside the target under a temporary name, rename on success.

A crash or an exception never leaves a half-written file or folder under the final name, and no
run replaces an earlier output unless asked to (`overwrite=True`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def refuse_existing(path: str | Path, overwrite: bool) -> None:
  path = Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _remove(path: Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  elif path.exists() or path.is_symlink():
    path.unlink()


@contextlib.contextmanager
def atomic_file(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
  """Yields a temporary path in the target's folder; renamed to `path` if the block succeeds."""
  path = Path(path)
  refuse_existing(path, overwrite)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  tmp = Path(tmp)
  os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get ordinary permissions
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
  """Yields a temporary folder; it replaces `path` only if the block succeeds."""
  path = Path(path)
  refuse_existing(path, overwrite)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
  try:
    yield tmp
    if path.exists():  # overwrite: move the old one aside, put it back if the swap fails
      old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
      os.replace(path, old / "x")
      try:
        os.replace(tmp, path)
      except BaseException:
        os.replace(old / "x", path)
        old.rmdir()  # rmdir, not rmtree: never deletes the earlier output
        raise
      _remove(old)
    else:
      os.replace(tmp, path)
  finally:
    if tmp.exists():
      _remove(tmp)
