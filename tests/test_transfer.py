"""vmjax.transfer: host data onto the device as jnp.asarray puts it, without a program."""

import jax
from jax import monitoring
import jax.numpy as jnp
import numpy as np
import pytest

from vmjax import transfer


def test_to_device_matches_jnp_asarray_and_lowers_no_program():
  lowered = []
  monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: lowered.append(kw.get("fun_name"))
      if event.endswith("jaxpr_to_mlir_module_duration") else None)
  rng = np.random.default_rng(0)
  # Shapes no other test uses: jnp.asarray would lower a program for each.
  host = {"f64": rng.normal(size=(3, 7, 11)), "i64": np.arange(13, dtype=np.int64),
          "f32": rng.normal(size=(5, 1, 9)).astype(np.float32), "flag": np.ones((17,), bool),
          "scalar": 2.5, "none": None}
  before = len(lowered)
  got = transfer.to_device(host)
  assert len(lowered) == before, lowered[before:]
  assert got["none"] is None
  for key in ("f64", "i64", "f32", "flag", "scalar"):
    expected = jnp.asarray(host[key])
    assert isinstance(got[key], jax.Array)
    assert got[key].dtype == expected.dtype and got[key].shape == expected.shape, key
    np.testing.assert_array_equal(got[key], expected)
  as_f32 = transfer.to_device(np.eye(4), np.float32)
  assert as_f32.dtype == jnp.float32
  np.testing.assert_array_equal(as_f32, np.eye(4))


def test_to_device_keeps_jax_arrays():
  x = jnp.arange(4.0)
  assert transfer.to_device(x) is x
  with pytest.raises(TypeError, match="host data"):
    transfer.to_device(x, np.int32)
