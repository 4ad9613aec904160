"""Registration losses: image similarity (local NCC, MSE), smoothness, soft Dice, and the
VoxelMorph objective that combines them (:func:`compute_loss`, used by training and by
instance-specific optimisation alike).

All losses are pure functions returning a scalar to *minimise*; shapes are channels-last
(``(B, D, H, W, C)`` volumes, ``(B, D, H, W, 3)`` displacements). The objective's settings are
``config.loss`` (``configs/default.py``).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from vmjax import kernels
from vmjax import transforms


def box_sum(x: jax.Array, window: int) -> jax.Array:
  """Sum of ``x`` over a ``window``^3 cube around each voxel, zero padded, same size.

  Separable: three 1-D running-window sums (``lax.reduce_window``, one per spatial axis), i.e.
  ``O(3 * window)`` additions per voxel instead of the ``window**3`` of a dense box convolution.

  Args:
    x: ``(B, D, H, W, C)``.
    window: odd window width.

  Returns:
    ``(B, D, H, W, C)``.
  """
  return kernels.on_cpu(functools.partial(kernels.box_sum, window=window),
                        functools.partial(box_sum_xla, window=window), x)


def box_sum_xla(x: jax.Array, window: int) -> jax.Array:
  """:func:`box_sum` in XLA (every platform; the native kernel's reference)."""
  half = window // 2
  for axis in (1, 2, 3):
    dims = [1] * 5
    dims[axis] = window
    pads = [(0, 0)] * 5
    pads[axis] = (half, half)
    x = lax.reduce_window(x, 0.0, lax.add, tuple(dims), (1,) * 5, tuple(pads))
  return x


def mean(x: jax.Array) -> jax.Array:
  """``jnp.mean(x)`` of a float32 map; on the CPU the sum is a native pass of its own
  (:func:`vmjax.kernels.mean`: XLA:CPU would fuse the map into the reduction, ~20-50x slower)."""
  return kernels.on_cpu(kernels.mean, jnp.mean, x)


@functools.partial(jax.jit, static_argnames=("window",))
def ncc_loss(fixed: jax.Array, moved: jax.Array, window: int = 9) -> jax.Array:
  """VoxelMorph's local normalised cross-correlation loss, ``-mean(cc)``.

  Over each ``window``^3 neighbourhood (zero padded, ``n = window**3``), with box sums ``Σ``:
  ``cross = Σfm - μm Σf - μf Σm + μf μm n``, ``var_f = Σf² - 2 μf Σf + μf² n`` (``var_m``
  likewise), ``cc = cross² / (var_f var_m + 1e-5)``. Since ``μ = Σ/n`` these reduce to
  ``cross = Σfm - Σf Σm / n`` and ``var = Σx² - (Σx)² / n``, which is what is computed (fewer
  cancellations). Variances are clamped at 0 so rounding never makes the denominator tiny:
  constant regions give ``cc ≈ 0``, never NaN or Inf. The box sums are separable running sums
  (:func:`box_sum`), not a dense 9x9x9 convolution. On the CPU the whole loss and its gradient
  are native calls (:func:`vmjax.kernels.ncc_loss`; :func:`ncc_loss_xla` elsewhere).

  Args:
    fixed, moved: ``(B, D, H, W, C)`` images.
    window: odd neighbourhood width (VoxelMorph: 9).

  Returns:
    scalar; ≈ -1 for identical textured images.
  """
  if window < 1 or window % 2 == 0:
    raise ValueError(f"ncc_loss: window must be a positive odd integer, got {window}")
  if fixed.shape != moved.shape:
    raise ValueError(f"ncc_loss: fixed {fixed.shape} and moved {moved.shape} differ in shape")
  f = fixed.astype(jnp.float32)
  m = moved.astype(jnp.float32)
  return kernels.on_cpu(functools.partial(kernels.ncc_loss, window=window),
                        functools.partial(ncc_loss_xla, window=window), f, m)


def ncc_loss_xla(fixed: jax.Array, moved: jax.Array, window: int = 9) -> jax.Array:
  """:func:`ncc_loss` in XLA alone (every platform; the native kernel's reference), float32
  inputs."""
  f, m = fixed, moved
  c = f.shape[-1]
  # Two calls: in a gradient with respect to the moved image (and in a loop over a fixed scan)
  # the fixed scan's sums are constants, so XLA prunes their backward pass (and hoists them).
  fixed_sums = box_sum_xla(jnp.concatenate([f, f * f], axis=-1), window)
  sum_f, sum_ff = fixed_sums[..., :c], fixed_sums[..., c:]
  sums = box_sum_xla(jnp.concatenate([m, m * m, f * m], axis=-1), window)
  sum_m, sum_mm, sum_fm = (sums[..., i * c:(i + 1) * c] for i in range(3))
  n = float(window ** 3)
  cross = sum_fm - sum_f * sum_m / n
  var_f = jnp.maximum(sum_ff - sum_f * sum_f / n, 0.0)
  var_m = jnp.maximum(sum_mm - sum_m * sum_m / n, 0.0)
  cc = cross * cross / (var_f * var_m + 1e-5)
  return -jnp.mean(cc)


def mse_loss(fixed: jax.Array, moved: jax.Array) -> jax.Array:
  """Mean squared intensity difference; ``(B, D, H, W, C)`` inputs, scalar output."""
  return mean(jnp.square(fixed.astype(jnp.float32) - moved.astype(jnp.float32)))


def grad_loss(disp: jax.Array) -> jax.Array:
  """L2 smoothness of a displacement (VoxelMorph ``Grad('l2')``).

  Mean of squared forward differences along each spatial axis, averaged over the three axes.

  Args:
    disp: ``(B, D, H, W, 3)``.

  Returns:
    scalar.
  """
  total = 0.0
  for axis in (1, 2, 3):
    total = total + mean(jnp.square(jnp.diff(disp, axis=axis)))
  return total / 3.0


def soft_dice_loss(seg_a: jax.Array, seg_b: jax.Array, eps: float = 1e-5) -> jax.Array:
  """``1 - mean soft Dice`` of one-hot / probabilistic label maps (auxiliary segmentation loss).

  Args:
    seg_a, seg_b: ``(B, D, H, W, L)`` one-hot (or soft) maps of ``L`` labels.

  Returns:
    scalar in [0, 1].
  """
  axes = (1, 2, 3)
  top = 2.0 * jnp.sum(seg_a * seg_b, axis=axes)
  bottom = jnp.sum(seg_a, axis=axes) + jnp.sum(seg_b, axis=axes)
  return 1.0 - jnp.mean(top / jnp.maximum(bottom, eps))


def image_loss(loss_cfg) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The image similarity ``sim(fixed, moved)`` that ``config.loss.image`` names."""
  if loss_cfg.image == "ncc":
    return functools.partial(ncc_loss, window=loss_cfg.window)
  if loss_cfg.image == "mse":
    return mse_loss
  raise ValueError(f"config.loss.image must be 'ncc' or 'mse', got {loss_cfg.image!r}")


def one_hot_labels(seg: jax.Array, labels) -> jax.Array:
  """``(B, D, H, W, 1)`` int label map to ``(B, D, H, W, L)`` float one-hot over ``labels``."""
  return (seg == jnp.asarray(labels, seg.dtype)).astype(jnp.float32)


def field_loss(fields: dict, moving: jax.Array, fixed: jax.Array,
               loss_cfg) -> tuple[jax.Array, dict]:
  """The image and smoothness terms of :func:`compute_loss` for given fields.

  ``sim(fixed, moving∘φ) [+ sim(moving, fixed∘φ⁻¹), each weighted 1/2 when bidirectional]
  + lam · grad_loss(velocity)``.

  Args:
    fields: ``disp``, ``velocity`` (and ``inverse`` when ``loss_cfg.bidir``) as
      :meth:`vmjax.networks.VxmDense.fields` returns them, ``(B, ., ., ., 3)``.
    moving, fixed: ``(B, D, H, W, 1)``.
    loss_cfg: ``config.loss``.

  Returns:
    ``(loss, {"image": ..., "smooth": ...})``.
  """
  sim = image_loss(loss_cfg)
  image_term = sim(fixed, transforms.warp(moving, fields["disp"]))
  if loss_cfg.bidir:
    image_term = 0.5 * image_term + 0.5 * sim(moving, transforms.warp(fixed, fields["inverse"]))
  smooth_term = grad_loss(fields["velocity"])
  return image_term + loss_cfg.lam * smooth_term, {"image": image_term, "smooth": smooth_term}


def compute_loss(params, model, batch: dict, loss_cfg, seg_labels=()) -> tuple[jax.Array, dict]:
  """The VoxelMorph objective for one batch.

  ``sim(fixed, moving∘φ) [+ sim(moving, fixed∘φ⁻¹), each weighted 1/2 when bidirectional]
  + lam · grad_loss(velocity) [+ seg_weight · soft_dice_loss(moving_seg∘φ, fixed_seg)]``.

  Args:
    params: the network's parameters.
    model: a :class:`vmjax.networks.VxmDense` (its ``fields`` method is applied).
    batch: ``moving``, ``fixed`` ``(B, D, H, W, 1)``; with ``seg_weight > 0`` also
      ``moving_seg``, ``fixed_seg`` int ``(B, D, H, W, 1)``.
    loss_cfg: ``config.loss``.
    seg_labels: the labels of the auxiliary Dice loss.

  Returns:
    ``(loss, metrics)``.
  """
  moving, fixed = batch["moving"], batch["fixed"]
  fields = model.apply({"params": params}, moving, fixed, bidir=loss_cfg.bidir,
                       method=type(model).fields)
  loss, out = field_loss(fields, moving, fixed, loss_cfg)
  disp = fields["disp"]
  if loss_cfg.seg_weight > 0:
    if "moving_seg" not in batch or not len(seg_labels):
      raise ValueError("config.loss.seg_weight > 0 needs labelled data and config.data.labels")
    moved_seg = transforms.warp(one_hot_labels(batch["moving_seg"], seg_labels), disp)
    seg_term = soft_dice_loss(moved_seg, one_hot_labels(batch["fixed_seg"], seg_labels))
    loss = loss + loss_cfg.seg_weight * seg_term
    out["seg"] = seg_term
  out["loss"] = loss
  return loss, out
