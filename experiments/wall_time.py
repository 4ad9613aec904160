r"""Wall time of whole commands per pair: ``vmjax-register`` as a user runs it against ANTs'
quick default SyN, one after the other on the same machine.

  python -m experiments.wall_time --moving='../shared/data/oasis_trt20_native/OASIS-TRT-20-1[345]/t1.nii.gz' \
      --fixed=../shared/data/oasis_trt20_native/OASIS-TRT-20-1/t1.nii.gz --methods=vmjax,ants

``vmjax``: ``python -m experiments.register`` in a fresh process per pair with the default
settings (plus ``--register_args``), writing ``--moved``, ``--warp`` and ``--warp_ants``; the
process's whole wall time (start, imports, reading, registration, writes). The first call is
reported apart (it fills the compilation caches); the table's per-pair time is a second run of
each pair, caches warm. ``ants``: ``ants.registration(type_of_transform="SyN")`` (antspyx's quick
default) on ``ants.image_read`` images (spacing, origin, direction from the files), all cores
(ITK's default), timed from reading to the returned transforms (generous to ANTs: no writes, no
process start). Prints the CPU model and a markdown table, and the ratio vmjax / ANTs.
"""

import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("moving", None, "Moving scans (a glob).")
flags.DEFINE_string("fixed", None, "The fixed scan.")
flags.DEFINE_list("methods", ["vmjax", "ants"], "vmjax, ants.")
flags.DEFINE_string("register_args", "", "Extra flags for the vmjax command (space-separated).")
flags.mark_flags_as_required(["moving", "fixed"])


def time_vmjax(moving: str, fixed: str, outdir: str) -> float:
  cmd = [sys.executable, "-m", "experiments.register", f"--moving={moving}", f"--fixed={fixed}",
         f"--moved={outdir}/moved.nii.gz", f"--warp={outdir}/warp.nii.gz",
         f"--warp_ants={outdir}/warp_ants.nii.gz"] + FLAGS.register_args.split()
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  return seconds


def time_ants(moving: str, fixed: str) -> float:
  import ants
  start = time.perf_counter()
  reg = ants.registration(fixed=ants.image_read(fixed), moving=ants.image_read(moving),
                          type_of_transform="SyN")
  seconds = time.perf_counter() - start
  assert reg["fwdtransforms"], "ANTs returned no transform"
  return seconds


def main(argv):
  del argv
  from vmjax.native import build
  movings = sorted(glob.glob(FLAGS.moving))
  if not movings:
    raise app.UsageError(f"--moving={FLAGS.moving} matches no file")
  print(f"CPU: {build.cpu_model()} ({os.cpu_count()} cores), bf16 instructions: "
        f"{build.bf16_isa() or 'none'}", flush=True)
  rows = {}
  if "vmjax" in FLAGS.methods:
    with tempfile.TemporaryDirectory() as outdir:
      first = time_vmjax(movings[0], FLAGS.fixed, outdir)
      print(f"vmjax first call (fills the caches): {first:.1f} s", flush=True)
      name = f"vmjax-register {FLAGS.register_args}" if FLAGS.register_args else \
          "vmjax-register (default)"
      rows[name] = [time_vmjax(m, FLAGS.fixed, outdir) for m in movings]
  if "ants" in FLAGS.methods:
    try:
      import ants  # noqa: F401
    except ImportError:
      print("ants: skipped (antspyx not installed: pip install -r requirements-ants.txt)")
    else:
      rows['ants.registration(type_of_transform="SyN")'] = [time_ants(m, FLAGS.fixed)
                                                           for m in movings]
  print("\n| command | s / pair (median) | per pair |")
  print("|---|---|---|")
  for name, secs in rows.items():
    print(f"| {name} | {statistics.median(secs):.1f} | {' / '.join(f'{s:.1f}' for s in secs)} |")
  if len(rows) == 2:
    vm, an = (statistics.median(s) for s in rows.values())
    print(f"\nvmjax / ANTs SyN: {vm / an:.3f}")


if __name__ == "__main__":
  app.run(main)
