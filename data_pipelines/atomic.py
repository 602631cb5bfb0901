"""Atomic outputs: write beside the target under a temporary name, rename on success.

A crash or an exception never leaves a half-written file or folder under the final name, and no
run replaces an earlier output unless asked to (`overwrite=True`).

Temporaries are named `.<target>.<host>-<pid>.<random>.tmp`: an exception or a SIGTERM (the CLIs
turn it into an exception) removes them, and a run killed outright (kill -9, power loss) leaves
them for the next write into the same folder, which removes those whose process is gone
(`sweep_stale`). Folders and files get ordinary permissions (as `mkdir`/`open` would give under the
umask), not tempfile's private 0700/0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from data_pipelines.errors import DataError

# Short and dot-free, so that a temporary's name says which host's process owns it.
HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_STALE = re.compile(
  r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[A-Za-z0-9_]+\.(?P<kind>tmp|old)"
  r"(\.[A-Za-z0-9]+)?$"
)


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


def temp_prefix(name: str) -> str:
  """Prefix of this process's temporaries for a target called `name` (see the module doc)."""
  return f".{name}.{HOST}-{os.getpid()}."


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def sweep_stale(folder: str | Path) -> list[Path]:
  """Remove the temporaries in `folder` left by processes of this host that no longer run (a run
  killed with SIGKILL cannot clean up after itself). A moved-aside earlier output (`.old`) whose
  replacement never arrived is put back. Returns what was removed or restored."""
  folder = Path(folder)
  done = []
  try:
    entries = list(folder.iterdir())
  except (FileNotFoundError, NotADirectoryError, PermissionError):
    return done
  for entry in entries:
    m = _STALE.match(entry.name)
    if not m or m["host"] != HOST or _alive(int(m["pid"])):
      continue
    if m["kind"] == "old":  # atomic_dir died between moving the old output aside and the swap
      target = folder / entry.name[1:].split(f".{m['host']}-")[0]
      if (entry / "x").exists() and not target.exists():
        os.replace(entry / "x", target)
        done.append(target)
    _remove(entry)
    done.append(entry)
  return done


def _make_parents(path: Path) -> list[Path]:
  """mkdir -p of `path`'s folder; returns the folders created (to remove again on failure)."""
  created = []
  parent = path.parent
  while not parent.exists():
    created.append(parent)
    parent = parent.parent
  path.parent.mkdir(parents=True, exist_ok=True)
  return created


def _remove_if_empty(folders: list[Path]) -> None:
  for folder in folders:  # innermost first
    try:
      folder.rmdir()
    except OSError:
      return


@contextlib.contextmanager
def atomic_file(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
  """Yields a temporary path in the target's folder; renamed to `path` if the block succeeds."""
  path = Path(path)
  refuse_existing(path, overwrite)
  created = _make_parents(path)
  sweep_stale(path.parent)
  fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
  os.close(fd)
  tmp = Path(tmp)
  os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get ordinary permissions
  ok = False
  try:
    yield tmp
    os.replace(tmp, path)
    ok = True
  finally:
    if tmp.exists():
      tmp.unlink()
    if not ok:
      _remove_if_empty(created)


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False) -> None:
  """`text` into `path` atomically (`atomic_file`)."""
  with atomic_file(path, overwrite) as tmp:
    tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
  """Yields a temporary folder; it replaces `path` only if the block succeeds."""
  path = Path(path)
  refuse_existing(path, overwrite)
  created = _make_parents(path)
  sweep_stale(path.parent)
  tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent))
  os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
  ok = False
  try:
    yield tmp
    if path.exists():  # overwrite: move the old one aside, put it back if the swap fails
      old = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), suffix=".old", dir=path.parent))
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
    ok = True
  finally:
    if tmp.exists():
      _remove(tmp)
    if not ok:
      _remove_if_empty(created)


@contextlib.contextmanager
def scratch_dir(beside: str | Path) -> Iterator[Path]:
  """A temporary working folder in `beside`'s folder (not /tmp: it is swept like the outputs'
  temporaries if the run is killed), removed when the block ends."""
  beside = Path(beside)
  created = _make_parents(beside)
  sweep_stale(beside.parent)
  tmp = Path(
    tempfile.mkdtemp(prefix=temp_prefix(beside.name + ".scratch"), suffix=".tmp", dir=beside.parent)
  )
  try:
    yield tmp
  finally:
    _remove(tmp)
    _remove_if_empty(created)


# ------------------------------------------------------------------ outputs against inputs
def _same(a: Path, b: Path) -> bool:
  try:
    return os.path.samefile(a, b)
  except OSError:
    return False


def check_outputs(
  outputs: Iterable[str | Path | None], inputs: Iterable[str | Path | None]
) -> None:
  """Refuse, before any work, outputs that would destroy an input or each other, and outputs
  that cannot be written:

  - an output that is an input, also through symlinks or hard links;
  - an output (a file or a folder replaced as a whole) that holds an input;
  - two outputs at one path;
  - an output whose folder exists as a file, or is not writable.
  """
  outputs = [Path(o) for o in outputs if o]
  inputs = [Path(i) for i in inputs if i]
  seen: dict[str, Path] = {}
  for out in outputs:
    real = Path(os.path.realpath(out))
    if str(real) in seen:
      raise DataError(out, f"given as two outputs (also as {seen[str(real)]})")
    seen[str(real)] = out
    for inp in inputs:
      real_in = Path(os.path.realpath(inp))
      if real_in == real or _same(out, inp):
        how = (
          ""
          if out == inp
          else f" (both resolve to {real})"
          if real_in == real
          else " (hard links to one file)"
        )
        raise DataError(
          out,
          f"is the input {inp}{how}; writing it would destroy the input: choose "
          f"another output path",
        )
      if real in real_in.parents:
        raise DataError(
          out,
          f"holds the input {inp}; replacing it would destroy the input: choose "
          f"another output path",
        )
    _check_writable(out)


def _check_writable(out: Path) -> None:
  folder = Path(os.path.realpath(out)).parent
  while not folder.exists():
    folder = folder.parent
  if not folder.is_dir():
    raise DataError(out, f"cannot be written: {folder} is a file, not a folder")
  if not os.access(folder, os.W_OK | os.X_OK):
    raise DataError(out, f"cannot be written: no write permission in {folder}")
