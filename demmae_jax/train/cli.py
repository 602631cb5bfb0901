"""How every script fails: one place for the command-line contract.

- Expected failures (bad input: DataError and other ValueErrors, missing or unwritable files, a
  config that does not validate, a workdir of another config, a non-finite loss) print one line,
  `<prog>: error: <path>: <problem>`, and exit 2. `--debug` adds the traceback.
- Anything else is a bug: its traceback is printed, with a line saying so, and the exit code is 1.
- SIGTERM raises `Terminated` in the main thread, so that `finally` blocks and the atomic writers
  (data_pipelines.atomic) remove their temporaries; the script says what happened and exits 143.
  (The training loop installs its own handler while it trains: it saves a checkpoint and stops.)
- absl flag errors, including a config file that is missing, given relative to another folder,
  or whose `get_config` fails (an unknown preset), and a mistyped `--config.key`, are one line
  and exit 2 instead of absl's tracebacks.

`run(main)` is the entry point of the absl scripts; `execute(main, argv)` runs one in-process and
returns its exit code (tests); `guarded(prog, fn, debug)` is the same contract for the argparse
scripts (prepare_data, convert_weights).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from absl import app, flags, logging

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
EXPECTED = (
  ValueError,
  OSError,
  FloatingPointError,
)  # DataError, CheckpointError, ... are ValueErrors
EXIT_ERROR, EXIT_BUG, EXIT_SIGTERM, EXIT_INTERRUPT = 2, 1, 128 + signal.SIGTERM, 130

_DEBUG = flags.DEFINE_bool("debug", False, "On an error, also print the Python traceback.")


class Terminated(BaseException):
  """SIGTERM arrived (a BaseException, like KeyboardInterrupt: `except Exception` lets it pass)."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
  """While the block runs, the first SIGTERM raises Terminated in the main thread; further ones
  are ignored so that the clean-up it starts is not itself interrupted."""
  received = []

  def handler(signum, frame):
    if not received:
      received.append(signum)
      raise Terminated()

  try:
    previous = signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def message(e: BaseException) -> str:
  """One line naming the file and the problem."""
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    text = f"{e.filename}: {e.strerror}" + (f" (-> {e.filename2})" if e.filename2 else "")
  else:
    text = str(e).strip() or e.__class__.__name__
    if isinstance(e, KeyError):
      text = f"{e.__class__.__name__}: {text}"
  return " ".join(text.split())


def guarded(
  prog: str,
  fn: Callable[[], int | None],
  *,
  debug: bool = False,
  on_terminate: Callable[[], str] | None = None,
) -> int:
  """Run `fn` under the contract above; returns the exit code."""
  try:
    with sigterm_raises():
      rc = fn()
    return 0 if rc is None else int(rc)
  except Terminated:
    note = (
      on_terminate()
      if on_terminate
      else (
        "stopped before finishing; its outputs were not written and its temporaries were removed"
      )
    )
    print(f"{prog}: stopped by SIGTERM: {note}", file=sys.stderr, flush=True)
    return EXIT_SIGTERM
  except KeyboardInterrupt:
    print(
      f"{prog}: interrupted: outputs not finished were not written", file=sys.stderr, flush=True
    )
    return EXIT_INTERRUPT
  except app.UsageError as e:
    print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
    return EXIT_ERROR
  except EXPECTED as e:
    if debug:
      traceback.print_exc()
    print(f"{prog}: error: {message(e)}", file=sys.stderr, flush=True)
    return EXIT_ERROR
  except Exception as e:  # a bug: show everything
    traceback.print_exc()
    print(
      f"{prog}: internal error (a bug, not a problem with your input; please report it with "
      f"the traceback above): {e.__class__.__name__}: {message(e)}",
      file=sys.stderr,
      flush=True,
    )
    return EXIT_BUG


def exit(rc: int) -> None:
  """sys.exit, with the outputs complete: a SIGTERM during interpreter teardown (seconds with TF
  and JAX loaded) is ignored rather than reported as an interruption. After a SIGTERM, once the
  clean-up has run, leave at once (os._exit): teardown can crash in native libraries (XLA's
  thread pools) still busy with the work the signal interrupted."""
  try:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
  except ValueError:  # not the main thread
    pass
  if rc == EXIT_SIGTERM:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
  sys.exit(rc)


# ------------------------------------------------------------------ absl scripts
def _flag_error(e: Exception, argv: list[str]) -> str:
  text = str(e)
  if "Traceback (most recent call last)" in text:  # config_flags embeds get_config's traceback
    head = text.split(":", 1)[0]  # "flag --config=PATH:ARG"
    last = [line.strip() for line in text.strip().splitlines() if line.strip()][-1]
    last = re.sub(r"^\w+(Error|Exception): ", "", last)
    m = re.match(r"flag --(\w+)=([^:]+)", head)
    return f"{m[2]}: {last}" if m else f"{head}: {last}"
  return " ".join(text.split())


def _override_error(e: Exception, argv: list[str]) -> str:
  """ml_collections reports an unknown override key as a chain of KeyError/AttributeError
  raised while flags are parsed (before `main` starts)."""
  overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  text = str(e).replace("\\n", " ").replace("\\'", "").replace("'", "")  # a KeyError's repr inside
  key = " ".join(text.split())
  return (
    f"bad config override ({e.__class__.__name__}: {key}); the overrides given: {overrides}. "
    f"Keys are checked against the config file: a typo is not a new key. Print the "
    f"config's keys with --helpfull or read the config file."
  )


def _config_file_missing(argv: list[str]) -> str | None:
  """The message for a config file that did not load (config_flags defers that error until the
  config is first used, e.g. by a `--config.key=value` override), or None."""
  from ml_collections import config_flags

  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if not config_flags.config_flags.is_config_flag(flag):
      continue
    try:
      getattr(flag.value, "keys", None)  # a file that failed to load raises on any access
      if flag.value is not None:
        continue
    except OSError:
      pass
    given = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    given += [b for a, b in zip(argv, argv[1:]) if a == f"--{name}"]
    if not given:
      continue
    filename = given[-1].split(":", 1)[0]
    if Path(filename).is_file():
      continue
    hint = ""
    if not Path(filename).is_absolute() and (PROJECT_ROOT / filename).exists():
      hint = f"; did you mean {PROJECT_ROOT / filename}?"
    return (
      f"{filename}: config file not found (relative paths are taken from the current "
      f"folder, {os.getcwd()}){hint}"
    )
  return None


def parse_flags(argv: list[str]) -> tuple[list[str] | None, str | None]:
  """(remaining argv, None), or (None, one-line error)."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    return None, _flag_error(e, argv)
  except OSError as e:  # an override applied to a config file that did not load
    return None, _config_file_missing(argv) or message(e)
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    return None, _override_error(e, argv)
  missing = _config_file_missing(argv)
  return (None, missing) if missing else (rest, None)


def _prog(argv: list[str]) -> str:
  return Path(argv[0]).stem if argv else "script"


def execute(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
  """Parse `argv` into absl's flags and run `main` under the contract; returns the exit code
  (in-process: tests call it with a script's `main`)."""
  prog = _prog(argv)
  rest, error = parse_flags(argv)
  if error is not None:
    print(f"{prog}: error: {error}", file=sys.stderr)
    return EXIT_ERROR
  return guarded(prog, lambda: main(rest), debug=_DEBUG.value)


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def run(main: Callable[[list[str]], int | None]) -> None:
  """app.run with the contract above, and absl logging at WARNING (orbax logs every file it
  writes at INFO). --help prints the script's doc and flags and exits 0 (absl's exits 1)."""
  asked = [a for a in sys.argv[1:] if a in HELP_FLAGS]
  if asked:
    app.usage(shorthelp=asked[0] != "--helpfull", writeto_stdout=True, exitcode=0)

  def parser(argv):
    rest, error = parse_flags(argv)
    if error is not None:
      print(f"{_prog(argv)}: error: {error}", file=sys.stderr)
      sys.exit(EXIT_ERROR)
    return rest

  def wrapped(argv):
    logging.set_verbosity(logging.WARNING)
    return guarded(_prog(sys.argv), lambda: main(argv), debug=_DEBUG.value)

  app.run(lambda argv: exit(wrapped(argv)), flags_parser=parser)
