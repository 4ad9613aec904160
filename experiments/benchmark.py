r"""Speed and memory of register() and of one training step, vmjax against PyTorch.

  python -m experiments.benchmark --shapes=80x96x112 --steps=5
  python -m experiments.benchmark --shapes=80x96x112,160x192x224 --compare=torch,voxelmorph

Rows (each in a fresh subprocess, so that its peak resident memory is its own):
  vmjax <variant> [<conv>]  ``vmjax.register()`` and one jitted train step (loss, grad, Adam);
                            conv = ``onednn`` (default on CPU) or ``xla`` (XLA's convolution);
                            one row per ``--dtype`` (float32, bfloat16: bf16 convolutions with
                            f32 parameters, field and loss).
  torch vm2 / vm1           the same architecture and loss in PyTorch, channels-last
                            (``experiments/torch_reference.py``), ``--compare=torch``.
  voxelmorph default        the ``voxelmorph`` package's default ``VxmPairwise``
                            (``--compare=voxelmorph``).
  vmjax pipeline            ``--compare=native``: the whole path of ``vmjax-register`` on a
                            256x256x160 pair on two grids of different orientation (the shipped
                            model's template resampled onto them): both affine steps,
                            resampling, the network, the composed field, the moved scan
                            (``pipeline.register_native_volumes``), per ``--dtype``.
Times are medians over ``--steps`` runs after one warm-up (compile reported apart). GFLOP/s
counts the network's convolutions only (forward: 2 * out voxels * 27 * Cin * Cout per conv;
train step: 3x forward) against f32 GEMM rates measured in the same run (XLA and PyTorch,
4096^3). Ratios are vmjax / ``torch vm2`` (float32) on the same shape. PyTorch uses all cores
(``torch.set_num_threads(os.cpu_count())``) like XLA. The header names the CPU and its bf16
instructions (AMX / AVX512-BF16 / none): these machines differ from run to run.
"""

import json
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["80x96x112"], "Spatial shapes DxHxW (each divisible by 16).")
flags.DEFINE_integer("batch", 1, "Pairs per call (register() and the train step take a batch; "
                     "pairs/s = batch / register s).")
flags.DEFINE_integer("steps", 5, "Timed repetitions (after one warm-up).")
flags.DEFINE_list("variants", ["vm1", "vm2", "diffeomorphic"], "vmjax model variants.")
flags.DEFINE_list("conv", ["onednn"], "vmjax CPU convolution paths to time: onednn, xla.")
flags.DEFINE_list("compare", [], "Also time: torch (same architecture), voxelmorph (official), "
                  "native (the whole vmjax-register path on a 256x256x160 pair), "
                  "conv (one 34->32 3x3x3 conv: XLA vs oneDNN).")
flags.DEFINE_list("dtype", ["float32"], "vmjax computation dtypes to time: float32, bfloat16.")
flags.DEFINE_bool("train", True, "Also time a training step.")
flags.DEFINE_bool("remat", False, "vmjax train step with rematerialised conv blocks.")
flags.DEFINE_string("child", None, "Internal: run one row and print JSON.")

CONFIG_ARGS = {"vm1": "variant=vm1", "vm2": "variant=vm2",
               "diffeomorphic": "variant=vm2,int_steps=7,bidir=True"}


def conv_gflop(variant, shape, batch=1):
  """Forward convolution GFLOP of vmjax's U-Net + flow conv (as networks.Unet builds it)."""
  from vmjax import networks  # each row's child process imports jax itself, after its settings
  enc, dec = networks.variant_features("vm1" if variant == "vm1" else "vm2")
  voxels = batch * shape[0] * shape[1] * shape[2]
  flops, channels, skips = 0, 2, [2]
  for level, f in enumerate(enc, start=1):
    flops += 2 * voxels / 8 ** level * 27 * channels * f
    channels = f
    skips.append(f)
  skips.pop()
  for i, f in enumerate(dec[:len(enc)]):
    flops += 2 * voxels / 8 ** (len(enc) - i) * 27 * channels * f
    channels = f + skips.pop()
  for f in list(dec[len(enc):]) + [3]:
    flops += 2 * voxels * 27 * channels * f
    channels = f
  return flops / 1e9


def _first_and_median(fn, steps):
  """Seconds of the first call (compile included) and the median of ``steps`` more."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start, _median_time(fn, steps)


def _median_time(fn, steps):
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  times.sort()
  return times[len(times) // 2]


def _peak_rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def _conv_label() -> str:
  """Which convolution a vmjax row ran: ``onednn`` / ``xla`` on CPU, XLA's elsewhere."""
  import jax
  from vmjax import conv
  if jax.default_backend() != "cpu":
    return f"xla ({jax.default_backend()})"
  return "onednn" if conv.onednn_available() else "xla"


def run_vmjax(variant, conv_path, shape, batch, steps, with_train, remat, dtype="float32"):
  if conv_path == "xla":
    os.environ["VMJAX_CONV"] = "xla"
  import jax
  import numpy as np
  import vmjax
  from vmjax.configs import default
  from vmjax import networks
  from vmjax import train

  config = default.get_config(CONFIG_ARGS[variant])
  config.model.remat = remat
  config.model.dtype = dtype
  model = networks.model_from_config(config.model)
  rng = np.random.default_rng(0)
  moving, fixed = (jax.numpy.asarray(rng.uniform(size=(batch, *shape, 1)), "float32")
                   for _ in range(2))
  variables = vmjax.init_variables(model, jax.random.PRNGKey(0), shape)
  result = {"impl": "vmjax", "model": variant,
            "conv": _conv_label() + (" remat" if remat else ""),
            "dtype": dtype,
            "params": vmjax.count_params(variables["params"])}

  result["register_compile_s"], result["register_s"] = _first_and_median(
      lambda: jax.block_until_ready(vmjax.register(model, variables, moving, fixed)), steps)
  result["register_peak_rss_gib"] = _peak_rss_gib()
  if with_train:
    state = train.create_train_state(model, config, jax.random.PRNGKey(0), shape)
    step = jax.jit(train.make_train_step(model, config, axis_name=None), donate_argnums=(0,))
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
  result["peak_rss_gib"] = _peak_rss_gib()
  return result


def run_torch(model_name, shape, batch, steps, with_train):
  import torch
  from experiments import torch_reference as ref
  from vmjax import networks

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if model_name == "default":
    if any(n % ref.OFFICIAL_MULTIPLE for n in shape):
      raise ValueError(f"the voxelmorph default model needs sizes divisible by "
                       f"{ref.OFFICIAL_MULTIPLE}; {shape} is not")
    model, impl = ref.official_vxm(), "voxelmorph"
  else:
    model, impl = ref.TorchVxm(networks.variant_features(model_name)), "torch"
  memory_format = torch.channels_last_3d
  model = model.to(device=device, memory_format=memory_format)
  moving, fixed = (torch.rand(batch, 1, *shape, device=device).contiguous(
      memory_format=memory_format) for _ in range(2))
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  result = {"impl": impl, "model": model_name, "conv": f"torch {torch.__version__} ({device})",
            "params": ref.count_params(model)}

  def register():
    with torch.inference_mode():
      disp = model(moving, fixed)
      disp = disp[0] if isinstance(disp, (tuple, list)) else disp
      ref.warp(moving, disp)
    sync()

  result["register_compile_s"], result["register_s"] = _first_and_median(register, steps)
  if with_train:
    step = ref.train_step_fn(model)

    def one_step():
      step(moving, fixed)
      sync()
    result["train_compile_s"], result["train_step_s"] = _first_and_median(one_step, steps)
  result["peak_rss_gib"] = _peak_rss_gib()
  return result


def run_gemm(steps):
  """f32 4096^3 matrix product rate, XLA and PyTorch (if installed; its GPU if it has one)."""
  import jax
  import numpy as np
  n = 4096
  a = jax.numpy.asarray(np.random.default_rng(0).standard_normal((n, n)), "float32")
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  rates = {"xla": 2 * n ** 3 / _median_time(
      lambda: jax.block_until_ready(matmul(a)), steps) / 1e9}
  try:
    import torch
    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = torch.randn(n, n, device=device)
    torch.mm(t, t)
    sync()

    def product():
      torch.mm(t, t)
      sync()
    rates["torch"] = 2 * n ** 3 / _median_time(product, steps) / 1e9
  except ImportError:
    pass
  return rates


def run_native_pair(steps, dtype):
  """``pipeline.register_native_volumes`` with the shipped model on a synthetic 256x256x160
  native pair: two 1 mm grids, a sagittal-first (ASL-like) orientation, rotated 6 and -4
  degrees about different axes and shifted, holding the model's template."""
  import jax
  import numpy as np
  import vmjax
  from vmjax import affine as affine_lib
  from vmjax import pipeline
  from vmjax import precision
  from vmjax import pretrained

  model, variables, config = pretrained.load()
  model = precision.with_dtype(model, dtype)
  space = pretrained.space()
  shape = (256, 256, 160)
  asl = np.array([[0, 0, -1, 80], [-1, 0, 0, 128], [0, 1, 0, -128], [0, 0, 0, 1]], np.float64)

  def rotation(axis, degrees, shift):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    m = np.eye(4)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    m[:3, 3] = shift
    return m

  scans = [affine_lib.resample_volume(space.template, rotation(axis, deg, shift), asl, shape,
                                      path=name)
           for name, axis, deg, shift in (("moving", 0, 6.0, (3, -4, 2)),
                                          ("fixed", 2, -4.0, (-2, 3, 1)))]

  def run():
    out = pipeline.register_native_volumes(model, variables, config, *scans, space)
    jax.block_until_ready(out["moved"])

  result = {"impl": "vmjax pipeline", "model": "shipped (oasis-vm2-diff, 1 mm)",
            "conv": _conv_label(), "dtype": dtype,
            "params": vmjax.count_params(variables["params"])}
  result["register_compile_s"], result["register_s"] = _first_and_median(run, steps)
  result["peak_rss_gib"] = _peak_rss_gib()
  return result


def run_single_conv(shape, steps):
  """One 3x3x3 conv, 34 -> 32 channels (VM-2's first full-resolution decoder conv): XLA's
  convolution vs the oneDNN path, forward and forward + backward, seconds and GFLOP/s."""
  import jax
  from jax import lax
  import jax.numpy as jnp
  import numpy as np
  from vmjax import conv

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, *shape, 34)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 34, 32)) * 0.05, jnp.float32)
  flop = 2 * np.prod(shape) * 27 * 34 * 32
  dn = ("NDHWC", "DHWIO", "NDHWC")
  out = {}
  for name, fn in (("xla", lax.conv_general_dilated), ("onednn", conv.conv_general_dilated)):
    if name == "onednn" and not conv.onednn_available():
      continue
    f = lambda x, w, fn=fn: fn(x, w, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=dn)
    forward = jax.jit(f)
    both = jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))
    for label, g, mult in (("fwd", forward, 1), ("fwd+bwd", both, 3)):
      jax.block_until_ready(g(x, w))
      t = _median_time(lambda g=g: jax.block_until_ready(g(x, w)), steps)
      out[f"{name} {label}"] = (t, mult * flop / t / 1e9)
  return out


def _child(spec, shape):
  kind, *rest = spec.split(":")
  if kind == "conv":
    return run_single_conv(shape, FLAGS.steps)
  if kind == "vmjax":
    return run_vmjax(rest[0], rest[1], shape, FLAGS.batch, FLAGS.steps, FLAGS.train,
                     FLAGS.remat, rest[2])
  if kind == "gemm":
    return run_gemm(FLAGS.steps)
  if kind == "native":
    return run_native_pair(FLAGS.steps, rest[0])
  return run_torch(rest[0], shape, FLAGS.batch, FLAGS.steps, FLAGS.train)


def _run_child(spec, shape_text):
  cmd = [sys.executable, "-m", "experiments.benchmark", f"--child={spec}",
         f"--shapes={shape_text}", f"--batch={FLAGS.batch}", f"--steps={FLAGS.steps}",
         f"--dtype={','.join(FLAGS.dtype)}",
         f"--train={FLAGS.train}", f"--remat={FLAGS.remat}"]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    print(f"{spec} {shape_text}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}",
          flush=True)
    return None
  return json.loads(lines[-1][len("RESULT "):])


def _parse_shape(text):
  return tuple(int(n) for n in text.replace(",", "x").split("x"))


def main(argv):
  del argv
  if FLAGS.child:
    shape = _parse_shape(FLAGS.shapes[0])
    print("RESULT " + json.dumps(_child(FLAGS.child, shape)), flush=True)
    return
  import jax
  from vmjax.native import build
  device = jax.devices()[0]
  print(f"vmjax benchmark: batch {FLAGS.batch}, median of {FLAGS.steps} after a warm-up; "
        f"jax {jax.__version__} on {device.platform} ({device.device_kind}); "
        f"{os.cpu_count()} CPUs, {build.cpu_model()}, "
        f"bf16 instructions: {build.bf16_isa() or 'none'}",
        flush=True)
  specs = [f"vmjax:{v}:{c}:{d}" for v in FLAGS.variants for c in FLAGS.conv for d in FLAGS.dtype]
  if "torch" in FLAGS.compare:
    specs += ["torch:vm2", "torch:vm1"]
  if "voxelmorph" in FLAGS.compare:
    specs += ["voxelmorph:default"]
  gemm = _run_child("gemm", FLAGS.shapes[0]) or {}
  print("f32 GEMM 4096^3: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in gemm.items()),
        flush=True)
  if "conv" in FLAGS.compare:
    for shape_text in FLAGS.shapes:
      for key, (t, rate) in (_run_child("conv", shape_text) or {}).items():
        print(f"single conv 34->32 at {shape_text}, {key}: {t:.3f} s, {rate:.0f} GFLOP/s",
              flush=True)
  header = ("shape", "impl", "model", "conv", "dtype", "params", "register s", "compile s",
            "pairs/s", "register GFLOP/s", "train step s", "compile s", "train GFLOP/s", "peak RSS GiB",
            "register / torch vm2", "train / torch vm2")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for shape_text in FLAGS.shapes:
    shape = _parse_shape(shape_text)
    shape_specs = specs
    if any(n % 32 for n in shape) and "voxelmorph:default" in specs:
      print(f"voxelmorph default model skipped at {shape_text}: its U-Net needs sizes "
            "divisible by 32", flush=True)
      shape_specs = [s for s in specs if s != "voxelmorph:default"]
    rows = [r for r in (_run_child(spec, shape_text) for spec in shape_specs) if r]
    torch_vm2 = next((r for r in rows if r["impl"] == "torch" and r["model"] == "vm2"), None)
    for r in rows:
      gflop = (conv_gflop(r["model"], shape, FLAGS.batch) if r["impl"] in ("vmjax", "torch")
               else None)
      train_s = r.get("train_step_s", float("nan"))
      reg_rate = f"{gflop / r['register_s']:.0f}" if gflop else "—"
      train_rate = f"{3 * gflop / train_s:.0f}" if gflop else "—"

      def ratio(key, r=r):
        if not torch_vm2 or r["impl"] != "vmjax" or r["model"] == "vm1":
          return "—"
        return f"{r.get(key, float('nan')) / torch_vm2.get(key, float('nan')):.2f}"
      lines.append(
          f"| {shape_text} | {r['impl']} | {r['model']} | {r['conv']} | "
          f"{r.get('dtype', 'float32')} | {r['params']:,} | "
          f"{r['register_s']:.3f} | {r['register_compile_s']:.1f} | "
          f"{FLAGS.batch / r['register_s']:.2f} | {reg_rate} | {train_s:.3f} | "
          f"{r.get('train_compile_s', float('nan')):.1f} | "
          f"{train_rate} | {r['peak_rss_gib']:.2f} | "
          f"{ratio('register_s')} | {ratio('train_step_s')} |")
      print(lines[-1], flush=True)
  if "native" in FLAGS.compare:
    for dtype in FLAGS.dtype:
      r = _run_child(f"native:{dtype}", "256x256x160")
      if r:
        lines.append(f"| 256x256x160 native pair | {r['impl']} | {r['model']} | {r['conv']} | "
                     f"{dtype} | {r['params']:,} | {r['register_s']:.3f} | "
                     f"{r['register_compile_s']:.1f} | {1 / r['register_s']:.3f} | — | — | — | "
                     f"— | {r['peak_rss_gib']:.2f} "
                     "| — | — |")
        print(lines[-1], flush=True)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
