"""Input validation with one clear error per problem (names the argument and what would work)."""

from __future__ import annotations

import numpy as np
import jax


class DataError(ValueError):
  """Bad input data or data settings; the message names the file or setting and the problem."""


def divisible_shape(spatial_shape, multiple: int) -> tuple[int, ...]:
  """The smallest shape >= ``spatial_shape`` whose every size is a multiple of ``multiple``."""
  return tuple(-(-int(n) // multiple) * multiple for n in spatial_shape)


def check_volume(x, name: str, levels: int | None = None, check_finite: bool = True) -> None:
  """Raises ``ValueError`` unless ``x`` is a ``(B, D, H, W, C)`` volume fit for the network.

  Args:
    x: the array.
    name: the argument's name, used in the message.
    levels: if given, every spatial size must be divisible by ``2**levels``.
    check_finite: also reject NaN/Inf (skipped for traced values inside ``jit``).
  """
  shape = tuple(x.shape)
  if len(shape) != 5:
    raise ValueError(f"`{name}` must have rank 5 (B, D, H, W, C), got shape {shape} "
                     f"(rank {len(shape)}); add batch/channel axes, e.g. x[None, ..., None]")
  if levels is not None:
    multiple = 2 ** levels
    for axis, n in enumerate(shape[1:4]):
      if n % multiple:
        good = divisible_shape(shape[1:4], multiple)
        raise ValueError(
            f"`{name}` spatial shape {shape[1:4]} is not divisible by 2**{levels}={multiple} "
            f"along spatial axis {axis} (size {n}); pad or crop to e.g. {good} "
            "(vmjax.pad_to_multiple does this)")
  if check_finite and not isinstance(x, jax.core.Tracer):
    if not bool(np.isfinite(np.asarray(x)).all()):
      raise ValueError(f"`{name}` contains NaN or Inf values")


def check_pair(moving, fixed, levels: int | None = None, check_finite: bool = True) -> None:
  """Validates a moving/fixed pair: each a valid volume, and both of the same shape."""
  check_volume(moving, "moving", check_finite=False)
  check_volume(fixed, "fixed", check_finite=False)
  if tuple(moving.shape) != tuple(fixed.shape):
    raise ValueError(f"`moving` shape {tuple(moving.shape)} does not match `fixed` shape "
                     f"{tuple(fixed.shape)}")
  check_volume(moving, "moving", levels, check_finite)
  check_volume(fixed, "fixed", levels, check_finite)
