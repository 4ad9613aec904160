r"""Speed and memory of register() and of one training step, per model variant.

  python -m experiments.benchmark --shape=80,96,112 --batch=1 --steps=5

Each variant runs in a fresh subprocess so its peak resident memory is its own. Times are
medians over ``--steps`` runs after one warm-up; compile time is reported apart.
"""

import json
import os
import platform
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("shape", "80,96,112", "Spatial shape D,H,W (each divisible by 16).")
flags.DEFINE_integer("batch", 1, "Pairs per call.")
flags.DEFINE_integer("steps", 5, "Timed repetitions (after one warm-up).")
flags.DEFINE_list("variants", ["vm1", "vm2", "diffeomorphic"], "Model variants to time.")
flags.DEFINE_bool("train", True, "Also time a training step (value_and_grad + Adam).")
flags.DEFINE_string("child", None, "Internal: run one variant and print JSON.")

CONFIG_ARGS = {"vm1": "variant=vm1", "vm2": "variant=vm2",
               "diffeomorphic": "variant=vm2,int_steps=7,bidir=True"}


def _median_time(fn, steps):
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  times.sort()
  return times[len(times) // 2]


def run_variant(variant, shape, batch, steps, with_train):
  import jax
  import numpy as np
  import vmjax
  from configs import default
  from vmjax import train

  config = default.get_config(CONFIG_ARGS[variant])
  model = train.model_from_config(config.model)
  rng = np.random.default_rng(0)
  moving, fixed = (jax.numpy.asarray(rng.uniform(size=(batch, *shape, 1)), "float32")
                   for _ in range(2))
  variables = vmjax.init_variables(model, jax.random.PRNGKey(0), shape)
  result = {"variant": variant, "params": vmjax.count_params(variables["params"])}

  start = time.perf_counter()
  jax.block_until_ready(vmjax.register(model, variables, moving, fixed))
  result["register_compile_s"] = time.perf_counter() - start
  result["register_s"] = _median_time(
      lambda: jax.block_until_ready(vmjax.register(model, variables, moving, fixed)), steps)

  if with_train:
    state = train.create_train_state(config, jax.random.PRNGKey(0), shape)
    step = jax.jit(train.make_train_step(config, axis_name=None), donate_argnums=(0,))
    batch_arrays = {"moving": moving, "fixed": fixed}
    start = time.perf_counter()
    state, metrics = step(state, batch_arrays)
    jax.block_until_ready(metrics)
    result["train_compile_s"] = time.perf_counter() - start
    holder = [state]

    def one_step():
      holder[0], m = step(holder[0], batch_arrays)
      jax.block_until_ready(m)
    result["train_step_s"] = _median_time(one_step, steps)
  # ru_maxrss is in KiB on Linux.
  result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  return result


def main(argv):
  del argv
  shape = tuple(int(n) for n in FLAGS.shape.replace("x", ",").split(","))
  if FLAGS.child:
    print("RESULT " + json.dumps(run_variant(FLAGS.child, shape, FLAGS.batch, FLAGS.steps,
                                             FLAGS.train)))
    return
  import jax
  print(f"vmjax benchmark: shape {shape}, batch {FLAGS.batch}, median of {FLAGS.steps}; "
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
  rows = []
  for variant in FLAGS.variants:
    cmd = [sys.executable, "-m", "experiments.benchmark", f"--child={variant}",
           f"--shape={FLAGS.shape}", f"--batch={FLAGS.batch}", f"--steps={FLAGS.steps}",
           f"--train={FLAGS.train}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      print(f"{variant}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
      continue
    rows.append(json.loads(lines[-1][len("RESULT "):]))
  header = ("variant", "params", "register s", "compile s", "train step s", "compile s",
            "peak RSS GiB")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    print(f"| {r['variant']} | {r['params']:,} | {r['register_s']:.3f} | "
          f"{r['register_compile_s']:.1f} | {r.get('train_step_s', float('nan')):.3f} | "
          f"{r.get('train_compile_s', float('nan')):.1f} | {r['peak_rss_gib']:.2f} |")


if __name__ == "__main__":
  app.run(main)
