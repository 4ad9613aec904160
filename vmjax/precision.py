"""The dtype policy: what the network's convolutions compute in.

float32 or bfloat16 (Flax's convention: parameters stay float32; the field, its integration,
the warp and the losses are float32 whatever the network's dtype). The command lines register in
bf16 where it is fast (a GPU/TPU, or a CPU with AMX / AVX512-BF16 on the oneDNN path) and in
f32 elsewhere; training uses ``config.model.dtype``.
"""

from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp

from vmjax import checks
from vmjax import conv
from vmjax.native import build

DTYPES = ("float32", "bfloat16")
DTYPE_HELP = ("Convolutions' dtype; default: bfloat16 where it is fast (GPU/TPU, or a CPU with "
              "AMX / AVX512-BF16 on the oneDNN path), else float32 (docs/performance.md).")


def registration_dtype() -> str:
  """What the command lines register in unless told: ``"bfloat16"`` where it is fast (a
  GPU/TPU, or a CPU with AMX / AVX512-BF16 under the oneDNN path), else ``"float32"``. On the
  OASIS-TRT-20 pairs bf16 moved the shipped model's Dice by 0.0003 or less, folding unchanged
  (docs/performance.md), against 1.6-2.2x less time on an AVX512-BF16 CPU."""
  if jax.default_backend() != "cpu":
    return "bfloat16"
  return "bfloat16" if build.bf16_isa() and conv.onednn_available() else "float32"


def for_registration(model, name: str | None):
  """``model`` in ``name`` (a command line's ``--dtype``), or in :func:`registration_dtype`
  when None; says which in the log."""
  name = name or registration_dtype()
  logging.info("vmjax network computes in %s", name)
  return with_dtype(model, name)


def with_dtype(model, name: str | None):
  """``model`` (a :class:`vmjax.networks.VxmDense`) computing in ``name`` (``--dtype`` of the
  command lines; None: unchanged). The parameters are the same f32 ones either way."""
  return model if not name else model.clone(dtype=compute_dtype(name))


def compute_dtype(name) -> jnp.dtype:
  """``"float32"`` / ``"bfloat16"`` (``config.model.dtype``, ``--dtype``) as a dtype."""
  if str(jnp.dtype(name) if not isinstance(name, str) else name) not in DTYPES:
    raise checks.DataError(f"model dtype must be one of {DTYPES} (config.model.dtype, "
                           f"--dtype), got {name!r}")
  return jnp.dtype(name)
