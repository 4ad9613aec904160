"""What the command-line tools share: a bad input is one line on stderr and exit code 1, and
``--help`` works for installed commands as for ``python -m experiments.X``."""

from __future__ import annotations

import sys
from typing import Callable

from absl import app
from absl import flags

# What bad input raises: DataError (a ValueError) for scans and settings, FileNotFoundError for
# missing models or workdirs, OSError for unreadable or unwritable paths.
INPUT_ERRORS = (ValueError, FileNotFoundError, OSError)


def run_reporting_errors(command: str, run: Callable[[], None]) -> None:
  """Calls ``run()``; an input error ends the process with ``command: error: message``."""
  try:
    run()
  except INPUT_ERRORS as e:
    message = " ".join(str(e).split())  # one line, whatever the exception's text
    print(f"{command}: error: {message}", file=sys.stderr)
    sys.exit(1)


def run_main(main: Callable, module_name: str, doc: str | None) -> None:
  """``absl.app.run(main)`` for a module that may be an installed command's target rather than
  ``__main__``: ``--help`` then still shows the module's docstring and flags."""
  main_module = sys.modules["__main__"]
  if not main_module.__doc__:
    main_module.__doc__ = doc
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main)
