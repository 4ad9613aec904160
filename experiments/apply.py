r"""Applies a saved registration to another image or label map of the moving scan.

  python -m experiments.apply --warp=warp.nii.gz --input=moving_t2.nii.gz --output=t2_moved.nii.gz
  python -m experiments.apply --warp=warp_ants.nii.gz --input=aparc.mgz \
      --output=aparc_moved.nii.gz --labels

``--warp`` is either file ``vmjax-register`` writes: ``--warp`` (voxels, ``(D, H, W, 3)``; the
input must then be on the moving scan's grid) or ``--warp_ants`` (the ITK displacement field in
LPS mm; the input may be on any grid in the moving scan's world). The output is on the warp's
(the fixed scan's) grid with its header; ``--labels`` resamples nearest neighbour and keeps the
label values, otherwise trilinear.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax.numpy as jnp
import numpy as np

from vmjax import ants_io
from vmjax import cli
from vmjax import io
from vmjax import transforms

FLAGS = flags.FLAGS
flags.DEFINE_string("warp", None, "A warp written by vmjax-register (--warp or --warp_ants).")
flags.DEFINE_string("input", None, "Image or label map to move (the moving scan's world).")
flags.DEFINE_string("output", None, "Output on the fixed grid.")
flags.DEFINE_bool("labels", False, "The input is a label map: nearest neighbour, integer output.")
flags.mark_flags_as_required(["warp", "input", "output"])


def run():
  volume = io.load_volume(FLAGS.input)
  if FLAGS.labels:
    volume.image = io.as_labels(volume.image, FLAGS.input).astype(np.float32)
  disp, grid = ants_io.load_warp(FLAGS.warp, volume)
  moved = transforms.warp(jnp.asarray(volume.image)[None, ..., None], jnp.asarray(disp)[None],
                          order=0 if FLAGS.labels else 1)[0, ..., 0]
  array = np.asarray(moved).astype(np.int32 if FLAGS.labels else np.float32)
  io.save_volume(FLAGS.output, array, like=grid, key="seg" if FLAGS.labels else "vol")
  logging.info("wrote %s", os.path.abspath(FLAGS.output))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.set_verbosity(logging.INFO)
  cli.run_reporting_errors("vmjax-apply", run)


def entry_point():
  """``vmjax-apply`` (installed command)."""
  cli.run_main(main, __name__, __doc__)


if __name__ == "__main__":
  entry_point()
