"""Affine registration in world coordinates: rigid, then affine (12 degrees of freedom),
coarse to fine, as jitted JAX optimisations.

Each scan keeps its own voxel grid (any orientation: RAS, ASL, LIA...; any spacing and size)
and its 4x4 voxel-to-world matrix (NIfTI/MGH affine, millimetres). The result is a 4x4
world-space matrix ``A`` in the ITK/ANTs sense: it maps a point of the fixed scan's world
(mm) to the moving scan's world, so ``moved(x) = moving(V_m^-1 · A · V_f · x)`` for a fixed voxel
``x`` (``V`` the voxel-to-world matrices).

Method: both images are normalised (99.5th percentile of the non-zero voxels) and
block-averaged to about ``spacing`` mm per level; ``A`` starts from the translation that aligns
the centres of mass in world space; at each level Adam minimises ``-NCC`` (global normalised
cross-correlation, fit for T1 against T1 across scanners) of the fixed image and the moving
image resampled (trilinear) at the transformed fixed voxels, first over rotation +
translation, then over all 12 parameters (rotation, translation, log-scales, shears, about the
fixed centre of mass). One ``jax.jit`` per level shape: the loop is a ``lax.fori_loop``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from vmjax import data
from vmjax import kernels
from vmjax import registration
from vmjax import transfer
from vmjax import transforms
from vmjax.io import Volume

# Parameters: rotation vector (rad), translation (units of TRANSLATION_SCALE mm), log-scales,
# shears (upper triangle). Adam moves each by about the learning rate per step.
TRANSLATION_SCALE = 10.0
RIGID = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0], np.float32)
AFFINE = np.ones(12, np.float32)


# Constant tensors that build the matrices below in one contraction each: the cross-product
# matrix [r]_x = _CROSS @ r, and the upper-triangular shears from params[9:12]. Tracing the
# same matrices element by element (indexing, .at[].set) took ~40 ms per use, and each level's
# program uses them three times (2-core AMD EPYC Zen 4, 2026-12-06).
_CROSS = np.zeros((3, 3, 3), np.float32)
for _i, _j, _k in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
  _CROSS[_i, _j, _k], _CROSS[_j, _i, _k] = -1.0, 1.0
_SHEAR = np.zeros((3, 3, 3), np.float32)
_SHEAR[0, 1, 0] = _SHEAR[0, 2, 1] = _SHEAR[1, 2, 2] = 1.0
_LAST_ROW = np.array([[0.0, 0.0, 0.0, 1.0]], np.float32)


def _rotation(rotvec: jax.Array) -> jax.Array:
  """Rodrigues: the 3x3 rotation of a rotation vector (stable at 0)."""
  theta2 = jnp.sum(rotvec * rotvec)
  large = theta2 > 1e-6
  safe2 = jnp.where(large, theta2, 1.0)  # no 0/0 in the branch not taken (nor its gradient)
  theta = jnp.sqrt(safe2)
  k = _CROSS @ rotvec
  a = jnp.where(large, jnp.sin(theta) / theta, 1.0 - theta2 / 6.0)
  b = jnp.where(large, (1.0 - jnp.cos(theta)) / safe2, 0.5 - theta2 / 24.0)
  return np.eye(3, dtype=np.float32) + a * k + b * (k @ k)


def params_to_matrix(params: jax.Array, centre: jax.Array, init: jax.Array) -> jax.Array:
  """The 4x4 world matrix ``init · C · [R K | t] · C^-1`` of 12 parameters about ``centre``
  (``C`` the translation to it; ``R`` rotation, ``K`` = shears · diag(exp(log-scales)))."""
  rot = _rotation(params[0:3])
  translation = params[3:6] * TRANSLATION_SCALE
  shear = np.eye(3, dtype=np.float32) + _SHEAR @ params[9:12]
  linear = (rot @ shear) * jnp.exp(params[6:9])  # columns scaled: @ diag(exp(log-scales))
  offset = centre + translation - linear @ centre
  local = jnp.concatenate([jnp.concatenate([linear, offset[:, None]], axis=1), _LAST_ROW])
  return init @ local


def _ncc(a: jax.Array, b: jax.Array) -> jax.Array:
  a = a - a.mean()
  b = b - b.mean()
  return jnp.sum(a * b) / jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b) + 1e-8)


def resample(image: jax.Array, voxel_to_voxel: jax.Array, shape) -> jax.Array:
  """``image`` sampled (trilinear, 0 outside) at ``voxel_to_voxel · x`` for every voxel ``x``
  of a grid of ``shape``: ``(D, H, W)`` -> ``shape``."""
  coords = transforms.apply_affine(voxel_to_voxel, transforms.identity_grid(shape))
  return transforms.sample(image[None, ..., None], coords[None], mode="constant")[0, ..., 0]


def image_loss(fixed: jax.Array, moving: jax.Array, voxel_to_voxel: jax.Array) -> jax.Array:
  """``-NCC`` of ``fixed`` and ``moving`` :func:`resample`-d at ``voxel_to_voxel`` (4x4) of each
  fixed voxel: the affine step's loss. On the CPU one native call for its value and its
  gradient (:func:`vmjax.kernels.affine_ncc`)."""
  return kernels.on_cpu(lambda f, m, a: kernels.affine_ncc(f, m, a[:3]),
                        lambda f, m, a: -_ncc(f, resample(m, a, f.shape)),
                        fixed, moving, voxel_to_voxel)


def _cosine_rate(learning_rate, steps, alpha: float = 0.05):
  """``optax.cosine_decay_schedule(learning_rate, steps, alpha)`` for a traced ``steps`` (one
  compiled program serves every step count)."""
  def rate(count):
    progress = jnp.minimum(count, steps) / steps
    return learning_rate * ((1.0 - alpha) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)) + alpha)
  return rate


@jax.jit
def _optimise(params, mask, fixed, moving, fixed_v2w, moving_w2v, centre, init, learning_rate,
              steps):
  """``steps`` Adam steps (cosine-decayed rate) on ``-NCC`` over the parameters in ``mask``;
  ``steps`` and ``mask`` are traced, so the rigid and the affine stage of a level share one
  program. Returns the parameters, their loss and their 4x4 world matrix."""
  tx = optax.adam(_cosine_rate(learning_rate, steps))

  def loss(p):
    return image_loss(fixed, moving, moving_w2v @ params_to_matrix(p, centre, init) @ fixed_v2w)

  def body(_, carry):
    p, opt_state = carry
    grads = jax.grad(loss)(p) * mask
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  params, _ = lax.fori_loop(0, steps, body, (params, tx.init(params)))
  return params, loss(params), params_to_matrix(params, centre, init)


def _level(volume: Volume, spacing: float) -> tuple[np.ndarray, np.ndarray]:
  """The image block-averaged to about ``spacing`` mm per voxel (per axis) and its affine."""
  sizes = np.linalg.norm(volume.affine[:3, :3], axis=0)
  factors = [max(1, int(round(spacing / s))) for s in sizes]
  shape = [n // f * f for n, f in zip(volume.image.shape, factors)]
  image = np.asarray(volume.image[:shape[0], :shape[1], :shape[2]], np.float32)
  # Summed a slice at a time along each axis, outermost in memory first (whole contiguous
  # rows, C or Fortran order alike): a reshaped mean over axes (1, 3, 5) took 85 ms of a
  # 256x256x160 scan's two levels, this 13 ms.
  for axis in sorted(range(3), key=lambda a: -abs(image.strides[a])):
    factor = factors[axis]
    if factor > 1:
      take = lambda k: image[(slice(None),) * axis + (slice(k, None, factor),)]
      total = take(0).copy(order="K")
      for k in range(1, factor):
        total += take(k)
      image = total
  scale = np.diag([*factors, 1.0]).astype(np.float64)
  scale[:3, 3] = (np.asarray(factors) - 1) / 2.0  # block centres
  return image / np.float32(np.prod(factors)), volume.affine @ scale


def centre_of_mass(volume: Volume) -> np.ndarray:
  """World coordinates (mm) of the intensity centre of mass (non-negative part)."""
  weights = np.maximum(volume.image, 0)
  plane = weights.sum(axis=2, dtype=np.float64)  # (D, H), float64 sums
  marginals = [plane.sum(axis=1), plane.sum(axis=0),
               weights.sum(axis=(0, 1), dtype=np.float64)]
  total = marginals[0].sum()
  voxel = [float(m @ np.arange(len(m), dtype=np.float64) / total) for m in marginals]
  return (volume.affine @ np.array([*voxel, 1.0]))[:3]


def affine_register(moving: Volume, fixed: Volume, spacings: Sequence[float] = (6.0, 3.0),
                    rigid_steps: int = 100, affine_steps: int = 150,
                    learning_rate: float = 0.02, init: np.ndarray | None = None) -> np.ndarray:
  """Rigid then affine registration of ``moving`` to ``fixed`` in world coordinates.

  Args:
    moving, fixed: scans with their voxel-to-world affines (any orientation and spacing).
    spacings: the resolution of each level in mm, coarse to fine.
    rigid_steps, affine_steps: Adam steps per level of each stage.
    learning_rate: Adam's step size (radians, log-scale units, 10 mm) at the start of a stage.
    init: an initial 4x4 fixed-world -> moving-world matrix (default: align the centres of mass).

  Returns:
    ``A`` (4x4 float64): fixed world (mm) -> moving world (mm).
  """
  moving = data.prepare(moving, "foreground")
  fixed = data.prepare(fixed, "foreground")
  centre = centre_of_mass(fixed)
  if init is None:
    init = np.eye(4)
    init[:3, 3] = centre_of_mass(moving) - centre
  params = transfer.to_device(np.zeros(12, np.float32))
  args = transfer.to_device(dict(centre=centre, init=init), np.float32)
  matrix = params_to_matrix(params, args["centre"], args["init"]) if not spacings else None
  for spacing in spacings:
    f_image, f_affine = _level(fixed, spacing)
    m_image, m_affine = _level(moving, spacing)
    level = dict(**transfer.to_device(dict(fixed=f_image, moving=m_image, fixed_v2w=f_affine,
                                           moving_w2v=np.linalg.inv(m_affine)), np.float32),
                 **args)
    for mask, steps in ((RIGID, rigid_steps), (AFFINE, affine_steps)):
      params, _, matrix = _optimise(params, transfer.to_device(mask),
                                    learning_rate=learning_rate,
                                    steps=transfer.to_device(int(steps), np.int32), **level)
  return np.asarray(matrix, np.float64)


@functools.partial(jax.jit, static_argnums=0)
def _affine_displacement(shape, voxel_to_voxel: jax.Array) -> jax.Array:
  """``voxel_to_voxel · x - x`` for every voxel ``x`` of a grid of ``shape``, ``(D, H, W, 3)``."""
  grid = transforms.identity_grid(shape)
  return transforms.apply_affine(voxel_to_voxel, grid) - grid


def resample_volume(moving: Volume, world: np.ndarray, grid_affine: np.ndarray, shape,
                    path: str | None = None) -> Volume:
  """``moving`` (image trilinear, labels nearest) on the grid ``(grid_affine, shape)``, through
  the world matrix ``world`` (grid world -> moving world)."""
  v2v = transfer.to_device(np.linalg.inv(moving.affine) @ world @ grid_affine, np.float32)
  out = registration.warp_volume(moving, _affine_displacement(tuple(int(n) for n in shape), v2v))
  return Volume(image=np.asarray(out["moved"]),
                seg=None if moving.seg is None else np.asarray(out["moved_seg"]),
                affine=np.asarray(grid_affine, np.float64), path=path or moving.path, header=None)
