r"""Makes a shipped pretrained model (``vmjax/weights/NAME.*``) from a training workdir.

  python -m experiments.export_pretrained --workdir=runs/oasis_pairs --name=oasis-vm2-diff \
      --hardware="2-core AMD EPYC (AVX512-BF16), oneDNN path"

Takes the checkpoint with the best validation Dice in ``metrics.jsonl`` (or ``--step``), writes
its parameters (flax msgpack), a model card (the config with inference settings, the model's
grid, training facts, licence) and a template of the model's space: the mean of the training
scans (99.5th-percentile normalised), at 2 mm. See ``vmjax/pretrained.py``.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
from flax import serialization
import jax
import ml_collections
import numpy as np

from vmjax import checkpoints
from vmjax import data
from vmjax import io
from vmjax import pretrained
from vmjax.atomic import atomic_path

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: best validation Dice).")
flags.DEFINE_string("name", pretrained.DEFAULT, "Model name.")
flags.DEFINE_string("hardware", "", "What trained it (for the model card).")
flags.DEFINE_string("description", "", "What it was trained on and how (for the model card).")
flags.DEFINE_string("licence", "CC BY-NC-SA 3.0 (derived from the OASIS-TRT-20 / Mindboggle-101 "
                    "training scans): research and non-commercial use, with attribution (Klein & "
                    "Tourville 2012), derivatives under the same licence. vmjax's code is "
                    "Apache-2.0; these weights are not.", "Licence of the weights.")
flags.mark_flags_as_required(["workdir"])


def validation_history(workdir: str) -> dict[int, dict]:
  """``{step: metrics}`` of the validation rows of ``metrics.jsonl``."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "val/dice" in record:
        rows[int(record["step"])] = record
  return rows


def template(config) -> tuple[io.Volume, tuple, np.ndarray]:
  """Mean training scan at 2 mm, and the 1 mm grid (shape, affine) of the training scans."""
  d = config.data
  volumes = data.load_set(d.train, tuple(d.seg_replace), "data.train", normalize="foreground")
  mean = np.mean([v.image for v in volumes], axis=0)
  first = volumes[0]
  low = data.downsample(io.Volume(mean.astype(np.float32), None, first.affine, "template"), 2)
  return low, first.image.shape, first.affine


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.set_verbosity(logging.INFO)
  manager = checkpoints.CheckpointManager(os.path.join(FLAGS.workdir, "checkpoints"),
                                          max_to_keep=None)
  history = validation_history(FLAGS.workdir)
  steps = manager.all_steps()
  step = FLAGS.step
  if step is None:
    scored = [s for s in steps if s in history]
    if not scored:
      raise app.UsageError(f"no checkpoint of {FLAGS.workdir} has a validation Dice; give --step")
    step = max(scored, key=lambda s: history[s]["val/dice"])
  meta = manager.restore_meta(step)
  params = jax.device_get(manager.restore_params(step))
  config = meta["config"]
  low, shape, grid_affine = template(ml_collections.ConfigDict(config))
  config["data"]["normalize"] = "foreground"  # native scans in: scale as the training data were
  for key in ("train", "val", "atlas", "labels"):  # this machine's paths: keep the file names
    config["data"][key] = ",".join(os.path.join(*p.split(os.sep)[-2:]) if os.sep in p else p
                                   for p in str(config["data"][key]).split(",") if p)
  val = history.get(step, {})
  card = {
      "name": FLAGS.name,
      "config": config,
      "grid": {"shape": list(shape), "affine": np.asarray(grid_affine).tolist()},
      "training": {"description": FLAGS.description, "checkpoint_step": step,
                   "steps_trained": max(steps),
                   "validation_dice": val.get("val/dice"),
                   "validation_dice_before": val.get("val/dice_before"),
                   "validation_folding": val.get("val/folding"),
                   "hardware": FLAGS.hardware},
      "licence": FLAGS.licence,
  }
  os.makedirs(pretrained.WEIGHTS, exist_ok=True)
  base = os.path.join(pretrained.WEIGHTS, FLAGS.name)
  with atomic_path(base + ".msgpack") as tmp, open(tmp, "wb") as f:
    f.write(serialization.to_bytes(params))
  with atomic_path(base + ".json") as tmp, open(tmp, "w") as f:
    json.dump(card, f, indent=1)
  scaled = np.clip(np.rint(low.image * 255), 0, 255).astype(np.uint8)
  io.save_volume(base + "_template.nii.gz", scaled, like=low)
  logging.info("exported step %d (validation Dice %s) to %s.{msgpack,json,_template.nii.gz}",
               step, val.get("val/dice"), base)


if __name__ == "__main__":
  app.run(main)
