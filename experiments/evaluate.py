r"""Evaluates registration methods side by side on the same labelled pairs.

Atlas protocol (subjects -> atlas, e.g. OASIS-TRT-20 subjects 13-15 -> subject 1):
  python -m experiments.evaluate --outdir=eval/oasis \
      --moving=../shared/data/oasis_trt20/OASIS-TRT-20-1[345]/t1.nii.gz \
      --fixed=../shared/data/oasis_trt20/OASIS-TRT-20-1/t1.nii.gz \
      --labels=../shared/data/oasis_trt20/labels.txt \
      --methods=identity,vmjax,vmjax_instance,ants:SyN,ants:SyNCC,ants:antsRegistrationSyN[s]
Native protocol (the same subjects as acquired: any grids, the affine step included):
  python -m experiments.evaluate --outdir=eval/native \
      --moving=../shared/data/oasis_trt20_native/OASIS-TRT-20-1[345]/t1.nii.gz \
      --fixed=../shared/data/oasis_trt20_native/OASIS-TRT-20-1/t1.nii.gz \
      --labels=../shared/data/oasis_trt20/labels.txt \
      --methods=identity,vmjax_affine,vmjax_native,ants:Affine,ants:SyN,ants:antsRegistrationSyN[s]
Synthetic protocol (random smooth diffeomorphic deformations of one scan, fixed = the scan):
  python -m experiments.evaluate --workdir=runs/x --synthetic=../shared/data/test_scan.npz \
      --num_pairs=5 --outdir=eval/synthetic

Writes results.csv (one row per method, pair and label), summary.json (per method: Dice
mean ± std over pairs, non-positive Jacobian % and count, seconds per pair, compile apart) and
figures (fig4_<method>.png: an example registration; fig5_dice.png: per-structure box plots).
"""

import csv
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

from vmjax import augment
from vmjax import checkpoints
from vmjax import checks
from vmjax import cli
from vmjax import data
from vmjax import evaluation
from vmjax import freesurfer
from vmjax import io
from vmjax import metrics
from vmjax import plots
from vmjax import precision
from vmjax import pretrained
from vmjax import registration
from vmjax.atomic import atomic_path

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Trained vmjax workdir (or a checkpoint directory); default: "
                    "the shipped pretrained model.")
flags.DEFINE_string("model", pretrained.DEFAULT, "Shipped pretrained model (without --workdir).")
flags.DEFINE_bool("best", False, "With --workdir: its checkpoint with the best validation Dice.")
flags.DEFINE_string("outdir", None, "Where to write results.csv, summary.json and figures.")
flags.DEFINE_string("moving", None, "Moving scans: glob, directory, .txt list, comma-separated.")
flags.DEFINE_string("fixed", None, "The fixed scan (atlas) with labels.")
flags.DEFINE_string("pairs", None, "Or: scans registered pairwise, each to the next.")
flags.DEFINE_string("synthetic", None, "Or: one labelled scan, deformed randomly (fixed = it).")
flags.DEFINE_integer("num_pairs", 5, "Synthetic pairs.")
flags.DEFINE_integer("seed", 2024, "Seed of the synthetic deformations (not training's).")
flags.DEFINE_float("deform_std", 4.0, "Synthetic velocity std in voxels at control points.")
flags.DEFINE_float("deform_spacing", 32.0, "Synthetic control-point spacing in voxels.")
flags.DEFINE_list("seg_replace", ["t1", "labels"], "NIfTI label file-name swap (old,new).")
flags.DEFINE_string("labels", None, "Labels: .txt or comma list; default VoxelMorph's 30.")
flags.DEFINE_list("methods", ["identity", "vmjax", "vmjax_instance", "ants:SyN"],
                  "Methods to compare: identity, vmjax, vmjax_instance (pairs on one grid), "
                  "vmjax_native / vmjax_affine (the whole path from any grids / its affine step "
                  "alone), vmjax_native_instance (with --instance_steps), ants:PRESET "
                  "(ants:Affine, ants:SyN, ants:SyNCC, ants:antsRegistrationSyN[s], ...; cached "
                  "per pair in OUTDIR/cache).")
flags.DEFINE_enum("dtype", None, precision.DTYPES, precision.DTYPE_HELP)
flags.DEFINE_integer("batch", 1, "Pairs per network call for vmjax and vmjax_instance (pairs "
                     "already on one grid; consecutive pairs of one shape are batched; seconds "
                     "per pair = the call's time / its pairs).", lower_bound=1)
cli.define_instance_flags(__name__, default_steps=registration.DEFAULT_STEPS,
                          default_tol=registration.DEFAULT_TOL)
flags.mark_flags_as_required(["outdir"])


def load_pairs():
  seg_replace = tuple(FLAGS.seg_replace) if FLAGS.seg_replace else None
  load = lambda spec, what: [io.load_volume(i, s)
                             for i, s in io.resolve_sources(spec, seg_replace, what)]
  chosen = [bool(FLAGS.moving), bool(FLAGS.pairs), bool(FLAGS.synthetic)]
  if sum(chosen) != 1:
    raise app.UsageError("give exactly one of --moving (with --fixed), --pairs, --synthetic")
  if FLAGS.moving:
    if not FLAGS.fixed:
      raise app.UsageError("--moving needs --fixed")
    fixed = load(FLAGS.fixed, "--fixed")[0]
    return [(m, fixed) for m in load(FLAGS.moving, "--moving")]
  if FLAGS.pairs:
    scans = load(FLAGS.pairs, "--pairs")
    if len(scans) < 2:
      raise app.UsageError("--pairs needs at least two scans")
    return [(scans[i], scans[(i + 1) % len(scans)]) for i in range(len(scans))]
  scan = load(FLAGS.synthetic, "--synthetic")[0]
  if scan.seg is None:
    raise checks.DataError(f"--synthetic scan {scan.path} has no labels")
  cfg = ml_collections.ConfigDict(dict(deform_std=FLAGS.deform_std,
                                       deform_spacing=FLAGS.deform_spacing, gamma_std=0.0,
                                       bias_std=0.0, noise_std=0.0))
  return augment.synthetic_pairs(scan, FLAGS.num_pairs, FLAGS.seed, cfg)


def build_methods():
  methods, notes = {}, {}
  needs_model = ({"vmjax", "vmjax_instance", "vmjax_native", "vmjax_native_instance",
                  "vmjax_affine"} & set(FLAGS.methods))
  if needs_model:
    if FLAGS.workdir:
      model, variables, config = checkpoints.load_trained(FLAGS.workdir, best=FLAGS.best)
      space = None
    else:
      model, variables, config = pretrained.load(FLAGS.model)
      space = pretrained.space(FLAGS.model)
    model = precision.for_registration(model, FLAGS.dtype)
  for name in FLAGS.methods:
    preset = name.split(":", 1)[1] if name.startswith("ants:") else (
        "SyN" if name == "ants_syn" else None)
    if name == "identity":
      methods[name] = evaluation.identity_method
    elif name == "vmjax":
      methods[name] = evaluation.vmjax_method(model, variables, config)
    elif name == "vmjax_instance":
      methods[name] = evaluation.vmjax_method(model, variables, config,
                                              cli.instance_from_flags())
    elif name in ("vmjax_native", "vmjax_native_instance", "vmjax_affine"):
      if space is None:
        raise app.UsageError(f"{name} needs a model with a template space (the shipped "
                             "pretrained models: leave out --workdir)")
      instance = cli.instance_from_flags(None if name == "vmjax_native_instance" else 0)
      methods[name] = evaluation.vmjax_pipeline_method(
          model, variables, config, space, deformable=name != "vmjax_affine",
          instance=instance)
    elif preset is not None:
      if preset not in evaluation.ANTS_PRESETS:
        raise app.UsageError(f"unknown ANTs preset {preset!r} (one of "
                             f"{', '.join(evaluation.ANTS_PRESETS)})")
      if evaluation.ants_available():
        methods[name] = evaluation.ants_method(preset, os.path.join(FLAGS.outdir, "cache"))
      else:
        notes[name] = ("skipped: antspyx is not installed "
                       "(pip install -r requirements-ants.txt)")
        logging.warning("%s %s", name, notes[name])
    else:
      raise app.UsageError(f"unknown method {name!r}")
  return methods, notes


def write_outputs(records, labels, summary, pairs):
  rows = [{"method": r["method"], "pair": r["pair"], "moving": r["moving"], "fixed": r["fixed"],
           "label": label, "structure": freesurfer.label_name(label), "dice": r["dice"][i],
           "folding_fraction": r["folding_fraction"], "folding_count": r["folding_count"],
           "seconds": r["seconds"]} for r in records for i, label in enumerate(labels)]
  with atomic_path(os.path.join(FLAGS.outdir, "results.csv")) as tmp, \
      open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  with atomic_path(os.path.join(FLAGS.outdir, "summary.json")) as tmp, open(tmp, "w") as f:
    json.dump(summary, f, indent=2)
  if not plots.available():
    logging.warning("matplotlib not installed: no figures (pip install -r requirements-demo.txt)")
    return
  plots.dice_boxplot(os.path.join(FLAGS.outdir, "fig5_dice.png"), records, labels,
                     freesurfer.structure_name)
  for r in records:
    out = r["outcome"]
    if r["pair"] != 0 or out.disp is None or r["method"] == "identity":
      continue
    det = np.asarray(metrics.jacobian_determinant(out.disp[None]))[0]
    moving, fixed = pairs[0]
    plots.registration_figure(os.path.join(FLAGS.outdir, f"fig4_{r['method']}.png"),
                              moving.image, fixed.image, out.moved, out.disp, det,
                              title=f"{r['method']}: {evaluation.scan_name(moving.path)} -> "
                                    f"{evaluation.scan_name(fixed.path)}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.set_verbosity(logging.INFO)
  pairs = load_pairs()
  labels = (data.read_labels(FLAGS.labels) if FLAGS.labels
            else list(freesurfer.VOXELMORPH_LABELS))
  methods, notes = build_methods()
  start = time.perf_counter()
  records = evaluation.evaluate_methods(methods, pairs, labels, FLAGS.batch)
  summary = {"methods": evaluation.summarize(records), "skipped": notes,
             "labels": labels, "pairs": [[m.path, f.path] for m, f in pairs],
             "batch": FLAGS.batch,
             "wall_seconds": time.perf_counter() - start}
  write_outputs(records, labels, summary, pairs)
  print("| method | Dice mean ± std | non-pos. Jacobian % (count) | s / pair | compile s |")
  print("|---|---|---|---|---|")
  for name, s in summary["methods"].items():
    print(f"| {name} | {s['dice_mean']:.3f} ± {s['dice_std']:.3f} | "
          f"{s['folding_percent_mean']:.4f} ({s['folding_count_mean']:.0f}) | "
          f"{s['seconds_per_pair']:.2f} | {s['compile_seconds']:.1f} |")
  for name, note in notes.items():
    print(f"{name:<16} {note}")
  print(f"results in {os.path.abspath(FLAGS.outdir)}")


def entry_point():
  """``vmjax-evaluate`` (installed command)."""
  cli.run_main(main, __name__, __doc__)


if __name__ == "__main__":
  entry_point()
