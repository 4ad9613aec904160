"""Native CPU kernels for what XLA:CPU does slowly in registration: trilinear resampling (and
its two gradients), the windowed box sums of the local NCC and the whole NCC loss with its
gradient, the x2 upsampling of a field, one squaring of scaling and squaring, the sum of a
large map, the composition of a field with two affine maps, the affine step's loss with its
gradient, and (called on the host) a volume's transposition to NIfTI's order.

XLA:CPU computes a trilinear warp as eight scalar gathers, its image gradient as a serial
scatter-add, a 9-wide box sum as a ``reduce_window`` loop, a linear x2 upsampling (the velocity
onto the image grid, every refinement step) as dense contractions, and fuses a map into the
mean that consumes it into one slow loop. ``vmjax/native/resample.cc`` does each as one OpenMP
loop over contiguous memory (float32, channels-last). Measured jitted, median of 5:

- 2-core AMD EPYC Zen 3 (AVX2), 2026-12-01: a trilinear warp of a 160x192x160 image 0.081 s
  (XLA 0.156); the box sum of NCC's five 160x192x160 maps 0.136 s (XLA 0.323); the gradient of
  a 7-step scaling and squaring at 80x96x80 0.63 s (XLA 1.15); one step of the shipped model's
  field refinement at 160x192x160 (loss and gradient) 1.45 s (XLA 3.2).
- 2-core AMD EPYC Zen 2 (AVX2), 2026-12-02: the x2 upsampling 80x96x80 -> 160x192x160 with its
  gradient 0.035 s (``jax.image.resize`` 0.102); the 7-step integration's gradient 0.214 s
  (with the trilinear kernel above 0.360); NCC's loss alone 0.21 s (XLA's fused mean: 0.41);
  one refinement step 0.69 -> 0.48 s with these and the fixed scan's box sums apart.
- 2-core AMD EPYC Zen 4 (AVX512-BF16), 2026-12-06, in one process before and after: samples
  whose corners all lie inside the image take a fast path without divisions or clamping, and
  a warp passes its displacement itself (XLA:CPU took 23 ms to add the index grid to a
  160x192x160 field): a warp of a 160x192x160 image with its displacement gradient 118 -> 42
  ms; NCC's loss and gradient as three native calls instead of XLA's elementwise passes between
  the box sums (NCC with its gradient 110 -> 90 ms); a squaring of an 80x96x80 field with AVX2
  (a row of corners per load) 6.2 -> 3.5 ms, its gradient 24 -> 15 ms. A refinement step, all
  kernels together, ~0.30 s (integration and its gradient 0.11, NCC 0.09, warp 0.07, x2
  upsampling 0.02); with :mod:`vmjax.host_memory` (the commands' setting) its 59 MB buffers are
  reused instead of faulted in afresh.
- The same kind of machine, the day's third session: NCC's terms made and used inside the box
  sums' passes (two calls): NCC with its gradient 151 -> 103 ms in-process, a refinement step
  0.25 -> 0.23 s.
- The same kind of machine, the day's fourth session: the squaring's gradient scattered in
  slabs straight into its output (9.6 -> 7.3 ms a squaring at 80x96x80, medians of 3 alternated
  runs); the composition onto a 256x256x160 fixed grid 300 -> ~130 ms; the affine step's loss
  and gradient at a 40x48x40 level 1.4 -> 0.5 ms a step; a 256x256x160x3 field into NIfTI's
  order 84 -> 20 ms. A refinement step ~0.19 s.

Like :mod:`vmjax.conv`'s, the kernels are built on first use by :mod:`vmjax.native.build` (no
oneDNN needed) and used only for the CPU backend (:func:`vmjax.native.build.dispatch`: in a
CPU-only process alone, else inside ``lax.platform_dependent``): GPUs/TPUs, and any CPU where
the build fails (one warning), run the
XLA computation in :mod:`vmjax.transforms` / :mod:`vmjax.losses`, which is also the reference
the tests compare against. ``VMJAX_KERNELS=xla`` switches them off.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vmjax.native import build

_SOURCE = os.path.join(build.HERE, "resample.cc")
_TARGETS = {"vmjax_trilinear": "VmjaxTrilinear",
            "vmjax_trilinear_grad_coords": "VmjaxTrilinearGradCoords",
            "vmjax_trilinear_grad_image": "VmjaxTrilinearGradImage",
            "vmjax_box_sum": "VmjaxBoxSum",
            "vmjax_ncc_sums": "VmjaxNccSums",
            "vmjax_ncc_grad": "VmjaxNccGrad",
            "vmjax_upsample2": "VmjaxUpsample2",
            "vmjax_upsample2_t": "VmjaxUpsample2T",
            "vmjax_compose_self": "VmjaxComposeSelf",
            "vmjax_compose_self_grad": "VmjaxComposeSelfGrad",
            "vmjax_compose_affine": "VmjaxComposeAffine",
            "vmjax_affine_ncc": "VmjaxAffineNcc",
            "vmjax_sum": "VmjaxSum"}
MODES = {"constant": 0, "nearest": 1}
_FLAGS = ("-O3", "-march=native")  # vectorised for this CPU (its flags are in the cache key)


@functools.cache
def _library() -> ctypes.CDLL | None:
  """The kernels' library, built and its FFI targets registered; None (one warning) when that
  is impossible."""
  if os.environ.get("VMJAX_KERNELS", "").lower() == "xla":
    return None
  try:
    return ctypes.CDLL(build.load(_SOURCE, _TARGETS, link_onednn=False, extra_flags=_FLAGS))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("vmjax: native resampling kernels unavailable, using XLA's: %s", e)
    return None


def available() -> bool:
  """Builds and registers the kernels; False (one warning) when that is impossible."""
  return _library() is not None


def usable(*arrays) -> bool:
  """Whether a computation on ``arrays`` (float32) should take the native path: the default
  backend is the CPU (never build on a GPU/TPU host) and the kernels are available."""
  return (jax.default_backend() == "cpu" and all(a.dtype == jnp.float32 for a in arrays)
          and available())


def _results(target: str, shapes, *args, **attrs) -> list:
  """The kernel's float32 results, one per shape."""
  return jax.ffi.ffi_call(target, [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes],
                          vmap_method="sequential")(*args, **attrs)


def _call(target: str, shape, *args, work=(), **attrs):
  """The kernel's result of ``shape``. ``work``: the shapes of work buffers it also returns,
  dropped here: XLA allocates them with the program's other buffers (reused from one iteration
  of a loop to the next) instead of the kernel at each call."""
  return _results(target, (shape, *work), *args, **attrs)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def trilinear(image: jax.Array, coords: jax.Array, mode: str, relative: bool = False
              ) -> jax.Array:
  """Trilinear samples of ``image`` ``(B, Di, Hi, Wi, C)`` at ``coords`` ``(B, D, H, W, 3)``
  (voxel indices of ``image``) -> ``(B, D, H, W, C)``, float32, CPU only; ``mode``
  ``"constant"`` (0 outside) or ``"nearest"`` (indices clamped). ``relative``: ``coords`` is a
  displacement, each sample at its own grid index plus it (a warp without the coordinates in
  memory: XLA:CPU takes as long to add the index grid as the kernel takes to sample).
  Differentiable in both."""
  return _call("vmjax_trilinear", coords.shape[:4] + image.shape[-1:], image, coords,
               mode=MODES[mode], relative=int(relative))


def _trilinear_fwd(image, coords, mode, relative):
  return trilinear(image, coords, mode, relative), (image, coords)


def _trilinear_bwd(mode, relative, residuals, g):
  image, coords = residuals
  attrs = {"mode": MODES[mode], "relative": int(relative)}
  # Two calls: XLA drops the scatter-add when the image is a constant (the moving scan).
  d_coords = _call("vmjax_trilinear_grad_coords", coords.shape, image, coords, g, **attrs)
  d_image = _call("vmjax_trilinear_grad_image", image.shape, image, coords, g, **attrs)
  return d_image, d_coords


trilinear.defvjp(_trilinear_fwd, _trilinear_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def box_sum(x: jax.Array, window: int) -> jax.Array:
  """:func:`vmjax.losses.box_sum` natively (``(B, D, H, W, C)`` float32, CPU only). The zero
  padded box filter is symmetric, so its gradient is the box sum of the cotangent."""
  return _call("vmjax_box_sum", x.shape, x, window=int(window))


def _box_sum_fwd(x, window):
  return box_sum(x, window), None


def _box_sum_bwd(window, _, g):
  return (box_sum(g, window),)


box_sum.defvjp(_box_sum_fwd, _box_sum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def ncc_loss(fixed: jax.Array, moved: jax.Array, window: int) -> jax.Array:
  """:func:`vmjax.losses.ncc_loss` natively (``(B, D, H, W, C)`` float32, CPU only): the box
  sums of the moved image's terms and the sum of ``cc`` in one call (the terms made and ``cc``
  summed inside the box sum's passes: XLA:CPU's elementwise passes over these 59 MB maps cost
  as much as the sums), the gradient in another. The fixed scan's sums are a call of their own:
  loop-invariant in a refinement, XLA hoists them. Differentiable in both images (cc is
  symmetric in them)."""
  return _ncc_fwd(fixed, moved, window)[0]


def _ncc_fwd(fixed, moved, window):
  c = fixed.shape[-1]
  fixed_sums = box_sum(jnp.concatenate([fixed, fixed * fixed], axis=-1), window)
  three = fixed.shape[:-1] + (3 * c,)
  sums, total = _results("vmjax_ncc_sums", (three, ()), fixed, moved, fixed_sums,
                         window=int(window))
  return -total / fixed.size, (fixed, moved, fixed_sums, sums)


def _ncc_bwd(window, residuals, g):
  fixed, moved, fixed_sums, sums = residuals
  g = jnp.reshape(g, (1,)).astype(jnp.float32)
  # Two calls: XLA drops the fixed scan's gradient where nothing asks for it.
  grads = [_call("vmjax_ncc_grad", fixed.shape, fixed, moved, fixed_sums, sums, g,
                 work=(sums.shape,), window=int(window), wrt_fixed=wrt)
           for wrt in (1, 0)]
  return tuple(grads)


ncc_loss.defvjp(_ncc_fwd, _ncc_bwd)


@jax.custom_vjp
def upsample2(x: jax.Array) -> jax.Array:
  """``(B, D, H, W, C)`` -> ``(B, 2D, 2H, 2W, C)``: ``jax.image.resize(method="linear")``'s
  values for twice the size (float32, CPU only). Linear, so its gradient is its transpose."""
  b, d, h, w, c = x.shape
  return _call("vmjax_upsample2", (b, 2 * d, 2 * h, 2 * w, c), x,
               work=((b, d, 2 * h, 2 * w, c),))


def _upsample2_fwd(x):
  return upsample2(x), None


def _upsample2_bwd(_, g):
  b, d, h, w, c = g.shape
  return (_call("vmjax_upsample2_t", (b, d // 2, h // 2, w // 2, c), g,
                work=((b, d // 2, h, w, c),)),)


upsample2.defvjp(_upsample2_fwd, _upsample2_bwd)


@jax.custom_vjp
def compose_self(u: jax.Array) -> jax.Array:
  """``u(x) + u(x + u(x))`` for a displacement ``u`` ``(B, D, H, W, 3)`` (trilinear, indices
  clamped: :func:`vmjax.transforms.compose` ``(u, u)``), float32, CPU only: one squaring of
  scaling and squaring without the coordinates in memory, and its gradient in one pass."""
  return _call("vmjax_compose_self", u.shape, u)


def _compose_self_fwd(u):
  return compose_self(u), u


def _compose_self_bwd(u, g):
  return (_call("vmjax_compose_self_grad", u.shape, u, g),)


compose_self.defvjp(_compose_self_fwd, _compose_self_bwd)


def compose_affine(disp: jax.Array, to_grid: jax.Array, onwards: jax.Array, shape) -> jax.Array:
  """``u(x) = onwards · (t + disp(t)) - x`` with ``t = to_grid · x`` for every voxel ``x`` of a
  grid of ``shape`` -> ``(*shape, 3)``; ``disp`` ``(Di, Hi, Wi, 3)`` sampled trilinearly at
  ``t`` (indices clamped), ``to_grid`` and ``onwards`` 4x4 (or 3x4) float32; CPU only, not
  differentiable. :func:`vmjax.pipeline.compose_on_fixed_grid`'s field in one pass: XLA:CPU
  wrote the coordinates, the samples and the sum apart (256x256x160 from 160x192x160: 300 ms)."""
  matrices = jnp.stack([to_grid[:3], onwards[:3]]).astype(jnp.float32)
  return _call("vmjax_compose_affine", tuple(shape) + (3,), disp, matrices)


def reverse_axes_on_host(array: np.ndarray) -> np.ndarray | None:
  """The transpose of a C-ordered ``(D, H, W)`` or ``(D, H, W, C)`` numpy array of 4-byte
  elements (float32, int32: bit for bit) as a new C-ordered array, by the native kernel called
  on the host (ctypes, outside any XLA program: no program to trace or load, the GIL released).
  None where the kernels are unavailable or the array is not of that kind. A 256x256x160x3
  field 20 ms, where XLA:CPU's transposition took 84 ms and numpy's ~100 ms."""
  lib = _library()
  if (lib is None or array.ndim not in (3, 4) or array.dtype.itemsize != 4
      or not array.flags.c_contiguous):
    return None
  # 64-byte aligned (numpy's own allocations are 16-byte aligned): jax.device_put then takes
  # the result without a copy (a 256x256x160 scan 16 bytes off: a 40 ms copy).
  size = array.size * array.itemsize
  raw = np.empty(size + 64, np.uint8)
  start = -raw.ctypes.data % 64
  out = raw[start:start + size].view(array.dtype).reshape(array.shape[::-1])
  dims = tuple(array.shape) + (1,) * (4 - array.ndim)
  lib.VmjaxReverseAxesHost(ctypes.c_void_p(array.ctypes.data), ctypes.c_void_p(out.ctypes.data),
                           *(ctypes.c_int64(n) for n in dims))
  return out


@jax.custom_vjp
def affine_ncc(fixed: jax.Array, moving: jax.Array, matrix: jax.Array) -> jax.Array:
  """``-NCC`` (global) of ``fixed`` ``(D, H, W)`` and ``moving`` ``(D', H', W')`` sampled
  (trilinear, 0 outside) at ``matrix · x`` (3x4, fixed voxel -> moving voxel) for every fixed
  voxel ``x``: the affine step's loss (:mod:`vmjax.affine`) and its gradient with respect to
  ``matrix`` in two native passes, float64 sums; float32, CPU only, differentiable in
  ``matrix`` alone. XLA:CPU ran the coordinates, the samples, their gradient and the
  reductions as some 40 small operations a step: a 40x48x40 level's steps took 1.4 ms."""
  return _results("vmjax_affine_ncc", ((), (3, 4)), fixed, moving, matrix)[0]


def _affine_ncc_fwd(fixed, moving, matrix):
  loss, d_matrix = _results("vmjax_affine_ncc", ((), (3, 4)), fixed, moving, matrix)
  return loss, d_matrix


def _affine_ncc_bwd(d_matrix, g):
  return None, None, g * d_matrix


affine_ncc.defvjp(_affine_ncc_fwd, _affine_ncc_bwd)


@jax.custom_vjp
def mean(x: jax.Array) -> jax.Array:
  """The mean of all elements of ``x`` (float32, CPU only), computed apart from whatever
  produces ``x``: XLA:CPU fuses an elementwise map into the reduction that consumes it and runs
  the fusion ~20-50x slower than the two apart (NCC's ``-mean(cc)`` of a 160x192x160 map: 0.19
  s against 0.009 s; 2-core AMD EPYC Zen 2, 2026-12-02)."""
  return _call("vmjax_sum", (), x) / x.size


def _mean_fwd(x):
  return mean(x), x.shape


def _mean_bwd(shape, g):
  return (jnp.full(shape, g / math.prod(shape), jnp.float32),)


mean.defvjp(_mean_fwd, _mean_bwd)


def on_cpu(native, reference, *args):
  """``native(*args)`` when compiled for the CPU, ``reference(*args)`` elsewhere; only
  ``reference`` where the native path is not :func:`usable` for ``args``."""
  if not usable(*args):
    return reference(*args)
  return build.dispatch(native, reference, *args)
