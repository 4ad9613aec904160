"""Small deterministic inputs shared by the tests."""

import numpy as np

SHAPE = (16, 16, 16)


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


def tiny_config(data_dir=None, **overrides):
  from vmjax.configs import default
  config = default.get_config()
  config.model.enc_features = (4, 8)
  config.model.dec_features = (8, 8, 4)
  config.loss.window = 5
  config.optimizer.learning_rate = 1e-3
  config.log_every = 1
  config.eval_every = 2
  config.checkpoint_every = 2
  if data_dir is not None:
    config.data.train = str(data_dir / "train")
    config.data.atlas = str(data_dir / "atlas.npz")
    config.data.val = str(data_dir / "val")
    config.data.normalize = "none"
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


def write_subjects(root, count=5, shape=SHAPE):
  """Small labelled npz subjects: deformed copies of one textured volume."""
  import jax.numpy as jnp
  import vmjax
  base = textured_volume(shape, seed=0)[0, ..., 0]
  seg = (base > 0.5).astype(np.int32) + (base > 0.7).astype(np.int32)
  (root / "train").mkdir(parents=True)
  (root / "val").mkdir()
  np.savez(root / "atlas.npz", vol=base, seg=seg)
  for i in range(count):
    disp = jnp.asarray(smooth_field(shape, amplitude=1.5, seed=100 + i))
    vol = np.asarray(vmjax.warp(jnp.asarray(base)[None, ..., None], disp, mode="nearest"))
    lab = np.asarray(vmjax.warp(jnp.asarray(seg)[None, ..., None], disp, order=0,
                                mode="nearest"))
    folder = "val" if i == count - 1 else "train"
    np.savez(root / folder / f"subject_{i}.npz", vol=vol[0, ..., 0], seg=lab[0, ..., 0])
  return root
