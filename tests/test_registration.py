"""register(): shapes, compile caching, input validation, padding helper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmjax
from vmjax import registration
from helpers import textured_volume

SHAPE = (32, 32, 32)


@pytest.fixture(scope="module")
def model_and_variables():
  model = vmjax.VxmDense()
  return model, vmjax.init_variables(model, jax.random.PRNGKey(0), SHAPE)


def test_register_shapes_and_no_recompile(model_and_variables):
  model, variables = model_and_variables
  moving = jnp.asarray(textured_volume(SHAPE, seed=1))
  fixed = jnp.asarray(textured_volume(SHAPE, seed=2))
  before = registration._register._cache_size()
  moved, disp = vmjax.register(model, variables, moving, fixed)
  assert moved.shape == (1, *SHAPE, 1) and disp.shape == (1, *SHAPE, 3)
  after_first = registration._register._cache_size()
  vmjax.register(model, variables, fixed, moving)  # new values, same shapes
  assert registration._register._cache_size() == after_first == before + 1
  # An untrained network predicts a near-zero field: moved ~ moving.
  np.testing.assert_allclose(moved, moving, atol=1e-3)


def test_register_matches_apply_then_warp(model_and_variables):
  model, variables = model_and_variables
  moving = jnp.asarray(textured_volume(SHAPE, seed=3))
  fixed = jnp.asarray(textured_volume(SHAPE, seed=4))
  variables = jax.tree_util.tree_map(lambda p: p, variables)
  variables["params"]["flow"]["kernel"] = variables["params"]["flow"]["kernel"] * 1e5
  moved, disp = vmjax.register(model, variables, moving, fixed)
  want_disp = model.apply(variables, moving, fixed)
  np.testing.assert_allclose(disp, want_disp, atol=1e-5)
  np.testing.assert_allclose(moved, vmjax.warp(moving, want_disp), atol=1e-5)


@pytest.mark.parametrize("moving_shape,fixed_shape,message", [
    ((32, 32, 32), (32, 32, 32), "rank 5"),
    ((1, 32, 32, 32, 1), (1, 32, 32, 16, 1), "does not match `fixed`"),
    ((1, 32, 40, 32, 1), (1, 32, 40, 32, 1), r"axis 1 \(size 40\).*\(32, 48, 32\)"),
])
def test_register_rejects_bad_shapes(model_and_variables, moving_shape, fixed_shape, message):
  model, variables = model_and_variables
  with pytest.raises(ValueError, match=message):
    vmjax.register(model, variables, jnp.zeros(moving_shape), jnp.zeros(fixed_shape))


def test_register_rejects_nan(model_and_variables):
  model, variables = model_and_variables
  fixed = np.zeros((1, *SHAPE, 1), np.float32)
  fixed[0, 3, 4, 5, 0] = np.nan
  with pytest.raises(ValueError, match="`fixed` contains NaN"):
    vmjax.register(model, variables, jnp.zeros_like(fixed), jnp.asarray(fixed))


def test_pad_to_multiple_then_crop_round_trips():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 17, 32, 33, 1)), jnp.float32)
  padded, shape = vmjax.pad_to_multiple(x, 16)
  assert padded.shape == (1, 32, 32, 48, 1) and shape == (17, 32, 33)
  np.testing.assert_array_equal(padded[:, :17, :32, :33], x)
  assert float(jnp.abs(padded).sum() - jnp.abs(x).sum()) == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("batch, inverse", [(1, False), (2, True)])
def test_refined_fields_and_their_losses_come_from_one_program(batch, inverse):
  """The refined velocity's fields and each pair's loss at it (one program sharing the
  integration) are the model's fields and the per-pair losses computed apart."""
  import ml_collections
  model = vmjax.VxmDense(enc_features=(4, 4), dec_features=(4, 4, 4), int_steps=4)
  loss_cfg = ml_collections.FrozenConfigDict({"image": "ncc", "window": 5, "lam": 0.3,
                                              "bidir": False, "seg_weight": 0.0})
  rng = np.random.default_rng(6)
  shape = (batch, 16, 12, 8)
  velocity = jnp.asarray(rng.normal(scale=0.8, size=(batch, 8, 6, 4, 3)), jnp.float32)
  moving, fixed = (jnp.asarray(rng.uniform(size=shape + (1,)), jnp.float32) for _ in range(2))
  fields, per_pair = registration._fields_and_losses(model, loss_cfg, inverse, velocity, moving,
                                                     fixed)
  expected = model.fields_from_velocity(velocity, shape[1:], bidir=inverse)
  assert set(fields) == set(expected)
  for key in expected:
    np.testing.assert_allclose(fields[key], expected[key], atol=1e-6)
  alone = [registration._field_loss(model, loss_cfg, velocity[i:i + 1], moving[i:i + 1],
                                    fixed[i:i + 1]) for i in range(batch)]
  np.testing.assert_allclose(per_pair, alone, rtol=1e-5)
