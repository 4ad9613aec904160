"""The VoxelMorph U-Net: parameter counts, shapes, initialisation, diffeomorphic mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmjax


def conv_params(cin, cout):
  return 27 * cin * cout + cout


def expected_params(enc, dec, in_channels=2):
  """Parameter count derived by hand from the architecture description (not from the code)."""
  total, prev = 0, in_channels
  enc_out = []
  for f in enc:
    total += conv_params(prev, f)
    prev = f
    enc_out.append(f)
  skips = [in_channels] + enc_out[:-1]
  for f in dec[:len(enc)]:
    total += conv_params(prev, f)
    prev = f + skips.pop()
  for f in dec[len(enc):]:
    total += conv_params(prev, f)
    prev = f
  return total + conv_params(prev, 3)


def test_vm2_has_the_official_parameter_count():
  model = vmjax.VxmDense()
  variables = vmjax.init_variables(model, jax.random.PRNGKey(0), (32, 32, 32))
  assert vmjax.count_params(variables["params"]) == 301_411
  assert expected_params(*vmjax.VM2_FEATURES) == 301_411


def test_vm1_parameter_count_and_preset():
  model = vmjax.vxm_dense("vm1")
  variables = vmjax.init_variables(model, jax.random.PRNGKey(0), (16, 16, 16))
  assert vmjax.count_params(variables["params"]) == expected_params(*vmjax.VM1_FEATURES)
  with pytest.raises(ValueError, match="variant"):
    vmjax.vxm_dense("vm3")


def test_flow_layer_initialised_near_zero():
  variables = vmjax.init_variables(vmjax.VxmDense(), jax.random.PRNGKey(1), (32, 32, 32))
  kernel = np.asarray(variables["params"]["flow"]["kernel"])
  assert kernel.shape == (3, 3, 3, 16, 3)
  assert 0.5e-5 < kernel.std() < 2e-5
  np.testing.assert_array_equal(variables["params"]["flow"]["bias"], 0.0)


@pytest.mark.parametrize("int_steps", [0, 5])
def test_output_shape_and_multichannel_input(int_steps):
  model = vmjax.VxmDense(enc_features=(8, 8), dec_features=(8, 8, 4), int_steps=int_steps)
  x = jnp.ones((2, 8, 12, 16, 2))
  variables = model.init(jax.random.PRNGKey(0), x, x)
  disp = model.apply(variables, x, x)
  assert disp.shape == (2, 8, 12, 16, 3)
  disp, inverse = model.apply(variables, x, x, bidir=True)
  assert inverse.shape == disp.shape


def test_diffeomorphic_mode_integrates_the_predicted_velocity():
  # The network's raw output is its velocity; check the module integrates exactly that.
  model = vmjax.VxmDense(enc_features=(8, 8), dec_features=(8, 8, 4), int_steps=4,
                         int_downsize=1)
  plain = model.clone(int_steps=0)
  rng = np.random.default_rng(0)
  moving, fixed = (jnp.asarray(rng.uniform(size=(1, 16, 16, 16, 1)), jnp.float32)
                   for _ in range(2))
  variables = model.init(jax.random.PRNGKey(0), moving, fixed)
  # Larger flow weights so the integration is not trivially the identity.
  variables = jax.tree_util.tree_map(lambda p: p, variables)
  variables["params"]["flow"]["kernel"] = variables["params"]["flow"]["kernel"] * 3e4
  velocity = plain.apply(variables, moving, fixed)
  assert float(jnp.abs(velocity).max()) > 0.1
  np.testing.assert_allclose(model.apply(variables, moving, fixed),
                             vmjax.integrate_velocity(velocity, 4), atol=1e-5)


def test_network_rejects_indivisible_shape():
  model = vmjax.VxmDense()
  x = jnp.zeros((1, 32, 30, 32, 1))
  with pytest.raises(ValueError, match="divisible by 2\\*\\*4=16"):
    model.init(jax.random.PRNGKey(0), x, x)
