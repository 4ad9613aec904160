"""Spatial transforms: warping, composition and integration of displacement fields.

Conventions (used throughout vmjax):
  * volumes are channels-last, ``(B, D, H, W, C)``;
  * displacement fields are ``(B, D, H, W, 3)`` in voxel units, component ``i`` along spatial
    axis ``i`` (D, H, W);
  * a displacement ``u`` warps a moving image ``m`` as ``moved(x) = m(x + u(x))`` (pull-back,
    like VoxelMorph's spatial transformer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

_MODES = ("constant", "nearest", "wrap", "mirror", "reflect")


def identity_grid(spatial_shape) -> jax.Array:
  """Voxel coordinates of a grid, ``(D, H, W, 3)`` float32: ``grid[d, h, w] == (d, h, w)``."""
  axes = [jnp.arange(n, dtype=jnp.float32) for n in spatial_shape]
  return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)


def _warp_one(volume: jax.Array, coords: jax.Array, order: int, mode: str) -> jax.Array:
  """Resamples one single-channel volume ``(D, H, W)`` at ``coords`` ``(D, H, W, 3)``."""
  return ndimage.map_coordinates(volume, [coords[..., i] for i in range(3)], order=order,
                                 mode=mode)


def warp(image: jax.Array, disp: jax.Array, order: int = 1, mode: str = "constant") -> jax.Array:
  """Warps ``image`` with the displacement ``disp``: ``moved(x) = image(x + disp(x))``.

  Args:
    image: ``(B, D, H, W, C)`` volume (any float dtype; integer label maps with ``order=0``).
    disp: ``(B, D, H, W, 3)`` displacement in voxels, same spatial shape as ``image``.
    order: 1 = trilinear (differentiable in ``image`` and ``disp``); 0 = nearest neighbour,
      for label maps: every output value is a value of the input (labels stay labels).
    mode: out-of-volume handling of ``jax.scipy.ndimage.map_coordinates``: ``"constant"``
      (zeros outside; scipy calls it ``"grid-constant"``), ``"nearest"`` (clamp to the edge),
      ``"wrap"``, ``"mirror"``, ``"reflect"``.

  Returns:
    ``(B, D, H, W, C)`` warped volume with ``image``'s dtype.
  """
  if image.ndim != 5 or disp.ndim != 5 or disp.shape[-1] != 3:
    raise ValueError(f"warp expects image (B, D, H, W, C) and disp (B, D, H, W, 3); got image "
                     f"{tuple(image.shape)} and disp {tuple(disp.shape)}")
  if image.shape[:4] != disp.shape[:4]:
    raise ValueError(f"warp: image {tuple(image.shape)} and disp {tuple(disp.shape)} differ in "
                     "batch or spatial shape")
  if order not in (0, 1):
    raise ValueError(f"warp: order must be 0 (nearest) or 1 (trilinear), got {order}")
  if mode not in _MODES:
    raise ValueError(f"warp: mode must be one of {_MODES}, got {mode!r}")
  coords = identity_grid(image.shape[1:4]) + disp.astype(jnp.float32)
  # vmap over channels (last axis of image), then over the batch.
  per_channel = jax.vmap(_warp_one, in_axes=(-1, None, None, None), out_axes=-1)
  per_batch = jax.vmap(per_channel, in_axes=(0, 0, None, None))
  return per_batch(image, coords, order, mode)


def compose(disp_a: jax.Array, disp_b: jax.Array, mode: str = "nearest") -> jax.Array:
  """The displacement of "warp with ``disp_a``, then with ``disp_b``".

  ``warp(warp(m, disp_a), disp_b) == warp(m, compose(disp_a, disp_b))`` up to interpolation:
  ``c(x) = disp_b(x) + disp_a(x + disp_b(x))``. Fields are extended beyond the volume by their
  edge values (``mode="nearest"``), so a smooth field stays smooth at the border.

  Args:
    disp_a, disp_b: ``(B, D, H, W, 3)`` displacements in voxels.

  Returns:
    ``(B, D, H, W, 3)`` displacement.
  """
  return disp_b + warp(disp_a, disp_b, order=1, mode=mode)


def integrate_velocity(velocity: jax.Array, steps: int = 7) -> jax.Array:
  """Integrates a stationary velocity field by scaling and squaring (VoxelMorph's ``VecInt``).

  ``u_0 = v / 2**steps``; ``u_{k+1} = compose(u_k, u_k)``; returns ``u_steps`` ≈ exp(v), a
  diffeomorphism when ``v`` is smooth enough. ``integrate_velocity(-v)`` is its inverse.

  Args:
    velocity: ``(B, D, H, W, 3)`` velocity in voxels.
    steps: number of squarings (0 returns ``velocity`` unchanged).

  Returns:
    ``(B, D, H, W, 3)`` displacement.
  """
  if steps < 0:
    raise ValueError(f"integrate_velocity: steps must be >= 0, got {steps}")
  disp = velocity / (2.0 ** steps)
  for _ in range(steps):
    disp = compose(disp, disp)
  return disp


def resize_field(disp: jax.Array, spatial_shape) -> jax.Array:
  """Resamples a displacement field to ``spatial_shape`` (trilinear) and rescales its vectors.

  Component ``i`` is multiplied by ``spatial_shape[i] / disp.shape[1 + i]`` so it stays in the
  voxel units of the new grid (VoxelMorph's ``ResizeTransform``).

  Args:
    disp: ``(B, D, H, W, 3)`` displacement.
    spatial_shape: target ``(D', H', W')``.

  Returns:
    ``(B, D', H', W', 3)`` displacement.
  """
  spatial_shape = tuple(int(n) for n in spatial_shape)
  old = disp.shape[1:4]
  if spatial_shape == tuple(old):
    return disp
  out = jax.image.resize(disp, (disp.shape[0],) + spatial_shape + (3,), method="linear")
  scale = jnp.asarray([n / o for n, o in zip(spatial_shape, old)], dtype=disp.dtype)
  return out * scale
