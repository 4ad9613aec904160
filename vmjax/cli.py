"""What the command-line tools share: a bad input is one line on stderr and exit code 1."""

from __future__ import annotations

import sys
from typing import Callable

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
