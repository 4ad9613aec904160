r"""Registers a moving scan to a fixed scan with a trained model.

  python -m experiments.register --workdir=runs/oasis --moving=m.nii.gz --fixed=f.nii.gz \
      --moved=moved.nii.gz --warp=warp.nii.gz --moving_seg=m_seg.nii.gz --moved_seg=ms.nii.gz

Inputs: .nii / .nii.gz / .npz on the same voxel grid (affinely aligned), any size. Outputs keep
the fixed scan's affine and header; the warp is (D, H, W, 3) float32 displacements in voxels of
that grid, moved(x) = moving(x + warp(x)).
"""

import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from vmjax import checkpoints
from vmjax import data
from vmjax import io
from vmjax import registration

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (its newest readable checkpoint).")
flags.DEFINE_string("checkpoint", None, "Or one checkpoint directory: WORKDIR/checkpoints/STEP.")
flags.DEFINE_string("moving", None, "Moving scan.")
flags.DEFINE_string("fixed", None, "Fixed scan.")
flags.DEFINE_string("moved", None, "Output: the moving scan warped onto the fixed grid.")
flags.DEFINE_string("warp", None, "Output: the displacement field (D, H, W, 3), voxels.")
flags.DEFINE_string("moving_seg", None, "Optional labels of the moving scan.")
flags.DEFINE_string("moved_seg", None, "Output: the labels warped (nearest neighbour).")
flags.DEFINE_integer("instance_steps", 0, "Test-time optimisation steps on this pair.")
flags.DEFINE_float("instance_lr", None,
                   "Its Adam learning rate (default: registration.INSTANCE_LR = 1e-4).")
flags.mark_flags_as_required(["moving", "fixed"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
    raise app.UsageError("give exactly one of --workdir and --checkpoint")
  if FLAGS.moved_seg and not FLAGS.moving_seg:
    raise app.UsageError("--moved_seg needs --moving_seg")
  if not (FLAGS.moved or FLAGS.warp or FLAGS.moved_seg):
    raise app.UsageError("nothing to write: give --moved, --warp and/or --moved_seg")
  logging.set_verbosity(logging.INFO)
  moving = data.load_volume(FLAGS.moving, FLAGS.moving_seg)
  fixed = data.load_volume(FLAGS.fixed)
  if not np.allclose(moving.affine, fixed.affine, atol=1e-3):
    logging.warning("moving and fixed affines differ; outputs use the fixed scan's:\n%s\n%s",
                    moving.affine, fixed.affine)
  model, variables, config = checkpoints.load_trained(FLAGS.workdir or FLAGS.checkpoint)
  start = time.perf_counter()
  result = registration.register_scans(model, variables, config, moving, fixed,
                                       FLAGS.instance_steps, FLAGS.instance_lr)
  jax.block_until_ready(result["disp"])
  logging.info("registered in %.2f s (compile included); loss %.5f -> %.5f%s",
               time.perf_counter() - start, result["loss_before"], result["loss_after"],
               f" after {FLAGS.instance_steps} instance steps" if FLAGS.instance_steps else "")
  outputs = {FLAGS.moved: np.asarray(result["moved"], np.float32),
             FLAGS.warp: np.asarray(result["disp"], np.float32)}
  if FLAGS.moved_seg:
    outputs[FLAGS.moved_seg] = np.asarray(result["moved_seg"]).astype(np.int32)
  for path, array in outputs.items():
    if path:
      io.save_volume(path, array, like=fixed, key="seg" if path == FLAGS.moved_seg else "vol")
      logging.info("wrote %s", os.path.abspath(path))


if __name__ == "__main__":
  app.run(main)
