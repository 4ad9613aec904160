"""Spatial transforms: warping, composition and integration of displacement fields.

Conventions (used throughout vmjax):
  * volumes are channels-last, ``(B, D, H, W, C)``;
  * displacement fields are ``(B, D, H, W, 3)`` in voxel units, component ``i`` along spatial
    axis ``i`` (D, H, W);
  * a displacement ``u`` warps a moving image ``m`` as ``moved(x) = m(x + u(x))`` (pull-back,
    like VoxelMorph's spatial transformer).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy import ndimage
import numpy as np

from vmjax import kernels

_MODES = ("constant", "nearest", "wrap", "mirror", "reflect")


def identity_grid(spatial_shape) -> jax.Array:
  """Voxel coordinates of a grid, ``(D, H, W, 3)`` float32: ``grid[d, h, w] == (d, h, w)``."""
  axes = [jnp.arange(n, dtype=jnp.float32) for n in spatial_shape]
  return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)


def apply_affine(matrix, points: jax.Array) -> jax.Array:
  """``matrix · p`` for points ``(..., 3)`` (a 4x4 homogeneous or 3x4 matrix) -> ``(..., 3)``
  float32, as per-component multiply-adds: XLA fuses them with whatever makes the points (an
  index grid costs no memory), where a matrix product over millions of 3-vectors runs as a slow
  dot on the CPU (256x256x160 points: 290 ms eager against ~20 ms fused)."""
  m = jnp.asarray(matrix, jnp.float32)
  p = [points[..., j].astype(jnp.float32) for j in range(3)]
  return jnp.stack([m[r, 0] * p[0] + m[r, 1] * p[1] + m[r, 2] * p[2] + m[r, 3]
                    for r in range(3)], axis=-1)


def _warp_one(volume: jax.Array, coords: jax.Array, order: int, mode: str) -> jax.Array:
  """Resamples one single-channel volume ``(D, H, W)`` at ``coords`` ``(D, H, W, 3)``."""
  return ndimage.map_coordinates(volume, [coords[..., i] for i in range(3)], order=order,
                                 mode=mode)


_CORNERS = tuple(itertools.product((0, 1), repeat=3))


def _corners(coords: jax.Array, spatial_shape, mode: str):
  """The 8 trilinear neighbours of ``coords`` ``(B, D, H, W, 3)``, per axis (fuses well).

  Yields ``(flat_index (B, M), valid (B, M, 1), factors, signs)`` per corner (``M = D*H*W``):
  ``factors`` are the three per-axis weights ``(B, M, 1)`` whose product is the corner's weight,
  ``signs[a]`` the sign of d(factor_a)/d(coord_a). ``mode="nearest"`` clamps indices to the
  volume; ``"constant"`` marks corners outside it invalid (zero contribution), as
  ``map_coordinates`` does.
  """
  b = coords.shape[0]
  axes = []
  for a, n in enumerate(spatial_shape):
    p = coords[..., a].reshape(b, -1, 1)
    lower = jnp.floor(p)
    frac = p - lower
    lower = lower.astype(jnp.int32)
    per_offset = []
    for offset in (0, 1):
      index = lower + offset
      valid = (index >= 0) & (index < n)
      per_offset.append((jnp.clip(index, 0, n - 1), valid, frac if offset else 1.0 - frac))
    axes.append(per_offset)
  for corner in _CORNERS:
    (i0, v0, f0), (i1, v1, f1), (i2, v2, f2) = (axes[a][o] for a, o in enumerate(corner))
    flat = ((i0 * spatial_shape[1] + i1) * spatial_shape[2] + i2)[..., 0]
    valid = (v0 & v1 & v2).astype(jnp.float32) if mode == "constant" else 1.0
    signs = tuple(1.0 if o else -1.0 for o in corner)
    yield flat, valid, (f0, f1, f2), signs


def _gather(volume_flat: jax.Array, flat: jax.Array) -> jax.Array:
  """``(B, N, C)`` rows at ``(B, M)`` indices -> ``(B, M, C)`` (one gather over B*N rows)."""
  b, n, c = volume_flat.shape
  rows = flat + (jnp.arange(b, dtype=flat.dtype) * n)[:, None]
  if c == 1:  # scalar gather: markedly faster than gathering 1-wide rows on CPU
    return volume_flat.reshape(-1)[rows][..., None]
  return volume_flat.reshape(b * n, c)[rows]


def _channel_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """``sum(a * b, axis=-1, keepdims=True)`` for ``(B, M, C)``: XLA:CPU reduces a short minor
  axis inside a gather fusion ~20x slower than this unrolled sum (0.59 vs 0.026 s, C=3, 1M)."""
  c = a.shape[-1]
  if c <= 8:
    return sum(a[..., i:i + 1] * b[..., i:i + 1] for i in range(c))
  return jnp.einsum("bmc,bmc->bm", a, b)[..., None]


def _scatter_add(acc: jax.Array, flat: jax.Array, updates: jax.Array) -> jax.Array:
  """``acc`` ``(B, N, C)`` plus ``updates`` ``(B, M, C)`` added at rows ``flat`` ``(B, M)``."""
  b, n, c = acc.shape
  rows = flat + (jnp.arange(b, dtype=flat.dtype) * n)[:, None]
  return acc.reshape(b * n, c).at[rows].add(updates).reshape(b, n, c)


def _trilinear(image: jax.Array, coords: jax.Array, mode: str) -> jax.Array:
  """:func:`_trilinear_xla`, computed by :func:`vmjax.kernels.trilinear` on the CPU (float32
  images); the XLA computation everywhere else."""
  return kernels.on_cpu(functools.partial(kernels.trilinear, mode=mode),
                        functools.partial(_trilinear_xla, mode=mode), image, coords)


def _warp_trilinear(image: jax.Array, disp: jax.Array, mode: str) -> jax.Array:
  """Trilinear samples of ``image`` at each voxel of ``disp``'s grid plus ``disp``; on the CPU
  (float32 images) :func:`vmjax.kernels.trilinear` with the displacement itself (no grid of
  coordinates in memory), elsewhere :func:`_trilinear_xla` at the coordinates."""
  return kernels.on_cpu(
      functools.partial(kernels.trilinear, mode=mode, relative=True),
      lambda image, disp: _trilinear_xla(image, identity_grid(disp.shape[1:4]) + disp, mode),
      image, disp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _trilinear_xla(image: jax.Array, coords: jax.Array, mode: str) -> jax.Array:
  """Trilinear samples of ``image`` ``(B, D, H, W, C)`` at ``coords`` ``(B, D, H, W, 3)``, f32.

  Same values as ``map_coordinates(order=1)``; a hand-written VJP keeps the coordinate gradient a
  gather (the image's finite differences at the sample points) and leaves the image gradient's
  scatter-add to be pruned by XLA when the image is a constant (the moving scan in training).
  """
  b, c = image.shape[0], image.shape[-1]
  values = image.reshape(b, -1, c).astype(jnp.float32)
  out = 0.0
  for flat, valid, (f0, f1, f2), _ in _corners(coords, image.shape[1:4], mode):
    out = out + (f0 * f1 * f2 * valid) * _gather(values, flat)
  return out.reshape(coords.shape[:4] + (c,))


def _trilinear_fwd(image, coords, mode):
  return _trilinear_xla(image, coords, mode), (image, coords)


def _trilinear_bwd(mode, residuals, g):
  image, coords = residuals
  b, c = image.shape[0], image.shape[-1]
  values = image.reshape(b, -1, c).astype(jnp.float32)
  g = g.reshape(b, -1, c).astype(jnp.float32)
  d_image = jnp.zeros_like(values)
  d_coords = [0.0, 0.0, 0.0]
  for flat, valid, (f0, f1, f2), (s0, s1, s2) in _corners(coords, image.shape[1:4], mode):
    d_image = _scatter_add(d_image, flat, (f0 * f1 * f2 * valid) * g)
    g_dot_v = _channel_dot(g, _gather(values, flat)) * valid  # (B, M, 1)
    # d weight / d coord_a = sign_a * the product of the other two factors.
    d_coords[0] = d_coords[0] + g_dot_v * (s0 * f1 * f2)
    d_coords[1] = d_coords[1] + g_dot_v * (s1 * f0 * f2)
    d_coords[2] = d_coords[2] + g_dot_v * (s2 * f0 * f1)
  d_coords = jnp.concatenate(d_coords, axis=-1)
  return (d_image.reshape(image.shape).astype(image.dtype),
          d_coords.reshape(coords.shape).astype(coords.dtype))


_trilinear_xla.defvjp(_trilinear_fwd, _trilinear_bwd)


def sample(image: jax.Array, coords: jax.Array, mode: str = "constant") -> jax.Array:
  """Trilinear samples of ``image`` ``(B, Di, Hi, Wi, C)`` at voxel coordinates ``coords``
  ``(B, D, H, W, 3)`` -> ``(B, D, H, W, C)`` float32 (``map_coordinates(order=1)``'s values;
  ``mode`` ``"constant"``: 0 outside, or ``"nearest"``). Differentiable in both."""
  if mode not in ("constant", "nearest"):
    raise ValueError(f"sample: mode must be 'constant' or 'nearest', got {mode!r}")
  return _trilinear(image.astype(jnp.float32), coords.astype(jnp.float32), mode)


def warp(image: jax.Array, disp: jax.Array, order: int = 1, mode: str = "constant") -> jax.Array:
  """Warps ``image`` with the displacement ``disp``: ``moved(x) = image(x + disp(x))``.

  Args:
    image: ``(B, D, H, W, C)`` volume (any float dtype; integer label maps with ``order=0``).
    disp: ``(B, D, H, W, 3)`` displacement in voxels. Usually on ``image``'s own grid; a field
      of another spatial shape maps its grid into ``image``'s (``x + disp(x)`` indexes
      ``image``) and the output lies on the field's grid (``vmjax.pipeline``'s fields).
    order: 1 = trilinear (differentiable in ``image`` and ``disp``); 0 = nearest neighbour,
      for label maps: every output value is a value of the input (labels stay labels).
    mode: out-of-volume handling of ``jax.scipy.ndimage.map_coordinates``: ``"constant"``
      (zeros outside; scipy calls it ``"grid-constant"``), ``"nearest"`` (clamp to the edge),
      ``"wrap"``, ``"mirror"``, ``"reflect"``.

  Returns:
    ``(B, D, H, W, C)`` (``disp``'s spatial shape) warped volume with ``image``'s dtype.
  """
  if image.ndim != 5 or disp.ndim != 5 or disp.shape[-1] != 3:
    raise ValueError(f"warp expects image (B, D, H, W, C) and disp (B, D, H, W, 3); got image "
                     f"{tuple(image.shape)} and disp {tuple(disp.shape)}")
  if image.shape[0] != disp.shape[0]:
    raise ValueError(f"warp: image {tuple(image.shape)} and disp {tuple(disp.shape)} differ in "
                     "batch size")
  if order not in (0, 1):
    raise ValueError(f"warp: order must be 0 (nearest) or 1 (trilinear), got {order}")
  if mode not in _MODES:
    raise ValueError(f"warp: mode must be one of {_MODES}, got {mode!r}")
  if order == 1 and mode in ("constant", "nearest") and jnp.issubdtype(image.dtype,
                                                                      jnp.floating):
    return _warp_trilinear(image, disp.astype(jnp.float32), mode).astype(image.dtype)
  coords = identity_grid(disp.shape[1:4]) + disp.astype(jnp.float32)
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
  if kernels.usable(disp):
    # Native squarings unrolled: in a gradient the loop's stacked residuals cost more than the
    # calls (80x96x80, 7 steps with the gradient: 166 ms against 185 ms as a loop, medians of
    # 15 alternated runs; 2-core AMD EPYC Zen 4 with AVX512-BF16, 2026-12-06).
    for _ in range(steps):
      disp = kernels.compose_self(disp)
    return disp
  # A loop, not unrolled: XLA:CPU compiles 7 unrolled compositions into code ~100x slower than
  # 7 runs of the one body (80x96x112 forward: 11.4 s vs 0.07-0.10 s).
  return lax.fori_loop(0, steps, lambda _, disp: _square(disp), disp)


def _square(disp: jax.Array) -> jax.Array:
  """``compose(disp, disp)``; on the CPU one native pass (:func:`vmjax.kernels.compose_self`)."""
  return kernels.on_cpu(kernels.compose_self, lambda u: compose(u, u), disp)


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
  # Scaled first: resizing is linear, and the small grid has fewer vectors to scale.
  disp = disp * jnp.asarray([n / o for n, o in zip(spatial_shape, old)], dtype=disp.dtype)
  resize = functools.partial(_resize_linear, spatial_shape=spatial_shape)
  if spatial_shape == tuple(2 * n for n in old):
    return kernels.on_cpu(kernels.upsample2, resize, disp)
  if all(n % 2 == 0 and n == 2 * m for n, m in zip(old, spatial_shape)):
    return _downsample2(disp)
  return resize(disp)


def _downsample2(x: jax.Array) -> jax.Array:
  """:func:`_resize_linear` to half of even spatial sizes, written out: ``jax.image.resize``'s
  antialiased linear kernel at scale 1/2 weighs input voxels ``2i - 1 .. 2i + 2`` by
  ``(1, 3, 3, 1) / 8``, and ``(3, 3, 1) / 7`` (mirrored at the far end) where a tap falls off the
  edge (each output over the weights of its taps inside). The same values (up to rounding) from
  a few elementwise ops instead of a dense weight matrix per axis, whose construction took
  0.07 s of tracing every program that halves a field (the network's velocity; 2-core AMD EPYC
  Zen 4, 2026-12-06)."""
  for axis in (1, 2, 3):
    n = x.shape[axis]
    pads = [(0, 0)] * x.ndim
    pads[axis] = (1, 1)
    xp = jnp.pad(x, pads)
    pairs = lambda start: lax.slice_in_dim(xp, start, start + n, axis=axis).reshape(
        x.shape[:axis] + (n // 2, 2) + x.shape[axis + 1:])
    a, b = pairs(0), pairs(2)  # (x[2i - 1], x[2i]) and (x[2i + 1], x[2i + 2])
    take = lambda y, k: lax.index_in_dim(y, k, axis=axis + 1, keepdims=False)
    out = (take(a, 0) + 3.0 * take(a, 1) + 3.0 * take(b, 0) + take(b, 1)) / 8.0
    taps = np.arange(n // 2)[:, None] * 2 + np.arange(-1, 3)  # the taps inside count
    edge = 8.0 / (((taps >= 0) & (taps < n)) * np.array([1.0, 3.0, 3.0, 1.0])).sum(axis=1)
    edge = edge.astype(np.float32).reshape((n // 2,) + (1,) * (x.ndim - axis - 1))
    x = out * edge.astype(out.dtype)
  return x


def _resize_linear(x: jax.Array, spatial_shape) -> jax.Array:
  """``jax.image.resize(method="linear")`` of the spatial axes of ``(B, D, H, W, C)``."""
  return jax.image.resize(x, (x.shape[0],) + tuple(spatial_shape) + x.shape[-1:], method="linear")
