"""On-the-fly data augmentation as pure, jittable functions of an explicit PRNG key.

Spatial: random smooth diffeomorphic deformations (a coarse random velocity, upsampled and
integrated), applied to an image and its labels alike. Intensity: gamma, smooth multiplicative
bias field, Gaussian noise. Same key, same output: augmentation is deterministic given the seed.
:func:`synthetic_pairs` makes held-out validation/evaluation pairs the same way.
Shapes are channels-last: images ``(B, D, H, W, C)``, label maps ``(B, D, H, W, 1)`` int.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vmjax import transforms
from vmjax.io import Volume


def _smooth_noise(rng: jax.Array, batch: int, spatial_shape, spacing: float,
                  channels: int) -> jax.Array:
  """Unit-variance Gaussian noise on a grid every ``spacing`` voxels, trilinearly upsampled."""
  coarse = tuple(max(2, round(n / spacing) + 1) for n in spatial_shape)
  noise = jax.random.normal(rng, (batch, *coarse, channels), jnp.float32)
  return jax.image.resize(noise, (batch, *spatial_shape, channels), method="linear")


def random_displacement(rng: jax.Array, batch: int, spatial_shape, std: float,
                        spacing: float = 16.0, int_steps: int = 5) -> jax.Array:
  """A random smooth invertible displacement ``(B, D, H, W, 3)``.

  A stationary velocity with control points every ``spacing`` voxels, ~N(0, std²) voxels each,
  integrated by scaling and squaring so the deformation does not fold.
  """
  velocity = std * _smooth_noise(rng, batch, spatial_shape, spacing, 3)
  return transforms.integrate_velocity(velocity, int_steps)


def deform(image: jax.Array, disp: jax.Array, seg: jax.Array | None = None):
  """Warps an image (trilinear) and optionally its labels (nearest), edge values outside."""
  moved = transforms.warp(image, disp, order=1, mode="nearest")
  if seg is None:
    return moved, None
  return moved, transforms.warp(seg, disp, order=0, mode="nearest")


def random_intensity(rng: jax.Array, image: jax.Array, gamma_std: float = 0.0,
                     bias_std: float = 0.0, bias_spacing: float = 32.0,
                     noise_std: float = 0.0) -> jax.Array:
  """Random gamma ``x ** exp(N(0, gamma_std²))``, bias ``x * exp(smooth N(0, bias_std²))``,
  additive noise ``N(0, noise_std²)``; input assumed non-negative (e.g. in [0, 1])."""
  batch = image.shape[0]
  k_gamma, k_bias, k_noise = jax.random.split(rng, 3)
  x = jnp.maximum(image.astype(jnp.float32), 0.0)
  if gamma_std > 0:
    gamma = jnp.exp(gamma_std * jax.random.normal(k_gamma, (batch, 1, 1, 1, 1)))
    x = jnp.power(x + 1e-6, gamma)
  if bias_std > 0:
    x = x * jnp.exp(bias_std * _smooth_noise(k_bias, batch, x.shape[1:4], bias_spacing, 1))
  if noise_std > 0:
    x = x + noise_std * jax.random.normal(k_noise, x.shape)
  return x


def augment_volume(rng: jax.Array, image: jax.Array, seg: jax.Array | None, cfg):
  """Applies the augmentation described by ``cfg`` (fields as in ``configs/default.py``'s
  ``augment``: ``deform_std``, ``deform_spacing``, ``gamma_std``, ``bias_std``, ``noise_std``)."""
  k_space, k_intensity = jax.random.split(rng)
  if cfg.deform_std > 0:
    disp = random_displacement(k_space, image.shape[0], image.shape[1:4], cfg.deform_std,
                               cfg.deform_spacing)
    image, seg = deform(image, disp, seg)
  image = random_intensity(k_intensity, image, cfg.gamma_std, cfg.bias_std,
                           noise_std=cfg.noise_std)
  return image, seg


def synthetic_pairs(fixed: Volume, count: int, seed: int, aug_cfg) -> list:
  """``count`` held-out pairs ``(augmented copy of fixed, fixed)`` from a separate seed."""
  fn = jax.jit(lambda key, image, seg: augment_volume(key, image, seg, aug_cfg))
  image = jnp.asarray(fixed.image)[None, ..., None]
  seg = None if fixed.seg is None else jnp.asarray(fixed.seg)[None, ..., None]
  pairs = []
  for key in jax.random.split(jax.random.PRNGKey(seed), count):
    moved, moved_seg = fn(key, image, seg)
    moving = dataclasses.replace(
        fixed, image=np.asarray(moved[0, ..., 0]),
        seg=None if moved_seg is None else np.asarray(moved_seg[0, ..., 0]),
        path=f"{fixed.path} (synthetic, seed {seed})")
    pairs.append((moving, fixed))
  return pairs
