r"""Trains a VoxelMorph model.

  python -m experiments.train --config=configs/demo.py --workdir=runs/demo
  python -m experiments.train --config=configs/default.py:variant=vm1,lam=0.5 \
      --config.data.train='scans/*.nii.gz' --config.data.atlas=atlas.nii.gz --workdir=runs/vm1

Runs again with the same workdir resume from its latest checkpoint.

Several processes (hosts; here two on one machine, two CPU devices each; one per GPU host or
TPU VM the same way, with the coordinator on process 0's host):

  for i in 0 1; do XLA_FLAGS=--xla_force_host_platform_device_count=2 \
    python -m experiments.train --config=configs/smoke.py --workdir=runs/mh \
      --coordinator_address=localhost:12355 --num_processes=2 --process_id=$i & done; wait

On a TPU pod, SLURM, Open MPI or Kubernetes, ``--config.distributed=True`` instead lets
``jax.distributed.initialize()`` read the cluster's own settings.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vmjax import cli
from vmjax import configs
from vmjax import train
from vmjax.checks import DataError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
cli.define_distributed_flags(__name__)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.set_verbosity(logging.INFO)
  cli.initialize_distributed("on a pod or cluster use --config.distributed=True")

  def run():
    path = config_flags.get_config_filename(FLAGS["config"]).partition(":")[0]  # minus :ARG
    if not os.path.isfile(path):  # config_flags would say so only later, in a traceback
      raise DataError(f"--config: no such file {path} (shipped configs: "
                      f"{', '.join(configs.shipped())})")
    logging.info("config %s", path)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)

  # Bad data or settings (found before the first step) are one line; anything that goes wrong
  # later (a diverging run, a crash) keeps its traceback.
  cli.run_reporting_errors("vmjax-train", run, errors=(DataError, FileNotFoundError))


def entry_point():
  """``vmjax-train`` (installed command). ``--config=configs/demo.py`` outside a checkout is the
  shipped config of that name (:func:`vmjax.configs.resolve`)."""
  sys.argv = configs.resolve_argv(sys.argv)
  cli.run_main(main, __name__, __doc__)


if __name__ == "__main__":
  entry_point()
