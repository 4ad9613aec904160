"""3-D convolution: XLA's native one, or oneDNN's on the CPU.

XLA:CPU runs 3x3x3 convolutions at ~30 GFLOP/s on AVX-512/AMX cores where oneDNN (what PyTorch
uses) reaches ~300 (measured: docs/performance.md). ``conv_general_dilated`` below has
``lax.conv_general_dilated``'s signature (flax's ``nn.Conv(conv_general_dilated=...)`` takes it)
and, inside one jitted function, lowers to a oneDNN custom call on CPU and to XLA's convolution
on every other platform (:func:`vmjax.native.build.dispatch`). Same math (direct convolution);
gradients go through oneDNN's backward-data / backward-weights kernels via ``jax.custom_vjp``.
float32 and bfloat16 (inputs, kernel and output of one type; oneDNN accumulates in f32): bf16
runs oneDNN's AMX / AVX512-BF16 kernels where the CPU has those instructions
(``native.build.bf16_isa``); elsewhere a bf16 convolution is computed by the f32 kernel and
rounded to bf16 (said once in the log). Also here: bf16 inputs to an f32 output
(``preferred_element_type``) and the native pass of the U-Net's coarse-grid decoder step
(:func:`subpixel_epilogue`, used by :mod:`vmjax.blocks`).

The kernel (``vmjax/native/onednn_conv.cc``) is built on first use by :mod:`vmjax.native.build`
(only when a convolution is traced for the CPU backend: never on a GPU/TPU host's default
path). Anything missing (no compiler, no oneDNN, not x86-64 Linux) falls back to XLA with one
warning. ``VMJAX_CONV=xla`` forces XLA.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Sequence

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from vmjax.native import build

_SOURCE = os.path.join(build.HERE, "onednn_conv.cc")
_TARGETS = {"fwd": "VmjaxConvForward", "bwd_data": "VmjaxConvBackwardData",
            "bwd_weights": "VmjaxConvBackwardWeights", "subpixel": "VmjaxSubpixelEpilogue"}
SUFFIX = {jnp.dtype(jnp.float32): "", jnp.dtype(jnp.bfloat16): "_bf16"}  # FFI target per dtype
_MIXED_TARGET = ("fwd_bf16_f32", "VmjaxConvForwardBf16F32")  # bf16 x, w -> f32 y
NDHWC = ("NDHWC", "DHWIO", "NDHWC")


def _ffi_targets() -> dict[str, str]:
  targets = {f"vmjax_conv_{name}{suffix}": symbol + ("Bf16" if suffix else "")
             for name, symbol in _TARGETS.items() for suffix in SUFFIX.values()}
  targets[f"vmjax_conv_{_MIXED_TARGET[0]}"] = _MIXED_TARGET[1]
  return targets


@functools.cache
def onednn_available() -> bool:
  """Builds and registers the oneDNN kernels; False (one warning) when that is impossible."""
  if os.environ.get("VMJAX_CONV", "").lower() == "xla":
    return False
  try:
    build.load(_SOURCE, _ffi_targets(), link_onednn=True)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("vmjax: oneDNN convolution unavailable, using XLA's on CPU: %s", e)
    return False
  return True


def library_path() -> str:
  """The built kernel's path (building it if needed)."""
  return build.build_library(_SOURCE, link_onednn=True)


def describe_path() -> str:
  """Which convolution the default backend runs, for the start-up log."""
  backend = jax.default_backend()
  if backend != "cpu":
    return f"XLA's ({backend})"
  if not onednn_available():
    return "XLA's (cpu; oneDNN unavailable)"
  isa = build.bf16_isa()
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


def onednn_eligible() -> bool:
  """Whether a convolution traced now may take the oneDNN path: the default backend is the CPU
  (the kernel is never built on a GPU/TPU host), not within :func:`force_xla`, and built."""
  return jax.default_backend() == "cpu" and not _force_xla and onednn_available()


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
  call = jax.ffi.ffi_call(f"vmjax_conv_{name}{SUFFIX[dtype]}",
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


def _subpixel_call(z, s, b, slope):
  # y overwrites s (same shape, s is dead after): no fresh 0.4 GB buffer at 160x192x224.
  call = jax.ffi.ffi_call(f"vmjax_conv_subpixel{SUFFIX[jnp.dtype(s.dtype)]}",
                          jax.ShapeDtypeStruct(s.shape, s.dtype), vmap_method="sequential",
                          input_output_aliases={1: 0})
  return call(z, s, b, slope=np.float32(slope))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def subpixel_epilogue(z, s, b, slope):
  """The native pass of :func:`vmjax.blocks.upsample_concat_conv_block` on the oneDNN path:
  ``leaky_relu(shuffle(z) + s + b, slope)`` (CPU): ``z`` ``(B, n1+1, n2+1, n3+1, 8*C)`` from the
  2x2x2 coarse convolution, ``s`` and the output ``(B, 2n1, 2n2, 2n3, C)``."""
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


subpixel_epilogue.defvjp(_subpixel_fwd, _subpixel_bwd)


def _is_channels_last_3d(dimension_numbers, ndim) -> bool:
  if ndim != 5:
    return False
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return dimension_numbers == lax.conv_dimension_numbers(
        (1,) * 5, (1,) * 5, NDHWC)
  return tuple(dimension_numbers) == NDHWC


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
      _is_channels_last_3d(dimension_numbers, lhs.ndim)
      and jnp.dtype(lhs.dtype) in SUFFIX and lhs.dtype == rhs.dtype
      and (preferred_element_type in (None, lhs.dtype) or mixed)
      and all(d == 1 for d in (lhs_dilation or (1,) * 3))
      and all(d == 1 for d in (rhs_dilation or (1,) * 3))
      and feature_group_count == 1 and batch_group_count == 1
      and onednn_eligible())
  if not eligible:
    return plain(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:4], rhs.shape[:3], strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if any(p < 0 for pair in padding for p in pair):
    return plain(lhs, rhs)

  def on_cpu(x, w):
    if x.dtype == jnp.bfloat16 and build.bf16_isa() is None:
      _warn_bf16_in_f32()
      f32 = onednn_conv3d(x.astype(jnp.float32), w.astype(jnp.float32), strides, padding)
      return f32 if mixed else f32.astype(jnp.bfloat16)
    if mixed:
      return onednn_conv3d_f32_out(x, w, strides, padding)
    return onednn_conv3d(x, w, strides, padding)

  return build.dispatch(on_cpu, lambda x, w: plain(x, w), lhs, rhs)

