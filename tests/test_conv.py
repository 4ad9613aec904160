"""vmjax.conv: the oneDNN path against lax.conv_general_dilated (forward and gradients)."""

import contextlib
import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from vmjax import blocks
from vmjax import conv
from vmjax import networks
from vmjax.native import build

DN = ("NDHWC", "DHWIO", "NDHWC")

needs_onednn = pytest.mark.skipif(
    not conv.onednn_available(),
    reason="oneDNN kernel unavailable (pip install onednn-cpu-gomp onednn-devel-cpu-gomp "
           "and a C++ compiler); the XLA path is used instead")


def _reference(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN,
                                  precision=lax.Precision.HIGHEST)


def _fast(x, w, strides, padding):
  return conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)


CASES = [  # (x shape, Co, strides, padding)
    ((1, 8, 12, 10, 5), 7, (1, 1, 1), ((1, 1),) * 3),
    ((2, 16, 12, 20, 3), 4, (2, 2, 2), ((1, 1),) * 3),    # stride-2 encoder conv, batch 2
    ((1, 9, 7, 11, 2), 3, (1, 2, 1), ((0, 1), (1, 0), (2, 2))),  # odd sizes, asymmetric pads
    ((1, 6, 6, 6, 4), 2, (1, 1, 1), "SAME"),
]


@needs_onednn
@pytest.mark.parametrize("x_shape,co,strides,padding", CASES)
def test_forward_matches_lax(x_shape, co, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, x_shape[-1], co)), jnp.float32)
  ref = jax.jit(functools.partial(_reference, strides=strides, padding=padding))(x, w)
  out = jax.jit(functools.partial(_fast, strides=strides, padding=padding))(x, w)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
  # The custom call is really in the compiled CPU program (not a silent fallback).
  hlo = jax.jit(functools.partial(_fast, strides=strides, padding=padding)).lower(x, w).as_text()
  assert "vmjax_conv_fwd" in hlo


@needs_onednn
@pytest.mark.parametrize("x_shape,co,strides,padding", CASES)
def test_gradients_match_lax(x_shape, co, strides, padding):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, x_shape[-1], co)), jnp.float32)

  def loss(fn, x, w):  # a non-linear function of the output so that dy varies per voxel
    return jnp.sum(jnp.sin(fn(x, w, strides=strides, padding=padding)))

  gx_ref, gw_ref = jax.jit(jax.grad(functools.partial(loss, _reference), (0, 1)))(x, w)
  gx, gw = jax.jit(jax.grad(functools.partial(loss, _fast), (0, 1)))(x, w)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(gw, gw_ref, rtol=1e-4, atol=1e-3)


@needs_onednn
def test_gradient_matches_finite_differences():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((1, 6, 6, 6, 2)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 2, 2)), jnp.float32)
  v = jnp.asarray(rng.standard_normal(w.shape), jnp.float32)  # a direction in weight space

  def f(w):
    return jnp.sum(jnp.tanh(_fast(x, w, (1, 1, 1), ((1, 1),) * 3)))

  analytic = float(jnp.vdot(jax.grad(f)(w), v))
  eps = 1e-2
  numeric = (float(f(w + eps * v)) - float(f(w - eps * v))) / (2 * eps)
  assert abs(analytic - numeric) <= 1e-2 * abs(numeric) + 1e-2


@needs_onednn
@pytest.mark.parametrize("isa", ["cpu", None])  # this CPU's bf16 kernel; the f32 fallback
@pytest.mark.parametrize("x_shape,co,strides,padding", CASES[:3])
def test_bfloat16_matches_an_f32_reference_of_the_rounded_inputs(x_shape, co, strides, padding,
                                                                 isa, monkeypatch):
  """bf16 in, bf16 out; the reference is the f32 convolution of the same (bf16-rounded) values,
  so the only error allowed is bf16's rounding of the result (and of dy in the gradients)."""
  if isa is None:
    monkeypatch.setattr(build, "bf16_isa", lambda: None)
  elif build.bf16_isa() is None:
    pytest.skip("this CPU has no bf16 instructions (AMX / AVX512-BF16)")
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, x_shape[-1], co)), jnp.bfloat16)
  fast = jax.jit(functools.partial(_fast, strides=strides, padding=padding))
  out = fast(x, w)
  assert out.dtype == jnp.bfloat16
  ref = _reference(x.astype(jnp.float32), w.astype(jnp.float32), strides, padding)
  scale = float(jnp.max(jnp.abs(ref)))
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2, atol=1e-2 * scale)
  hlo = fast.lower(x, w).as_text()
  assert ("vmjax_conv_fwd_bf16" in hlo) == (isa is not None)

  def loss(fn, x, w):
    return jnp.sum(jnp.sin(fn(x, w, strides=strides, padding=padding)).astype(jnp.float32))

  gx, gw = jax.jit(jax.grad(functools.partial(loss, _fast), (0, 1)))(x, w)
  assert gx.dtype == gw.dtype == jnp.bfloat16
  gx_ref, gw_ref = jax.grad(functools.partial(loss, _reference), (0, 1))(x.astype(jnp.float32),
                                                                        w.astype(jnp.float32))
  for g, r in ((gx, gx_ref), (gw, gw_ref)):
    np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=3e-2,
                               atol=3e-2 * float(jnp.max(jnp.abs(r))))


@needs_onednn
@pytest.mark.skipif(build.bf16_isa() is None, reason="this CPU has no bf16 instructions")
@pytest.mark.parametrize("x_shape,kernel,strides", [
    ((1, 2, 2, 2, 16), 3, 1),   # a 32^3 volume's coarsest U-Net level
    ((1, 2, 3, 4, 16), 3, 1),
    ((1, 1, 4, 5, 16), 2, 1),   # the decoder's 2x2x2 sub-pixel kernel on a 1-voxel-deep level
    ((1, 4, 1, 2, 16), 3, 2),   # stride-2 output of size 1
    ((1, 5, 6, 4, 16), 3, 2),   # sizes that oneDNN's bf16 kernel handles: still checked
])
def test_bfloat16_weight_gradient_of_tiny_volumes(x_shape, kernel, strides):
  """oneDNN 3.2's bf16 backward-weights kernel returns garbage for tiny volumes (see
  conv._bf16_weight_gradient_is_safe); vmjax's gradient must still match the f32 one."""
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((kernel,) * 3 + (x_shape[-1], 32)), jnp.bfloat16)
  pad, stride = ((1, 1),) * 3, (strides,) * 3
  out_shape = conv._out_shape(x_shape, w.shape, stride, pad)
  dy = jnp.asarray(rng.standard_normal(out_shape), jnp.bfloat16)
  _, vjp = jax.vjp(lambda w: _fast(x, w, stride, pad), w)
  (dw,) = jax.jit(vjp)(dy)
  _, ref_vjp = jax.vjp(lambda w: _reference(x.astype(jnp.float32), w, stride, pad),
                       w.astype(jnp.float32))
  (ref,) = ref_vjp(dy.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(dw, np.float32), ref, rtol=0,
                             atol=2e-2 * float(jnp.max(jnp.abs(ref))))


def test_ineligible_convolutions_fall_back_to_lax():
  """Dilation, NCDHW and f16 are not routed to oneDNN and stay exact."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((1, 8, 8, 8, 2)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 2, 3)), jnp.float32)
  ncdhw = ("NCDHW", "OIDHW", "NCDHW")
  xc, wc = jnp.moveaxis(x, -1, 1), jnp.transpose(w, (4, 3, 0, 1, 2))
  for a, b, kwargs in ((x, w, dict(rhs_dilation=(2, 2, 2), dimension_numbers=DN)),
                       (xc, wc, dict(dimension_numbers=ncdhw))):
    fn = lambda a, b, kw=kwargs: conv.conv_general_dilated(a, b, (1, 1, 1), "SAME", **kw)
    assert "vmjax_conv" not in jax.jit(fn).lower(a, b).as_text()
    np.testing.assert_array_equal(
        fn(a, b), lax.conv_general_dilated(a, b, (1, 1, 1), "SAME", **kwargs))
  # NCDHW computes the same convolution as channels-last (a layout, not another operation).
  np.testing.assert_allclose(
      jnp.moveaxis(conv.conv_general_dilated(xc, wc, (1, 1, 1), "SAME",
                                             dimension_numbers=ncdhw), 1, -1),
      lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=DN), atol=1e-4)
  xh, wh = x.astype(jnp.float16), w.astype(jnp.float16)
  hlo = jax.jit(lambda a, b: conv.conv_general_dilated(a, b, (1, 1, 1), "SAME",
                                                       dimension_numbers=DN)).lower(xh, wh)
  assert "vmjax_conv" not in hlo.as_text()


@pytest.mark.slow
@needs_onednn
def test_network_same_output_and_gradient_on_both_paths():
  """The whole VM-2 with oneDNN convolutions equals the plain-XLA network."""
  model = networks.vxm_dense("vm2")
  rng = np.random.default_rng(4)
  moving = jnp.asarray(rng.random((1, 16, 16, 16, 1)), jnp.float32)
  fixed = jnp.asarray(rng.random((1, 16, 16, 16, 1)), jnp.float32)
  params = networks.init_variables(model, jax.random.PRNGKey(0), (16, 16, 16))
  # Larger flow weights than the 1e-5 init so that the output is not ~0 everywhere.
  params = jax.tree_util.tree_map(lambda p: p * 100.0 if p.ndim == 5 and p.shape[-1] == 3
                                  else p, params)

  def run(params):
    return model.apply(params, moving, fixed)

  def loss(params):
    return jnp.mean(run(params) ** 2)

  fast_out, fast_grad = jax.jit(run)(params), jax.jit(jax.grad(loss))(params)
  with conv.force_xla():
    ref_out, ref_grad = jax.jit(run)(params), jax.jit(jax.grad(loss))(params)
  np.testing.assert_allclose(fast_out, ref_out, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(fast_grad), jax.tree_util.tree_leaves(ref_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6 * float(jnp.max(jnp.abs(b))) + 1e-9)


@pytest.mark.slow
def test_without_a_compiler_falls_back_to_xla_with_one_warning(tmp_path):
  """A machine that cannot build the kernel (here: a compiler that fails) still runs: one
  warning, XLA's convolution, the same result."""
  import os
  import subprocess
  import sys
  script = (
      "import numpy as np, jax, jax.numpy as jnp\n"
      "from jax import lax\n"
      "from vmjax import conv\n"
      "x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 6, 6, 2)), jnp.float32)\n"
      "w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 3, 2, 3)), jnp.float32)\n"
      "dn = ('NDHWC', 'DHWIO', 'NDHWC')\n"
      "out = conv.conv_general_dilated(x, w, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=dn)\n"
      "ref = lax.conv_general_dilated(x, w, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=dn)\n"
      "assert not conv.onednn_available()\n"
      "np.testing.assert_array_equal(out, ref)\n"
      "print('FALLBACK OK')\n")
  env = dict(os.environ, CXX="false", VMJAX_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "FALLBACK OK" in proc.stdout
  assert proc.stderr.count("oneDNN convolution unavailable") == 1
  assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind


def test_the_kernel_is_not_built_when_the_default_backend_is_not_the_cpu(monkeypatch):
  """On a GPU/TPU host the CPU kernel is neither built nor registered: XLA's convolution."""
  def must_not_build():
    raise AssertionError("the oneDNN kernel was asked for on a non-CPU default backend")

  monkeypatch.setattr(conv, "onednn_available", must_not_build)
  monkeypatch.setattr(conv.jax, "default_backend", lambda: "gpu")
  x = jnp.ones((1, 6, 6, 6, 2), jnp.float32)
  w = jnp.ones((3, 3, 3, 2, 3), jnp.float32)
  hlo = jax.jit(lambda a, b: conv.conv_general_dilated(a, b, (1, 1, 1), "SAME",
                                                       dimension_numbers=DN)).lower(x, w)
  assert "vmjax_conv" not in hlo.as_text()


def test_cache_key_changes_with_everything_the_library_depends_on(tmp_path):
  """The key of a build is a function of the source, the compiler, the flags and oneDNN (read
  from its header here), and of the CPU exactly when the flags tune for it."""
  include = tmp_path / "include" / "oneapi" / "dnnl"
  include.mkdir(parents=True)
  (include / "dnnl_version.h").write_text(
      "#define DNNL_VERSION_MAJOR 3\n#define DNNL_VERSION_MINOR 2\n#define DNNL_VERSION_PATCH 7\n")
  assert build.dnnl_version(str(tmp_path / "include")) == "3.2.7"
  assert build.dnnl_version(str(tmp_path / "missing")) == "unknown"
  assert build.compiler_version(str(tmp_path / "no-such-compiler")) == "unknown"
  base = dict(compiler="g++ 12", flags=("-O3",), onednn=("/lib", "3.2.7"), cpu="avx2 fma")
  key = build.cache_key(b"source", **base)
  assert key == build.cache_key(b"source", **base) and len(key) == 16
  changed = [build.cache_key(b"source 2", **base)] + [
      build.cache_key(b"source", **dict(base, **{name: value}))
      for name, value in (("compiler", "g++ 13"), ("flags", ("-O2",)),
                          ("onednn", ("/lib", "3.3.0")), ("onednn", None))]
  assert key not in changed and len(set(changed)) == len(changed)
  # A build for this CPU (-march=native) is keyed by its instruction set; a portable one is not.
  assert build.cache_key(b"source", **dict(base, cpu="avx512f")) == key
  native = dict(base, flags=("-O3", "-march=native"))
  assert (build.cache_key(b"source", **native)
          != build.cache_key(b"source", **dict(native, cpu="avx512f")))


def _upsample_concat_reference(h, skip, w, b, slope):
  """concat(nearest x2 upsampling (numpy repeat), skip) -> lax conv (HIGHEST) + b -> leaky."""
  up = h
  for axis in (1, 2, 3):
    up = jnp.repeat(up, 2, axis=axis)
  y = _reference(jnp.concatenate([up, skip], axis=-1), w, (1, 1, 1), ((1, 1),) * 3) + b
  return y if slope is None else jnp.where(y >= 0, y, slope * y)


@needs_onednn
@pytest.mark.parametrize("coarse,c1,c2,co,slope,batch", [
    ((3, 5, 4), 4, 2, 3, 0.2, 2),   # odd coarse sizes, batch 2
    ((2, 2, 3), 6, 5, 4, None, 1),  # no activation
])
def test_upsample_concat_conv_block_matches_the_direct_computation(coarse, c1, c2, co, slope,
                                                                     batch):
  """The coarse-grid (sub-pixel) computation of a decoder step equals upsampling, concatenating
  and convolving at full resolution: values and gradients for every input."""
  rng = np.random.default_rng(5)
  fine = tuple(2 * n for n in coarse)
  h = jnp.asarray(rng.standard_normal((batch, *coarse, c1)), jnp.float32)
  skip = jnp.asarray(rng.standard_normal((batch, *fine, c2)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, c1 + c2, co)), jnp.float32)
  b = jnp.asarray(rng.standard_normal(co), jnp.float32)
  fast = jax.jit(lambda *a: blocks.upsample_concat_conv_block(*a, negative_slope=slope))
  ref = jax.jit(lambda *a: _upsample_concat_reference(*a, slope))
  np.testing.assert_allclose(fast(h, skip, w, b), ref(h, skip, w, b), rtol=1e-5, atol=1e-4)
  assert "vmjax_conv_subpixel" in fast.lower(h, skip, w, b).as_text()  # not a silent fallback
  cotangent = jnp.asarray(rng.standard_normal((batch, *fine, co)), jnp.float32)
  grads = jax.grad(lambda *a: jnp.vdot(fast(*a), cotangent), argnums=(0, 1, 2, 3))
  ref_grads = jax.grad(lambda *a: jnp.vdot(ref(*a), cotangent), argnums=(0, 1, 2, 3))
  for g, r in zip(jax.jit(grads)(h, skip, w, b), jax.jit(ref_grads)(h, skip, w, b)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-3)


@needs_onednn
@pytest.mark.skipif(build.bf16_isa() is None, reason="this CPU has no bf16 instructions")
def test_upsample_concat_conv_block_in_bf16_matches_an_f32_reference():
  rng = np.random.default_rng(6)
  h = jnp.asarray(rng.standard_normal((1, 4, 3, 5, 8)), jnp.bfloat16)
  skip = jnp.asarray(rng.standard_normal((1, 8, 6, 10, 2)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 10, 6)) * 0.2, jnp.float32)
  b = jnp.asarray(rng.standard_normal(6), jnp.float32)
  out = jax.jit(lambda *a: blocks.upsample_concat_conv_block(*a, negative_slope=0.2))(h, skip, w, b)
  assert out.dtype == jnp.bfloat16
  ref = _upsample_concat_reference(h.astype(jnp.float32), skip.astype(jnp.float32), w, b, 0.2)
  # bf16 kernels, two bf16 partial sums: a few bf16 ulps of the output's scale.
  np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=0,
                             atol=0.03 * float(jnp.max(jnp.abs(ref))))


def test_upsample_concat_conv_block_is_the_direct_computation_off_the_cpu(monkeypatch):
  """On a GPU/TPU host: upsampling, concatenation and XLA's convolution (no native call)."""
  monkeypatch.setattr(conv, "onednn_available", lambda: False)
  monkeypatch.setattr(conv.jax, "default_backend", lambda: "gpu")
  h, skip = jnp.ones((1, 2, 2, 2, 3)), jnp.ones((1, 4, 4, 4, 1))
  w, b = jnp.ones((3, 3, 3, 4, 2)), jnp.zeros(2)
  hlo = jax.jit(lambda *a: blocks.upsample_concat_conv_block(*a, 0.2)).lower(h, skip, w, b)
  assert "vmjax_conv" not in hlo.as_text()
  with pytest.raises(ValueError, match="negative_slope"):
    blocks.upsample_concat_conv_block(h, skip, w, b, negative_slope=0.0)


@pytest.mark.parametrize("use_onednn", [True, False])
def test_conv_block_f32_out_is_an_f32_convolution_of_bf16_activations(use_onednn):
  """bf16 activations, f32 kernel split into bf16 hi + lo: the f32 result of the f32
  convolution to ~1e-5 (a bf16 kernel alone is ~1e-3 off), gradients too."""
  if use_onednn and not (conv.onednn_available() and build.bf16_isa()):
    pytest.skip("needs the oneDNN kernel and bf16 instructions")
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((1, 6, 5, 7, 16)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 16, 3)), jnp.float32)
  b = jnp.asarray(rng.standard_normal(3), jnp.float32)
  pad = ((1, 1),) * 3

  def fast(x, w, b):
    return blocks.conv_block_f32_out(x, w, b, (1, 1, 1), pad)

  def ref(x, w, b):
    return _reference(x.astype(jnp.float32), w, (1, 1, 1), pad) + b

  with (contextlib.nullcontext() if use_onednn else conv.force_xla()):
    out = jax.jit(fast)(x, w, b)
    hlo = jax.jit(fast).lower(x, w, b).as_text()
    grad = jax.jit(jax.grad(lambda w: jnp.sum(fast(x, w, b) ** 2)))(w)
  assert out.dtype == jnp.float32
  assert ("vmjax_conv_fwd_bf16_f32" in hlo) == use_onednn
  expected = ref(x, w, b)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5 * scale)
  ref_grad = jax.grad(lambda w: jnp.sum(ref(x, w, b) ** 2))(w)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-2, atol=1e-2 * float(jnp.max(jnp.abs(ref_grad))))
