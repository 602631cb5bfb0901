"""Test-wide settings, and the markers that tell which tests need what.

Two markers are put on automatically, so that `make test-unit` (`-m "not realdata and not
torch"`) runs just the tests that need neither `../shared/data` nor PyTorch, without anyone
remembering to mark a new test:
- `torch`: the test's module imports torch or transformers, or the test (or a fixture or helper
  it uses) imports or importorskips them;
- `realdata`: the test (or a fixture or helper it uses) reads the shared data
  (`shared_file`, `shared_data_dir`, `DEMMAE_SHARED_DATA`). Hand-written `realdata` marks stay
  valid and are kept.
"Uses" is followed statically through the source of fixtures and of the module's and the test
helpers' functions named in the test's source, as deep as they go.
"""

import atexit
import functools
import inspect
import os
import re
import shutil
import tempfile
import types

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache for the run and every script it starts as a subprocess: the suite
# builds the same small models in many tests and processes, and compiling them again is most of
# its time. It starts empty (each run compiles every program once, as CI's clean clone does) and
# is removed at exit. A cached executable is the one XLA compiled (same memory and cost analysis).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="demmae-test-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

TORCH = re.compile(
  r"^\s*(import|from)\s+(torch|transformers)\b|importorskip\(\s*[\"'](torch|transformers)", re.M
)
REALDATA = re.compile(r"\bshared_file\b|\bshared_data_dir\b|DEMMAE_SHARED_DATA|\bmark\.realdata\b")
TESTS = os.path.dirname(os.path.abspath(__file__))


def _sources(item) -> list[str]:
  """The source of the test, of its fixtures and of the functions they name that are defined
  under tests/, followed transitively."""
  seen, out = set(), []
  todo = [item.function]
  info = getattr(item, "_fixtureinfo", None)
  for defs in info.name2fixturedefs.values() if info else ():
    todo += [d.func for d in defs]
  while todo:
    fn = inspect.unwrap(todo.pop())
    if id(fn) in seen or not isinstance(fn, types.FunctionType):
      continue
    seen.add(id(fn))
    if not os.path.abspath(fn.__code__.co_filename).startswith(TESTS):
      continue
    try:
      src = inspect.getsource(fn)
    except (OSError, TypeError):
      continue
    out.append(src)
    names = set(fn.__code__.co_names) | {
      c
      for const in fn.__code__.co_consts
      if isinstance(const, types.CodeType)
      for c in const.co_names
    }
    todo += [fn.__globals__[n] for n in names if n in fn.__globals__]
  return out


MODULE_TORCH = re.compile(r"^(import|from)\s+(torch|transformers)\b", re.M)


@functools.cache
def _torch_importable() -> bool:
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError:
    return False
  return True


def pytest_ignore_collect(collection_path, config):
  """With torch deselected (`-m "not torch"`) and not importable, a module that imports it at
  its top is not collected (it could not be); every test in it would be marked `torch`."""
  if (
    collection_path.suffix == ".py"
    and "not torch" in (config.option.markexpr or "")
    and MODULE_TORCH.search(collection_path.read_text())
    and not _torch_importable()
  ):
    return True
  return None


def _module_imports_torch(module) -> bool:
  return any(
    isinstance(v, types.ModuleType) and v.__name__.split(".")[0] in ("torch", "transformers")
    for v in vars(module).values()
  )


def pytest_collection_modifyitems(config, items):
  for item in items:
    if not isinstance(item, pytest.Function):
      continue
    sources = _sources(item)
    if _module_imports_torch(item.module) or any(TORCH.search(s) for s in sources):
      item.add_marker(pytest.mark.torch)
    if item.get_closest_marker("realdata") is None and any(REALDATA.search(s) for s in sources):
      item.add_marker(pytest.mark.realdata)
