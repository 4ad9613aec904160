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
After the network, up to 50 NAdam steps refine its field on this pair, stopped once converged
(``--instance_steps``, ``--instance_tol``; ``--fast``: 10 steps; 0: the network alone, ~0.05
Dice lower on OASIS-TRT-20; docs/results.md, docs/performance.md).
Errors (bad input, missing model) are one line on stderr and exit code 1; nothing is written.

A whole study (one model load, one compilation per shape, an atlas read and aligned once, the
next pair read while one registers):

  python -m experiments.register --pairs=pairs.csv --outdir=out     # moving,fixed[,moving_seg,
                                                                    #  fixed_seg,name]
  python -m experiments.register --moving='subjects/*/t1.nii.gz' --fixed=atlas.nii.gz --outdir=out
  ... --shard=$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT           # an array job's share
  ... --coordinator_address=host:1234 --num_processes=4 --process_id=$i
  ... --batch=8                       # GPU/TPU: 8 pairs per network call and refinement

Each pair writes ``out/<name>/moved.nii.gz``, ``warp.nii.gz`` (``moved_seg.nii.gz`` with labels;
``--write_ants``, ``--write_ants_inverse``) atomically, then its row in ``out/results.csv``
(``name,status,error,seconds,dice,folding_percent,moving,fixed``; ``dice``: mean over the labels
of ``fixed_seg``). A pair that fails (unreadable, empty, NaN or 4-D scan, ...) gets a ``failed``
row with its one-line error and the others go on; exit code 3 then (0: all done). Rerunning the
same command skips the pairs done and retries the rest; SIGTERM / SIGINT finish the pair at hand
and stop (exit code 128 + signal).
"""

import collections
import concurrent.futures
import os
import signal
import sys
import threading
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from vmjax import ants_io
from vmjax import checkpoints
from vmjax import cli
from vmjax import cohort
from vmjax import evaluation
from vmjax import io
from vmjax import pipeline
from vmjax import precision
from vmjax import pretrained
from vmjax import registration
from vmjax import stages
from vmjax import train

FLAGS = flags.FLAGS
EXIT_SOME_FAILED = 3  # a cohort run in which some pairs failed (the others were done)
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
flags.DEFINE_enum("dtype", None, precision.DTYPES, precision.DTYPE_HELP)
cli.define_instance_flags(__name__, default_steps=registration.DEFAULT_STEPS,
                          default_tol=registration.DEFAULT_TOL)
flags.DEFINE_bool("fast", False, f"Faster, a little less accurate: {registration.FAST_STEPS} "
                  "refinement steps instead of up to --instance_steps (an explicit "
                  "--instance_steps wins); docs/performance.md.")
flags.DEFINE_bool("profile", False, "Print where the time went: a table of stages (process "
                  "start, reading, affine steps, network, refinement, composition, warps, "
                  "writes) with the compilation inside each.")
flags.DEFINE_string("pairs", None, "Cohort: a CSV of pairs (header: moving,fixed and optionally "
                    "moving_seg,fixed_seg,name; paths relative to the CSV). Needs --outdir.")
flags.DEFINE_string("outdir", None, "Cohort: each pair writes OUTDIR/<name>/{moved,warp[,"
                    "moved_seg]}.nii.gz; OUTDIR/results.csv gets one row per pair. With "
                    "--moving='glob' --fixed=atlas: every matching scan to the atlas.")
flags.DEFINE_bool("write_ants", False, "Cohort: also OUTDIR/<name>/warp_ants.nii.gz.")
flags.DEFINE_bool("write_ants_inverse", False, "Cohort: also warp_ants_inverse.nii.gz "
                  "(diffeomorphic models).")
flags.DEFINE_string("shard", None, "Cohort: K/N, this job's share of the list (pairs i with "
                    "i %% N == K), for array jobs without a coordinator.")
flags.DEFINE_integer("batch", 1, "Cohort: up to this many pairs per network call and "
                     "refinement (GPU/TPU, where memory allows; each pair's result is the one it "
                     "gets alone; on a CPU, busy with one pair already, it gains nothing).",
                     lower_bound=1)
cli.define_distributed_flags(__name__)


def load_model():
  """``(model, variables, config, space)``; ``space`` is None for a workdir's model."""
  if FLAGS.workdir or FLAGS.checkpoint:
    model, variables, config = checkpoints.load_trained(FLAGS.workdir or FLAGS.checkpoint,
                                                        best=FLAGS.best)
    return precision.for_registration(model, FLAGS.dtype), variables, config, None
  model, variables, config = pretrained.load(FLAGS.model)
  return (precision.for_registration(model, FLAGS.dtype), variables, config,
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
    # Side by side: decompression releases the GIL (two 256x256x160 .nii.gz 0.16-0.22 ->
    # 0.12-0.15 s, 2-core Zen 4).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      fixed = pool.submit(io.load_volume, FLAGS.fixed)
      moving = io.load_volume(FLAGS.moving, FLAGS.moving_seg)
      fixed = fixed.result()
  with stages.stage("load the model"):
    model, variables, config, space = load_model()
  _check_space(space)
  instance = _instance()
  start = time.perf_counter()
  result = pipeline.register_native_volumes(model, variables, config, moving, fixed, space,
                                            FLAGS.affine, instance,
                                            inverse=bool(FLAGS.warp_ants_inverse),
                                            diagnostics=False)
  jax.block_until_ready(result["disp"])
  logging.info("registered in %.2f s (%.1f s of it compiling); loss %.5f -> %.5f%s",
               time.perf_counter() - start, sum(rec.compile_seconds.values()),
               result["loss_before"], result["loss_after"],
               f" after {instance.describe(config, result['steps'])}" if instance.total_steps
               else "")
  paths = {"moved": FLAGS.moved, "warp": FLAGS.warp, "moved_seg": FLAGS.moved_seg,
           "warp_ants": FLAGS.warp_ants, "warp_ants_inverse": FLAGS.warp_ants_inverse}
  for path in write_outputs(result, moving, fixed, paths):
    logging.info("wrote %s", path)


def _instance() -> registration.InstanceOptimisation:
  """The refinement the flags ask for: ``--fast`` takes FAST_STEPS unless ``--instance_steps``
  is given."""
  fast = FLAGS.fast and not FLAGS["instance_steps"].present
  return cli.instance_from_flags(registration.FAST_STEPS if fast else None)


def _check_space(space):
  if FLAGS.affine == "affine" and space is None:
    raise app.UsageError("--affine=affine needs a model with a template (the shipped pretrained "
                         "models); with --workdir use --affine=none on aligned scans")


_DESCRIBE = {"warp_ants": " (ANTs/ITK displacement field)",
             "warp_ants_inverse": " (inverse ANTs/ITK displacement field, moving grid)"}


def write_outputs(result: dict, moving, fixed, paths: dict) -> list[str]:
  """Writes the outputs ``paths`` names (``moved``, ``warp``, ``moved_seg``, ``warp_ants``,
  ``warp_ants_inverse``; None: not wanted), each atomically, side by side (compression releases
  the GIL). Returns what was written, for the log."""
  paths = {k: p for k, p in paths.items() if p}
  with stages.stage("fields and images to the host"):
    # Fortran-ordered (NIfTI's order, transposed by XLA); the ANTs fields are converted and
    # transposed by their writers (ants_io.save_ants_warp), side by side below.
    jobs = {}  # output -> (write, array)
    if "moved" in paths:
      jobs["moved"] = (lambda p, a: io.save_volume(p, a, like=fixed),
                       io.fortran_order(result["moved"].astype(np.float32)))
    if "warp" in paths:
      jobs["warp"] = (lambda p, a: io.save_volume(p, a, like=fixed),
                      io.fortran_order(result["disp"].astype(np.float32)))
    if "moved_seg" in paths:
      jobs["moved_seg"] = (lambda p, a: io.save_volume(p, a, like=fixed, key="seg"),
                           io.fortran_order(result["moved_seg"].astype(np.int32)))
    if "warp_ants" in paths:
      jobs["warp_ants"] = (lambda p, a: ants_io.save_ants_warp(p, a, fixed, moving),
                           result["disp"])
    if "warp_ants_inverse" in paths:
      jobs["warp_ants_inverse"] = (lambda p, a: ants_io.save_ants_warp(p, a, moving, fixed),
                                   result["inverse_disp"])
  with stages.stage(f"write {len(jobs)} files (side by side)"):
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
      futures = [pool.submit(write, paths[k], array) for k, (write, array) in jobs.items()]
      for future in futures:
        future.result()
  return [os.path.abspath(paths[k]) + _DESCRIBE.get(k, "") for k in jobs]


class _Stop:
  """Set by SIGTERM / SIGINT: the cohort loop finishes the pair at hand, then stops."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, _):
    self.signal = signal.Signals(signum).name

  def __exit__(self, *_):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def run_cohort():
  """Every pair of ``--pairs`` (or ``--moving`` glob -> ``--fixed``) into ``--outdir``."""
  outdir = FLAGS.outdir
  pairs = (cohort.read_pair_list(FLAGS.pairs) if FLAGS.pairs else
           cohort.pairs_from_glob(FLAGS.moving, FLAGS.fixed))
  index, count = (cohort.parse_shard(FLAGS.shard) if FLAGS.shard
                  else (jax.process_index(), jax.process_count()))
  mine = cohort.shard(pairs, index, count)
  extra = tuple(n for n, on in (("warp_ants", FLAGS.write_ants),
                                ("warp_ants_inverse", FLAGS.write_ants_inverse)) if on)
  os.makedirs(outdir, exist_ok=True)
  done = cohort.read_results(outdir)
  todo = [p for p in mine if not cohort.is_done(outdir, p, done, extra)]
  logging.info("%d pairs in the list; %d for this process (shard %d/%d), %d of them already "
               "done: %d to register into %s", len(pairs), len(mine), index, count,
               len(mine) - len(todo), len(todo), os.path.abspath(outdir))
  if not todo:
    _summary(outdir, mine)
    return
  model, variables, config, space = load_model()
  _check_space(space)
  instance = _instance()
  logging.info("each pair: %s; %s", "affine step + network" if FLAGS.affine == "affine"
               else "network", instance.describe(config))
  alignments = {}  # fixed scan -> its alignment to the model's space: an atlas is aligned once
  fixed_scans = {}  # and read once
  lock, fixed_lock, align_lock = threading.Lock(), threading.Lock(), threading.Lock()

  def load(pair):
    key = (pair.fixed, pair.fixed_seg)
    with fixed_lock:
      if key not in fixed_scans:
        fixed_scans.clear()  # keep one: bounded memory for lists with many fixed scans
        fixed_scans[key] = io.load_volume(pair.fixed, pair.fixed_seg)
      fixed = fixed_scans[key]
    return io.load_volume(pair.moving, pair.moving_seg), fixed

  def alignment_for(pair, fixed):
    with align_lock:
      if pair.fixed not in alignments:
        alignments.clear()
        alignments[pair.fixed] = pipeline.align_to_space(fixed, space)
      return alignments[pair.fixed]

  # Several local devices (GPUs, TPU cores): one worker per device takes the next pairs.
  devices = jax.local_devices()[:len(todo)]
  if len(devices) > 1:
    logging.info("pairs split across %d local devices", len(devices))
  if FLAGS.batch > 1:
    logging.info("up to %d pairs per network call and refinement", FLAGS.batch)
  queue = collections.deque(todo)
  progress = {"done": 0, "failed": 0}
  start = time.perf_counter()

  with _Stop() as stop, concurrent.futures.ThreadPoolExecutor(len(devices)) as reader:

    def take():
      """The next ``--batch`` pairs and their reads, submitted now."""
      with lock:
        group = []
        while queue and not stop.signal and len(group) < FLAGS.batch:
          group.append(queue.popleft())
      return [(pair, reader.submit(load, pair)) for pair in group]

    def worker(device):
      with jax.default_device(device):
        group = take()
        while group:
          following = take()  # read the next pairs while these register
          for pair, row in _register_group(group, model, variables, config, space, instance,
                                           alignment_for, outdir, extra):
            cohort.append_result(outdir, row)
            _log_progress(pair, row, progress, len(todo), start, lock)
          if stop.signal:
            return  # pairs read ahead have no row: the rerun registers them
          group = following

    with concurrent.futures.ThreadPoolExecutor(len(devices)) as pool:
      for future in [pool.submit(worker, d) for d in devices]:
        future.result()
    if stop.signal:
      logging.warning("%s: stopped after %d of %d pairs; run the same command again to do the "
                      "other %d", stop.signal, progress["done"], len(todo),
                      len(todo) - progress["done"])
      sys.exit(128 + getattr(signal, stop.signal))
  _summary(outdir, mine)


def _summary(outdir, mine):
  """Logs this process's share of the list by status; exit code 3 if any pair failed."""
  rows = cohort.read_results(outdir)
  mine_failed = sorted(p.name for p in mine if rows.get(p.name, {}).get("status") == "failed")
  logging.info("%d pairs for this process: %d ok, %d failed%s; results in %s", len(mine),
               len(mine) - len(mine_failed), len(mine_failed),
               f" ({', '.join(mine_failed)})" if mine_failed else "",
               os.path.abspath(cohort.results_path(outdir)))
  if mine_failed:
    sys.exit(EXIT_SOME_FAILED)


def _log_progress(pair, row, progress, total, start, lock):
  with lock:
    progress["done"] += 1
    progress["failed"] += row["status"] != "ok"
    done = progress["done"]
    rate = done / (time.perf_counter() - start) * 60
    eta = (total - done) / rate * 60 if rate else 0
    logging.info("pair %d/%d %s: %s in %.1f s%s; %.1f pairs/min, ETA %s, %d failed so far",
                 done, total, pair.name, row["status"], float(row["seconds"]),
                 f" (Dice {float(row['dice']):.3f})" if row["dice"] != "" else
                 (f": {row['error']}" if row["error"] else ""), rate, train.format_eta(eta),
                 progress["failed"])


def _register_group(group, model, variables, config, space, instance, alignment_for, outdir,
                    extra) -> list[tuple]:
  """Some pairs of a cohort (``[(pair, its read's future)]``): their outputs written, and each
  pair's ``results.csv`` row (``failed`` with the one-line error when anything about it goes
  wrong). Pairs on one grid shape (all of them after the affine step) register in one batch; if
  that fails, each registers alone, so one bad pair fails alone. Returns ``[(pair, row)]``."""
  rows, ready = [], []  # ready: (pair, row, moving, fixed, seconds so far)
  for pair, loading in group:
    start = time.perf_counter()
    row = {"name": pair.name, "moving": pair.moving, "fixed": pair.fixed, "dice": "",
           "folding_percent": "", "error": ""}
    rows.append((pair, row))
    cohort.remove_stale_temporaries(outdir, pair)
    try:
      moving, fixed = loading.result()
      ready.append((pair, row, moving, fixed, time.perf_counter() - start))
    except Exception as e:  # pylint: disable=broad-except  # one bad subject: a row, not a stop
      row.update(status="failed", error=cli.one_line(e),
                 seconds=f"{time.perf_counter() - start:.2f}")

  def register(items):
    fixed_alignments = [alignment_for(pair, fixed) if FLAGS.affine == "affine" else None
                        for pair, _, _, fixed, _ in items]
    return pipeline.register_native_volume_batch(
        model, variables, config, [(moving, fixed) for _, _, moving, fixed, _ in items], space,
        FLAGS.affine, instance, inverse="warp_ants_inverse" in extra, diagnostics=False,
        fixed_alignments=fixed_alignments)

  shape_groups = collections.defaultdict(list)  # the model's grid, or each scan's own
  for item in ready:
    shape_groups[None if FLAGS.affine == "affine" else item[2].image.shape].append(item)
  for items in shape_groups.values():
    start = time.perf_counter()
    results = None
    if len(items) > 1:
      try:
        results = register(items)
      except Exception as e:  # pylint: disable=broad-except  # retried pair by pair below
        logging.warning("a batch of %d pairs failed (%s); registering them one at a time",
                        len(items), cli.one_line(e))
    shared = (time.perf_counter() - start) / len(items)
    for i, (pair, row, moving, fixed, seconds) in enumerate(items):
      start = time.perf_counter()
      try:
        result = results[i] if results else register([items[i]])[0]
        _finish_pair(pair, row, result, moving, fixed, outdir, extra)
      except Exception as e:  # pylint: disable=broad-except
        row.update(status="failed", error=cli.one_line(e))
      row["seconds"] = f"{seconds + shared + time.perf_counter() - start:.2f}"
  return rows


def _finish_pair(pair, row, result, moving, fixed, outdir, extra):
  """One registered pair of a cohort: its folding and Dice in ``row``, its files written."""
  det = np.asarray(pipeline.world_jacobian(result["disp"], fixed, moving))
  row["folding_percent"] = f"{100.0 * float(np.mean(det <= 0)):.4f}"
  if moving.seg is not None and fixed.seg is not None:
    labels = [int(v) for v in np.unique(fixed.seg) if v != 0]
    dice = evaluation.dice_per_label(result["moved_seg"], fixed.seg, labels)
    row["dice"] = f"{float(np.nanmean(dice)):.5f}"
  write_outputs(result, moving, fixed, cohort.pair_outputs(outdir, pair, extra))
  row["status"] = "ok"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if FLAGS.workdir and FLAGS.checkpoint:
    raise app.UsageError("give at most one of --workdir and --checkpoint")
  logging.set_verbosity(logging.INFO)
  if FLAGS.pairs or FLAGS.outdir:
    if not FLAGS.outdir:
      raise app.UsageError("--pairs needs --outdir (each pair writes into OUTDIR/<name>/)")
    if not FLAGS.pairs and not (FLAGS.moving and FLAGS.fixed):
      raise app.UsageError("--outdir needs --pairs=LIST.csv, or --moving='glob' and --fixed")
    if FLAGS.pairs and (FLAGS.moving or FLAGS.fixed):
      raise app.UsageError("give --pairs or --moving/--fixed, not both")
    single = [f for f in ("moved", "warp", "moved_seg", "warp_ants", "warp_ants_inverse",
                          "moving_seg") if getattr(FLAGS, f)]
    if single:
      raise app.UsageError(f"--{', --'.join(single)}: one-pair flags; with --outdir each pair "
                           "writes moved.nii.gz, warp.nii.gz (moved_seg.nii.gz with labels; "
                           "--write_ants, --write_ants_inverse) into OUTDIR/<name>/")
    if FLAGS.shard and FLAGS.coordinator_address:
      raise app.UsageError("give --shard or --coordinator_address, not both")
    if FLAGS.shard:
      try:
        cohort.parse_shard(FLAGS.shard)
      except ValueError as e:
        raise app.UsageError(str(e)) from e
    cli.initialize_distributed("or --shard=K/N for array jobs without a coordinator")
    target = run_cohort
  else:
    _check_one_pair_flags()
    target = run
  stages.enable_compilation_cache()
  cli.run_reporting_errors("vmjax-register", target)


def _check_one_pair_flags():
  if not (FLAGS.moving and FLAGS.fixed):
    raise app.UsageError("give --moving and --fixed (one pair), or --pairs/--outdir (a cohort)")
  if FLAGS.batch > 1:
    raise app.UsageError("--batch: pairs per network call in a cohort (--pairs or --outdir)")
  if FLAGS.moved_seg and not FLAGS.moving_seg:
    raise app.UsageError("--moved_seg needs --moving_seg")
  if not (FLAGS.moved or FLAGS.warp or FLAGS.moved_seg or FLAGS.warp_ants):
    raise app.UsageError("nothing to write: give --moved, --warp, --warp_ants and/or --moved_seg")


def entry_point():
  """``vmjax-register`` (installed command); ends the process once every output is written
  (:func:`vmjax.cli.exit_now`)."""
  cli.run_main(main, __name__, __doc__, exit_at_once=True)


if __name__ == "__main__":
  entry_point()
