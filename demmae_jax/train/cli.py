"""`run(main)`: absl's app.run, with a one-line error for a bad `--config.key=value`, and
absl logging at WARNING (orbax logs every file it writes at INFO).

ml_collections reports an unknown override key as a chain of KeyError/AttributeError tracebacks
raised while flags are parsed (before `main` starts); this turns that into one clear line."""
from __future__ import annotations

import sys
from typing import Callable

from absl import app, logging


def run(main: Callable[[list[str]], int | None]) -> None:
  started = []

  def wrapped(argv):
    started.append(True)
    logging.set_verbosity(logging.WARNING)
    return main(argv)

  try:
    app.run(lambda argv: sys.exit(wrapped(argv)))
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    if started:
      raise
    overrides = [a.split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--config.")]
    key = str(e).strip("\"'")
    print(f"error: bad config override ({e.__class__.__name__}: {key}); the overrides given: "
          f"{overrides}. Keys are checked against the config file: a typo is not a new key. "
          f"Print the config's keys with --helpfull or read the config file.", file=sys.stderr)
    sys.exit(2)
