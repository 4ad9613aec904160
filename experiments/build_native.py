"""Builds vmjax's oneDNN convolution kernel now rather than at the first CPU trace (for a
container image or a cluster's shared cache), and says which convolution path is in use.

  python -m experiments.build_native        # VMJAX_CACHE=/opt/vmjax-cache to choose where
  vmjax-build-native                        # the same, installed
"""

import sys

from absl import app
from absl import logging

from vmjax import cli
from vmjax import conv


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.set_verbosity(logging.WARNING)
  if not conv.onednn_available():
    print("vmjax: the oneDNN kernel could not be built (the warning above says why); "
          "convolutions on CPU use XLA's", file=sys.stderr)
    sys.exit(1)
  print(f"vmjax: oneDNN kernel {conv.library_path()}; CPU convolutions: {conv.describe_path()}")


def entry_point():
  """``vmjax-build-native`` (installed command)."""
  cli.run_main(main, __name__, __doc__)


if __name__ == "__main__":
  entry_point()
