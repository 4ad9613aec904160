r"""Trains a VoxelMorph model.

  python -m experiments.train --config=configs/demo.py --workdir=runs/demo
  python -m experiments.train --config=configs/default.py:variant=vm1,lam=0.5 \
      --config.data.train='scans/*.nii.gz' --config.data.atlas=atlas.nii.gz --workdir=runs/vm1

Runs again with the same workdir resume from its latest checkpoint.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vmjax import cli
from vmjax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.set_verbosity(logging.INFO)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def entry_point():
  """``vmjax-train`` (installed command)."""
  cli.run_main(main, __name__, __doc__)


if __name__ == "__main__":
  entry_point()
