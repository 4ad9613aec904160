"""3-D convolution: XLA's native one, or oneDNN's on the CPU.

XLA:CPU runs 3x3x3 convolutions at ~30 GFLOP/s on AVX-512/AMX cores where oneDNN (what PyTorch
uses) reaches ~300. ``conv_general_dilated`` below has ``lax.conv_general_dilated``'s signature
(flax's ``nn.Conv(conv_general_dilated=...)`` takes it) and, inside one jitted function, lowers
to a oneDNN custom call on CPU and to XLA's convolution on every other platform
(``lax.platform_dependent``). Same math (direct convolution); gradients go through oneDNN's
backward-data / backward-weights kernels via ``jax.custom_vjp``. float32 and bfloat16 (inputs,
kernel and output of one type; oneDNN accumulates in f32): bf16 runs oneDNN's AMX /
AVX512-BF16 kernels where the CPU has those instructions (:func:`bf16_isa`); elsewhere a bf16
convolution is computed by the f32 kernel and rounded to bf16 (said once in the log). Also
on this path: bf16 inputs to an f32 output (``preferred_element_type``; the last conv of a bf16
network, :func:`conv_block_f32_out`) and the U-Net's decoder steps computed on the coarse grid
(:func:`upsample_concat_conv_block`).

The oneDNN kernel (``vmjax/native/onednn_conv.cc``) is compiled with the system C++ compiler on
first use against the ``onednn-cpu-gomp`` / ``onednn-devel-cpu-gomp`` wheels (requirements.txt)
and cached under ``$VMJAX_CACHE`` (default ``~/.cache/vmjax``; one library per source, jax,
oneDNN version and compiler). It is built only when a convolution is traced for the CPU backend
(never on a GPU/TPU host's default path); ``python -m experiments.build_native`` builds it ahead
of time (for container images). Anything missing (no compiler, no oneDNN, not x86-64 Linux)
falls back to XLA with one warning. ``VMJAX_CONV=xla`` forces XLA.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import re
import subprocess
import sys
import sysconfig
from typing import Sequence

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from vmjax.atomic import atomic_path

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "onednn_conv.cc")
_TARGETS = {"fwd": "VmjaxConvForward", "bwd_data": "VmjaxConvBackwardData",
            "bwd_weights": "VmjaxConvBackwardWeights", "subpixel": "VmjaxSubpixelEpilogue"}
_SUFFIX = {jnp.dtype(jnp.float32): "", jnp.dtype(jnp.bfloat16): "_bf16"}  # FFI target per dtype
_MIXED_TARGET = ("fwd_bf16_f32", "VmjaxConvForwardBf16F32")  # bf16 x, w -> f32 y
_CXXFLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w")
_NDHWC = ("NDHWC", "DHWIO", "NDHWC")


def _dnnl_prefixes() -> list[str]:
  """Where the oneDNN wheels may have put ``include/`` and ``lib/``."""
  prefixes = [os.environ.get("VMJAX_DNNL_ROOT", ""), sys.prefix, sys.base_prefix,
              sysconfig.get_config_var("userbase") or "", "/usr", "/usr/local"]
  try:
    import site  # pylint: disable=g-import-not-at-top
    prefixes.append(site.getuserbase())
  except AttributeError:
    pass
  return [p for p in dict.fromkeys(prefixes) if p]


def _find_dnnl() -> tuple[str, str]:
  for prefix in _dnnl_prefixes():
    include = os.path.join(prefix, "include")
    for libdir in (os.path.join(prefix, "lib"), os.path.join(prefix, "lib64"),
                   os.path.join(prefix, "lib", "x86_64-linux-gnu")):
      if (os.path.exists(os.path.join(include, "oneapi", "dnnl", "dnnl.hpp"))
          and os.path.exists(os.path.join(libdir, "libdnnl.so"))):
        return include, libdir
  raise FileNotFoundError(
      "oneDNN headers/library not found (pip install onednn-cpu-gomp onednn-devel-cpu-gomp; "
      f"searched {_dnnl_prefixes()}; or set VMJAX_DNNL_ROOT)")


def _dnnl_version(include: str) -> str:
  """``MAJOR.MINOR.PATCH`` from oneDNN's ``dnnl_version.h``."""
  try:
    with open(os.path.join(include, "oneapi", "dnnl", "dnnl_version.h")) as f:
      text = f.read()
  except OSError:
    return "unknown"
  parts = [re.search(rf"#define DNNL_VERSION_{p}\s+(\d+)", text)
           for p in ("MAJOR", "MINOR", "PATCH")]
  return ".".join(m.group(1) if m else "?" for m in parts)


def _compiler_version(cxx: str) -> str:
  try:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True,
                          check=True).stdout.splitlines()[0]
  except (OSError, subprocess.CalledProcessError, IndexError):
    return "unknown"


def _cpuinfo(key: str) -> str | None:
  """The first ``key : value`` of ``/proc/cpuinfo`` (None where there is none)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.split(":", 1)[0].strip() == key:
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def cpu_model() -> str:
  """The CPU's model name, for logs and benchmark headers (these machines differ)."""
  return _cpuinfo("model name") or platform.processor() or platform.machine()


@functools.cache
def bf16_isa() -> str | None:
  """The CPU's bf16 instructions that oneDNN uses: ``"AMX"``, ``"AVX512-BF16"`` or None."""
  flags = (_cpuinfo("flags") or "").split()
  if "amx_bf16" in flags:
    return "AMX"
  if "avx512_bf16" in flags:
    return "AVX512-BF16"
  return None


def build_library(source: str = _SOURCE, link_onednn: bool = True,
                  extra_flags: tuple = ()) -> str:
  """Compiles a native source once per (source, jax, oneDNN, compiler, flags) and returns the
  shared library's path (cached under ``$VMJAX_CACHE/native``). ``link_onednn=False``: a kernel
  that needs only XLA's FFI headers and OpenMP (:mod:`vmjax.kernels`). ``extra_flags`` (e.g.
  ``-march=native``) are part of the cache key, and so is this CPU's instruction set when they
  tune for it (a cache shared by several machines never hands one another's build)."""
  if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
    raise OSError(f"vmjax's native kernels are built for x86-64 Linux only, not "
                  f"{platform.machine()}")
  include, libdir = _find_dnnl() if link_onednn else ("", "")
  with open(source, "rb") as f:
    text = f.read()
  cxx = os.environ.get("CXX", "g++")
  key = hashlib.sha256(b"\0".join([text, jax.__version__.encode(), libdir.encode(),
                                    (_dnnl_version(include) if link_onednn else "").encode(),
                                    _compiler_version(cxx).encode(),
                                    " ".join(_CXXFLAGS + tuple(extra_flags)).encode(),
                                    (_cpuinfo("flags") or "").encode()
                                    if "-march=native" in extra_flags else b""]
                                   )).hexdigest()[:16]
  cache = os.path.join(os.environ.get("VMJAX_CACHE", os.path.expanduser("~/.cache/vmjax")),
                       "native")
  os.makedirs(cache, exist_ok=True)
  stem = os.path.splitext(os.path.basename(source))[0]
  library = os.path.join(cache, f"libvmjax_{stem}_{key}.so")
  if os.path.exists(library):
    return library
  with open(os.path.join(cache, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time (several processes per host)
    if os.path.exists(library):
      return library
    with atomic_path(library) as tmp:  # a half-written library is never picked up
      cmd = [cxx, *_CXXFLAGS, *extra_flags, source, "-o", tmp, f"-I{jax.ffi.include_dir()}"]
      if link_onednn:
        cmd += [f"-I{include}", f"-L{libdir}", "-ldnnl", f"-Wl,-rpath,{libdir}"]
      try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
      except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise OSError(f"building the native kernel {stem} failed ({' '.join(cmd)}): "
                      f"{detail[-2000:]}") from e
  return library


def _build() -> str:
  """The oneDNN convolution kernel's library (built on first use)."""
  return build_library(_SOURCE, link_onednn=True)


@functools.cache
def onednn_available() -> bool:
  """Builds and registers the oneDNN kernels; False (one warning) when that is impossible."""
  if os.environ.get("VMJAX_CONV", "").lower() == "xla":
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(_build())
    for name, symbol in _TARGETS.items():
      for dtype, suffix in _SUFFIX.items():
        capsule = jax.ffi.pycapsule(getattr(lib, symbol + ("Bf16" if suffix else "")))
        jax.ffi.register_ffi_target(f"vmjax_conv_{name}{suffix}", capsule, platform="cpu")
    name, symbol = _MIXED_TARGET
    jax.ffi.register_ffi_target(f"vmjax_conv_{name}", jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform="cpu")
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("vmjax: oneDNN convolution unavailable, using XLA's on CPU: %s", e)
    return False
  return True


def library_path() -> str:
  """The built kernel's path (building it if needed)."""
  return _build()


def describe_path() -> str:
  """Which convolution the default backend runs, for the start-up log."""
  backend = jax.default_backend()
  if backend != "cpu":
    return f"XLA's ({backend})"
  if not onednn_available():
    return "XLA's (cpu; oneDNN unavailable)"
  isa = bf16_isa()
  return f"oneDNN (cpu; bf16: {isa if isa else 'no bf16 instructions, bf16 runs in f32'})"


@functools.cache
def _warn_bf16_in_f32() -> None:
  logging.warning("vmjax: this CPU has no bf16 instructions (AMX / AVX512-BF16): bfloat16 "
                  "convolutions run oneDNN's f32 kernel and are rounded to bf16")


_force_xla = False


@contextlib.contextmanager
def force_xla():
  """Within this context, functions traced use XLA's convolution on every platform."""
  global _force_xla
  previous, _force_xla = _force_xla, True
  try:
    yield
  finally:
    _force_xla = previous


def _attrs(strides, padding):
  return dict(strides=np.asarray(strides, np.int64),
              pad_lo=np.asarray([p[0] for p in padding], np.int64),
              pad_hi=np.asarray([p[1] for p in padding], np.int64))


def _out_shape(x_shape, w_shape, strides, padding):
  spatial = tuple((n + lo + hi - k) // s + 1
                  for n, k, s, (lo, hi) in zip(x_shape[1:4], w_shape[:3], strides, padding))
  return (x_shape[0],) + spatial + (w_shape[4],)


def _ffi(name, out_shape, *args, strides, padding):
  dtype = jnp.dtype(args[0].dtype)
  call = jax.ffi.ffi_call(f"vmjax_conv_{name}{_SUFFIX[dtype]}",
                          jax.ShapeDtypeStruct(out_shape, dtype), vmap_method="sequential")
  return call(*args, **_attrs(strides, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def onednn_conv3d_f32_out(x: jax.Array, w: jax.Array, strides: tuple,
                          padding: tuple) -> jax.Array:
  """:func:`onednn_conv3d` of bf16 ``x`` and ``w`` to an f32 output (oneDNN accumulates in f32:
  ``lax.conv_general_dilated(..., preferred_element_type=float32)``). Gradients through the f32
  kernels, cast back to bf16."""
  call = jax.ffi.ffi_call(f"vmjax_conv_{_MIXED_TARGET[0]}",
                          jax.ShapeDtypeStruct(_out_shape(x.shape, w.shape, strides, padding),
                                               jnp.float32), vmap_method="sequential")
  return call(x, w, **_attrs(strides, padding))


def _mixed_fwd(x, w, strides, padding):
  return onednn_conv3d_f32_out(x, w, strides, padding), (x, w)


def _mixed_bwd(strides, padding, residuals, dy):
  x, w = residuals
  dx, dw = _bwd(strides, padding, (x.astype(jnp.float32), w.astype(jnp.float32)), dy)
  return dx.astype(x.dtype), dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def onednn_conv3d(x: jax.Array, w: jax.Array, strides: tuple, padding: tuple) -> jax.Array:
  """oneDNN convolution, CPU only. x ``(N, D, H, W, Ci)``, w ``(kd, kh, kw, Ci, Co)``, both f32
  or both bf16, ``strides`` 3 ints, ``padding`` 3 ``(lo, hi)`` pairs -> ``(N, Do, Ho, Wo, Co)``
  of their dtype."""
  return _ffi("fwd", _out_shape(x.shape, w.shape, strides, padding), x, w,
              strides=strides, padding=padding)


def _fwd(x, w, strides, padding):
  return onednn_conv3d(x, w, strides, padding), (x, w)


def _bf16_weight_gradient_is_safe(x_shape, dy_shape) -> bool:
  """oneDNN 3.2's bf16 backward-weights kernel returns garbage (uninitialised values) when the
  volume is tiny: seen on an AVX512-BF16 AMD EPYC for inputs with a spatial size of 1 or 2 (e.g.
  2x2x2 under a 3x3x3 kernel, or a stride-2 output of size 1), never with every input size >= 3
  and every output size >= 2 (288 geometries checked against lax). Smaller ones (the coarsest
  U-Net levels of test-sized volumes) take the f32 kernel."""
  return min(x_shape[1:4]) >= 3 and min(dy_shape[1:4]) >= 2


def _bwd(strides, padding, residuals, dy):
  x, w = residuals
  dy = dy.astype(x.dtype)  # the kernels take one dtype for all three buffers
  dx = _ffi("bwd_data", x.shape, dy, w, strides=strides, padding=padding)
  if x.dtype == jnp.bfloat16 and not _bf16_weight_gradient_is_safe(x.shape, dy.shape):
    dw = _ffi("bwd_weights", w.shape, x.astype(jnp.float32), dy.astype(jnp.float32),
              strides=strides, padding=padding).astype(w.dtype)
  else:
    dw = _ffi("bwd_weights", w.shape, x, dy, strides=strides, padding=padding)
  return dx, dw


onednn_conv3d.defvjp(_fwd, _bwd)
onednn_conv3d_f32_out.defvjp(_mixed_fwd, _mixed_bwd)


def _leaky_relu(y, slope):
  return y if slope is None else jnp.where(y >= 0, y, slope * y)


def conv_block(x: jax.Array, w: jax.Array, b: jax.Array, strides: Sequence[int],
               padding: Sequence[tuple[int, int]], negative_slope: float | None = None,
               remat: bool = False) -> jax.Array:
  """``leaky_relu(conv(x, w) + b, negative_slope)`` (no activation when ``None``), channels-last.

  ``remat=True`` wraps the block in ``jax.checkpoint``: the backward pass recomputes it instead
  of keeping its pre-activation. Measured for a VM-2 train step at 160x192x224: on an H100 the
  compiled temp memory drops 5.87 -> 5.32 GiB (+22% time); XLA:CPU merges the recomputation back
  into the forward pass (no saving; the step needs 7.0 GiB peak RSS either way).
  """
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)

  def plain(x, w, b):
    y = conv_general_dilated(x, w, strides, padding, dimension_numbers=_NDHWC)
    return _leaky_relu(y + b.astype(y.dtype), negative_slope)

  return (jax.checkpoint(plain) if remat else plain)(x, w, b)


def conv_block_f32_out(x: jax.Array, w: jax.Array, b: jax.Array, strides: Sequence[int],
                       padding: Sequence[tuple[int, int]],
                       negative_slope: float | None = None) -> jax.Array:
  """:func:`conv_block` of bf16 activations ``x`` with an f32 kernel ``w`` and bias, to an f32
  output (a bf16 network's last convolution: the displacement stays f32).

  The kernel is split into two bf16 parts, ``hi + lo`` (16 significant bits together), computed
  as one convolution to ``2 * Co`` channels with f32 accumulation and summed: every product of a
  bf16 activation and a part is exact in f32, so the result matches the f32 convolution of ``x``
  to ~1e-5 relative. On the oneDNN path this runs the bf16 kernel instead of the f32 one (VM-2's
  16 -> 3 flow layer at 160x192x224, 2-core AMD EPYC: 0.36 s against 0.68 s).
  """
  co = w.shape[-1]
  w = w.astype(jnp.float32)
  hi = w.astype(jnp.bfloat16)
  lo = lax.stop_gradient(w - hi.astype(jnp.float32)).astype(jnp.bfloat16)
  y = conv_general_dilated(x.astype(jnp.bfloat16), jnp.concatenate([hi, lo], axis=-1),
                           tuple(int(s) for s in strides),
                           tuple((int(lo_), int(hi_)) for lo_, hi_ in padding),
                           dimension_numbers=_NDHWC, preferred_element_type=jnp.float32)
  y = y[..., :co] + y[..., co:]
  return _leaky_relu(y + b.astype(jnp.float32), negative_slope)


def upsample2(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 upsampling of ``(B, D, H, W, C)``."""
  for axis in (1, 2, 3):
    x = jnp.repeat(x, 2, axis=axis)
  return x


# Nearest x2 upsampling followed by a 3-tap convolution, per axis: a fine voxel 2i + p reads the
# coarse voxels i - 1 + p and i + p, with these sums of the kernel's taps (parity 0: tap 0, then
# taps 1 + 2; parity 1: taps 0 + 1, then tap 2). Indexed [parity, coarse tap, fine tap].
_SUBPIXEL_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)


def subpixel_kernel(w: jax.Array) -> jax.Array:
  """The 3x3x3 kernel ``w`` ``(3, 3, 3, Ci, Co)`` applied to x2-upsampled activations, as one
  2x2x2 kernel on the coarse grid ``(2, 2, 2, Ci, 8 * Co)`` (f32): output channel
  ``(p1 * 4 + p2 * 2 + p3) * Co + o`` is fine parity ``(p1, p2, p3)``, channel ``o``."""
  ci, co = w.shape[3:]
  m = jnp.asarray(_SUBPIXEL_TAPS)
  k = jnp.einsum("pat,qbu,rcv,tuvio->abcipqro", m, m, m, w.astype(jnp.float32))
  return k.reshape(2, 2, 2, ci, 8 * co)


def _subpixel_call(z, s, b, slope):
  # y overwrites s (same shape, s is dead after): no fresh 0.4 GB buffer at 160x192x224.
  call = jax.ffi.ffi_call(f"vmjax_conv_subpixel{_SUFFIX[jnp.dtype(s.dtype)]}",
                          jax.ShapeDtypeStruct(s.shape, s.dtype), vmap_method="sequential",
                          input_output_aliases={1: 0})
  return call(z, s, b, slope=np.float32(slope))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _subpixel_epilogue(z, s, b, slope):
  """``leaky_relu(shuffle(z) + s + b, slope)`` (native, CPU): ``z`` ``(B, n1+1, n2+1, n3+1,
  8*C)`` from the 2x2x2 coarse convolution, ``s``, output ``(B, 2n1, 2n2, 2n3, C)``."""
  return _subpixel_call(z, s, b, slope)


def _subpixel_fwd(z, s, b, slope):
  y = _subpixel_call(z, s, b, slope)
  return y, y


def _subpixel_bwd(slope, y, dy):
  g = jnp.where(y >= 0, dy, slope * dy)  # slope > 0: y and its pre-activation share a sign
  bsz, d, h, w, c = g.shape
  n1, n2, n3 = d // 2, h // 2, w // 2
  g8 = g.reshape(bsz, n1, 2, n2, 2, n3, 2, c).transpose(0, 2, 4, 6, 1, 3, 5, 7)
  parts = [jnp.pad(g8[:, p1, p2, p3], ((0, 0), (p1, 1 - p1), (p2, 1 - p2), (p3, 1 - p3), (0, 0)))
           for p1 in (0, 1) for p2 in (0, 1) for p3 in (0, 1)]
  dz = jnp.stack(parts, axis=4).reshape(bsz, n1 + 1, n2 + 1, n3 + 1, 8 * c)
  return dz, g, g.sum(axis=(0, 1, 2, 3), dtype=jnp.float32).astype(g.dtype)


_subpixel_epilogue.defvjp(_subpixel_fwd, _subpixel_bwd)


def upsample_concat_conv_block(h: jax.Array, skip: jax.Array, w: jax.Array, b: jax.Array,
                               negative_slope: float | None = None,
                               remat: bool = False) -> jax.Array:
  """``conv_block(concat([upsample2(h), skip], -1), w, b)`` (stride 1, padding 1): a U-Net
  decoder step. ``h`` ``(B, n1, n2, n3, C1)``, ``skip`` ``(B, 2n1, 2n2, 2n3, C2)``, both of the
  computation dtype; ``w`` ``(3, 3, 3, C1 + C2, Co)`` and ``b`` ``(Co,)`` of any float dtype
  (cast to it) -> ``(B, 2n1, 2n2, 2n3, Co)``.

  On the CPU's oneDNN path the upsampled part is computed on the coarse grid
  (:func:`subpixel_kernel`: a 2x2x2 convolution to 8 * Co channels, one per fine parity, 3.4x
  fewer multiply-adds than the 3x3x3 one at full resolution), the skip part as its own
  convolution, and one native pass interleaves, adds the bias and applies the activation. Same
  result (up to rounding) as the direct computation, which every other platform runs.
  Measured for VM-2's 34 -> 32 layer at 160x192x224 on a 2-core AMD EPYC (bf16, 2026-11-26):
  0.93 s against 1.31 s for upsampling, concatenation and the direct convolution (the native
  pass writes over the skip convolution's output: no fresh 0.4 GB buffer to fault in).
  """
  if negative_slope is not None and not 0 < negative_slope <= 1:
    raise ValueError(f"negative_slope must be in (0, 1] or None, got {negative_slope}")
  dtype = h.dtype
  c1 = h.shape[-1]

  def plain(h, skip, w, b):
    x = jnp.concatenate([upsample2(h), skip], axis=-1)
    return conv_block(x, w.astype(dtype), b.astype(dtype), (1, 1, 1), ((1, 1),) * 3,
                      negative_slope)

  def on_cpu(h, skip, w, b):
    one, pad = (1, 1, 1), ((1, 1),) * 3
    z = conv_general_dilated(h, subpixel_kernel(w[..., :c1, :]).astype(dtype), one, pad,
                             dimension_numbers=_NDHWC)
    s = conv_general_dilated(skip, w[..., c1:, :].astype(dtype), one, pad,
                             dimension_numbers=_NDHWC)
    return _subpixel_epilogue(z, s, b.astype(dtype), 1.0 if negative_slope is None
                              else float(negative_slope))

  eligible = (jax.default_backend() == "cpu" and jnp.dtype(dtype) in _SUFFIX
              and skip.dtype == dtype and not _force_xla and onednn_available())
  if eligible:
    def fn(h, skip, w, b):
      return lax.platform_dependent(h, skip, w, b, cpu=on_cpu, default=plain)
  else:
    fn = plain
  return (jax.checkpoint(fn) if remat else fn)(h, skip, w, b)


def _is_channels_last_3d(dimension_numbers, ndim) -> bool:
  if ndim != 5:
    return False
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return dimension_numbers == lax.conv_dimension_numbers(
        (1,) * 5, (1,) * 5, _NDHWC)
  return tuple(dimension_numbers) == _NDHWC


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated`` that uses oneDNN for f32 / bf16 channels-last 3-D convolutions
  on CPU.

  Everything else (other layouts, dilation, groups, dtypes, GPU/TPU) goes to lax unchanged.
  """
  plain = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  mixed = (lhs.dtype == jnp.bfloat16 and preferred_element_type is not None
           and jnp.dtype(preferred_element_type) == jnp.float32)
  eligible = (
      jax.default_backend() == "cpu"  # never build the CPU kernel on a GPU/TPU host
      and _is_channels_last_3d(dimension_numbers, lhs.ndim)
      and jnp.dtype(lhs.dtype) in _SUFFIX and lhs.dtype == rhs.dtype
      and (preferred_element_type in (None, lhs.dtype) or mixed)
      and all(d == 1 for d in (lhs_dilation or (1,) * 3))
      and all(d == 1 for d in (rhs_dilation or (1,) * 3))
      and feature_group_count == 1 and batch_group_count == 1
      and not _force_xla and onednn_available())
  if not eligible:
    return plain(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:4], rhs.shape[:3], strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if any(p < 0 for pair in padding for p in pair):
    return plain(lhs, rhs)

  def on_cpu(x, w):
    if x.dtype == jnp.bfloat16 and bf16_isa() is None:
      _warn_bf16_in_f32()
      f32 = onednn_conv3d(x.astype(jnp.float32), w.astype(jnp.float32), strides, padding)
      return f32 if mixed else f32.astype(jnp.bfloat16)
    if mixed:
      return onednn_conv3d_f32_out(x, w, strides, padding)
    return onednn_conv3d(x, w, strides, padding)

  return lax.platform_dependent(lhs, rhs, cpu=on_cpu, default=lambda x, w: plain(x, w))

