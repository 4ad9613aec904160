r"""Registers a moving scan to a fixed scan: the shipped pretrained model unless a workdir is given.

  python -m experiments.register --moving=m.nii.gz --fixed=f.nii.gz --moved=moved.nii.gz \
      --warp=warp.nii.gz --moving_seg=m_seg.nii.gz --moved_seg=ms.nii.gz [--warp_ants=w.nii.gz]
  python -m experiments.register --workdir=runs/oasis --affine=none ...   # scans already aligned

Inputs: .nii / .nii.gz / .mgz / .npz, each on its own grid (any orientation, spacing, size).
With ``--affine=affine`` (the default) both scans are aligned to the model's template (rigid,
then affine), registered there, and every output is on the fixed scan's grid with its header:
``--moved``, ``--moved_seg`` (nearest neighbour), ``--warp`` ((D, H, W, 3) float32: the moving
voxel each fixed voxel samples, minus its own index: moved(x) = moving(x + warp(x))) and
``--warp_ants`` (the same map as an ITK/ANTs displacement field: 5-D, vector intent, LPS mm,
for ``antsApplyTransforms -t``; ``--warp_ants_inverse``: its inverse on the moving grid, for
diffeomorphic models). ``--affine=none`` registers scans already on one grid.
After the network, 50 Adam steps refine its field on this pair (``--instance_steps``; 0: the
network alone, about 4x faster on a CPU, ~0.05 Dice lower on OASIS-TRT-20; see README).
Errors (bad input, missing model) are one line on stderr and exit code 1; nothing is written.
"""

import concurrent.futures
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from vmjax import ants_io
from vmjax import checkpoints
from vmjax import cli
from vmjax import io
from vmjax import networks
from vmjax import pipeline
from vmjax import pretrained
from vmjax import stages

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (its newest readable checkpoint); default: "
                    "the shipped pretrained model.")
flags.DEFINE_string("checkpoint", None, "Or one checkpoint directory: WORKDIR/checkpoints/STEP.")
flags.DEFINE_bool("best", False, "With --workdir: its checkpoint with the best validation Dice.")
flags.DEFINE_string("model", pretrained.DEFAULT, "Shipped pretrained model (without --workdir).")
flags.DEFINE_string("moving", None, "Moving scan.")
flags.DEFINE_string("fixed", None, "Fixed scan.")
flags.DEFINE_string("moved", None, "Output: the moving scan on the fixed grid.")
flags.DEFINE_string("warp", None, "Output: displacement (D, H, W, 3) in voxels of the fixed grid.")
flags.DEFINE_string("warp_ants", None, "Output: the same transform as an ANTs/ITK displacement "
                    "field (LPS mm; antsApplyTransforms reads it).")
flags.DEFINE_string("warp_ants_inverse", None, "Output (diffeomorphic models): the inverse "
                    "transform as an ANTs/ITK displacement field on the moving grid.")
flags.DEFINE_string("moving_seg", None, "Optional labels of the moving scan.")
flags.DEFINE_string("moved_seg", None, "Output: the labels warped (nearest neighbour).")
flags.DEFINE_enum("affine", "affine", ["affine", "none"],
                  "affine: align both scans to the model's template first (any grids); none: "
                  "the scans are already aligned on one grid.")
flags.DEFINE_enum("dtype", None, networks.DTYPES, networks.DTYPE_HELP)
cli.define_instance_flags(__name__, default_steps=50)
flags.DEFINE_bool("profile", False, "Print where the time went: a table of stages (process "
                  "start, reading, affine steps, network, refinement, composition, warps, "
                  "writes) with the compilation inside each.")
flags.mark_flags_as_required(["moving", "fixed"])


def load_model():
  """``(model, variables, config, space)``; ``space`` is None for a workdir's model."""
  if FLAGS.workdir or FLAGS.checkpoint:
    model, variables, config = checkpoints.load_trained(FLAGS.workdir or FLAGS.checkpoint,
                                                        best=FLAGS.best)
    return networks.for_registration(model, FLAGS.dtype), variables, config, None
  model, variables, config = pretrained.load(FLAGS.model)
  return (networks.for_registration(model, FLAGS.dtype), variables, config,
          pretrained.space(FLAGS.model))


def _process_age() -> float:
  """Seconds since this process started (interpreter start-up and imports), from /proc."""
  try:
    with open("/proc/self/stat") as f:
      start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
  except (OSError, ValueError, IndexError):
    return 0.0


def run():
  stages.enable_compilation_cache()
  with stages.recording() as rec:
    rec.add("process start and imports", _process_age())
    _register(rec)
  logging.info("done in %.1f s since the process started; programs: %d compiled, %d loaded from "
               "the compilation cache (%s)", sum(rec.seconds.values()), rec.cache_misses,
               rec.cache_hits, stages.cache_dir())
  if FLAGS.profile:
    print(rec.table(), flush=True)


def _register(rec):
  with stages.stage("read the scans"):
    moving = io.load_volume(FLAGS.moving, FLAGS.moving_seg)
    fixed = io.load_volume(FLAGS.fixed)
  with stages.stage("load the model"):
    model, variables, config, space = load_model()
  if FLAGS.affine == "affine" and space is None:
    raise app.UsageError("--affine=affine needs a model with a template (the shipped pretrained "
                         "models); with --workdir use --affine=none on aligned scans")
  instance = cli.instance_from_flags()
  start = time.perf_counter()
  result = pipeline.register_pair(model, variables, config, moving, fixed, space, FLAGS.affine,
                                  instance, inverse=bool(FLAGS.warp_ants_inverse),
                                  diagnostics=False)
  jax.block_until_ready(result["disp"])
  logging.info("registered in %.2f s (%.1f s of it compiling); loss %.5f -> %.5f%s",
               time.perf_counter() - start, sum(rec.compile_seconds.values()),
               result["loss_before"], result["loss_after"],
               f" after {instance.describe(config)}" if instance.total_steps else "")
  with stages.stage("fields and images to the host"):
    disp = np.asarray(result["disp"], np.float32)
    writes = []  # (path, write(), what)
    if FLAGS.moved:
      moved = np.asarray(result["moved"], np.float32)
      writes.append((FLAGS.moved, lambda: io.save_volume(FLAGS.moved, moved, like=fixed), ""))
    if FLAGS.warp:
      writes.append((FLAGS.warp, lambda: io.save_volume(FLAGS.warp, disp, like=fixed), ""))
    if FLAGS.moved_seg:
      seg = np.asarray(result["moved_seg"]).astype(np.int32)
      writes.append((FLAGS.moved_seg,
                     lambda: io.save_volume(FLAGS.moved_seg, seg, like=fixed, key="seg"), ""))
    if FLAGS.warp_ants:
      writes.append((FLAGS.warp_ants,
                     lambda: ants_io.save_ants_warp(FLAGS.warp_ants, disp, fixed, moving),
                     " (ANTs/ITK displacement field)"))
    if FLAGS.warp_ants_inverse:
      inverse = np.asarray(result["inverse_disp"], np.float32)
      writes.append((FLAGS.warp_ants_inverse,
                     lambda: ants_io.save_ants_warp(FLAGS.warp_ants_inverse, inverse, moving,
                                                    fixed),
                     " (inverse ANTs/ITK displacement field, moving grid)"))
  # Compression (gzip) releases the GIL: the files are written side by side, each atomically.
  with stages.stage(f"write {len(writes)} files (side by side)"):
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
      futures = [(path, what, pool.submit(write)) for path, write, what in writes]
      for path, what, future in futures:
        future.result()
        logging.info("wrote %s%s", os.path.abspath(path), what)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if FLAGS.workdir and FLAGS.checkpoint:
    raise app.UsageError("give at most one of --workdir and --checkpoint")
  if FLAGS.moved_seg and not FLAGS.moving_seg:
    raise app.UsageError("--moved_seg needs --moving_seg")
  if not (FLAGS.moved or FLAGS.warp or FLAGS.moved_seg or FLAGS.warp_ants):
    raise app.UsageError("nothing to write: give --moved, --warp, --warp_ants and/or --moved_seg")
  logging.set_verbosity(logging.INFO)
  cli.run_reporting_errors("vmjax-register", run)


def entry_point():
  """``vmjax-register`` (installed command)."""
  cli.run_main(main, __name__, __doc__)


if __name__ == "__main__":
  entry_point()
