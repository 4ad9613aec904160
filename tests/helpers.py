"""Small deterministic inputs shared by the tests."""

import numpy as np


def smooth_field_fn(shape, amplitude, seed=0):
  """An analytic smooth displacement: ``fn(points (..., 3)) -> (..., 3)``, sums of sinusoids."""
  rng = np.random.default_rng(seed)
  terms = [[(rng.uniform(0.5, 1.5, size=3) / np.asarray(shape), rng.uniform(0, 2 * np.pi))
            for _ in range(3)] for _ in range(3)]

  def fn(points):
    points = np.asarray(points, np.float64)
    out = [sum(np.sin(2 * np.pi * points @ freq + phase) for freq, phase in component)
           for component in terms]
    return amplitude * np.stack(out, axis=-1) / 3.0
  return fn


def grid_points(shape):
  """Voxel coordinates ``(D, H, W, 3)`` float64."""
  return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"),
                  -1)


def smooth_field(shape, amplitude, seed=0, batch=1):
  """A smooth random displacement ``(B, D, H, W, 3)`` float32 (see :func:`smooth_field_fn`)."""
  fields = [smooth_field_fn(shape, amplitude, seed + 1000 * b)(grid_points(shape))
            for b in range(batch)]
  return np.stack(fields).astype(np.float32)


def textured_volume(shape, seed=0, batch=1, channels=1):
  """A smooth textured image in [0, 1]: blurred noise, ``(B, D, H, W, C)`` float32."""
  from scipy import ndimage
  rng = np.random.default_rng(seed)
  vol = rng.uniform(size=(batch, *shape, channels))
  vol = ndimage.gaussian_filter(vol, sigma=(0, 1.5, 1.5, 1.5, 0))
  vol = (vol - vol.min()) / (vol.max() - vol.min())
  return vol.astype(np.float32)
