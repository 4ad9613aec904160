"""Registering a pair with a trained network: one jitted forward pass plus the warp."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vmjax import checks
from vmjax import transforms
from vmjax.networks import VxmDense


@functools.partial(jax.jit, static_argnums=0)
def _register(model: VxmDense, variables, moving: jax.Array, fixed: jax.Array):
  disp = model.apply(variables, moving, fixed)
  return transforms.warp(moving, disp), disp


def register(model: VxmDense, variables, moving: jax.Array, fixed: jax.Array):
  """Registers ``moving`` to ``fixed`` with a trained VoxelMorph network.

  One jit-compiled function: a second call with the same shapes (and the same ``model``) does
  not recompile. Inputs are validated first (rank, shape match, divisibility, NaN/Inf).

  Args:
    model: the ``VxmDense`` module (static: hashed by its configuration).
    variables: its variables (``{"params": ...}``).
    moving, fixed: ``(B, D, H, W, C)`` volumes, spatial sizes divisible by
      ``2**len(model.enc_features)`` (see :func:`pad_to_multiple`).

  Returns:
    ``(moved, disp)``: ``(B, D, H, W, C)`` warped moving image (trilinear) and the
    ``(B, D, H, W, 3)`` displacement in voxels; warp labels with ``warp(seg, disp, order=0)``.
  """
  checks.check_pair(moving, fixed, levels=model.levels)
  return _register(model, variables, moving, fixed)


def pad_to_multiple(x: jax.Array, multiple: int, mode: str = "constant"):
  """Pads the spatial axes of ``(B, D, H, W, C)`` at their end to multiples of ``multiple``.

  Returns:
    ``(padded, spatial_shape)``: crop back with ``padded[:, :D, :H, :W]``.
  """
  shape = tuple(x.shape[1:4])
  target = checks.divisible_shape(shape, multiple)
  pads = [(0, 0)] + [(0, t - n) for t, n in zip(target, shape)] + [(0, 0)]
  return jnp.pad(x, pads, mode=mode), shape
