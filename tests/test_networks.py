"""The VoxelMorph U-Net: parameter counts, shapes, initialisation, diffeomorphic mode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmjax
from vmjax import checks
from vmjax import losses
from vmjax import networks
from vmjax import precision


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


def param_shapes(model, spatial_shape):
  """The parameters' shapes (``jax.eval_shape`` of ``init_variables``: nothing compiled or run)."""
  return jax.eval_shape(lambda: vmjax.init_variables(model, jax.random.PRNGKey(0),
                                                     spatial_shape))["params"]


def test_vm2_has_the_official_parameter_count():
  assert vmjax.count_params(param_shapes(vmjax.VxmDense(), (32, 32, 32))) == 301_411
  assert expected_params(*vmjax.VM2_FEATURES) == 301_411


def test_vm1_parameter_count_and_preset():
  params = param_shapes(vmjax.vxm_dense("vm1"), (16, 16, 16))
  assert vmjax.count_params(params) == expected_params(*vmjax.VM1_FEATURES)
  with pytest.raises(ValueError, match="variant"):
    vmjax.vxm_dense("vm3")


def test_flow_layer_initialised_near_zero():
  # VM-2's last decoder width (16) on a small U-Net: the flow layer's init is its own.
  model = vmjax.VxmDense(enc_features=(4, 8), dec_features=(8, 8, 16))
  variables = vmjax.init_variables(model, jax.random.PRNGKey(1), (8, 8, 8))
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


def test_conv_block_equals_flax_conv():
  """ConvBlock has nn.Conv's parameters (same names, shapes, init) and computes the same
  convolution (+ LeakyReLU 0.2), with stride 1 and 2."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 10, 12, 3)), jnp.float32)
  for stride in (1, 2):
    ref = nn.Conv(5, (3, 3, 3), strides=(stride,) * 3, padding=((1, 1),) * 3)
    block = networks.ConvBlock(5, stride=stride)
    key = jax.random.PRNGKey(stride)
    ref_vars, vars_ = ref.init(key, x), block.init(key, x)
    assert jax.tree_util.tree_structure(ref_vars) == jax.tree_util.tree_structure(vars_)
    for a, b in zip(jax.tree_util.tree_leaves(ref_vars), jax.tree_util.tree_leaves(vars_)):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(block.apply(vars_, x),
                               nn.leaky_relu(ref.apply(ref_vars, x), 0.2), rtol=1e-5, atol=1e-5)


def test_weights_of_another_configuration_are_one_clear_error():
  """Applying a model to parameters of the wrong shape names the parameter, its block and both
  shapes (the check flax makes by tracing the initialiser, made directly); the right shapes
  apply without it."""
  model = vmjax.VxmDense(enc_features=(4, 4), dec_features=(4, 4, 4))
  x = jnp.zeros((1, 8, 8, 8, 1))
  variables = model.init(jax.random.PRNGKey(0), x, x)
  assert model.apply(variables, x, x).shape == (1, 8, 8, 8, 3)
  wide = vmjax.VxmDense(enc_features=(4, 6), dec_features=(4, 4, 4))
  with pytest.raises(ValueError, match=r"'kernel' of unet/enc_1 has shape \(3, 3, 3, 4, 4\) "
                     r"but the model's configuration needs \(3, 3, 3, 4, 6\)"):
    wide.apply(variables, x, x)


@pytest.mark.slow
def test_remat_changes_memory_not_results():
  """model.remat recomputes conv blocks in the backward pass: same loss and gradients."""
  shape = (16, 16, 16)
  rng = np.random.default_rng(1)
  moving = jnp.asarray(rng.random((1, *shape, 1)), jnp.float32)
  fixed = jnp.asarray(rng.random((1, *shape, 1)), jnp.float32)
  plain, remat = vmjax.vxm_dense("vm2"), vmjax.vxm_dense("vm2", remat=True)
  variables = vmjax.init_variables(plain, jax.random.PRNGKey(0), shape)

  def loss(model, variables):
    disp = model.apply(variables, moving, fixed)
    return losses.ncc_loss(fixed, vmjax.warp(moving, disp)) + losses.grad_loss(disp)

  value, grads = jax.jit(jax.value_and_grad(lambda v: loss(plain, v)))(variables)
  value_r, grads_r = jax.jit(jax.value_and_grad(lambda v: loss(remat, v)))(variables)
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grads_r), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)
  # remat is in the traced program (whether a compiler keeps the recomputation is its call:
  # XLA:GPU does, XLA:CPU merges it back; see vmjax.blocks.conv_block).
  assert "remat" in str(jax.make_jaxpr(lambda v: loss(remat, v))(variables))
  assert "remat" not in str(jax.make_jaxpr(lambda v: loss(plain, v))(variables))


@pytest.mark.slow
def test_bfloat16_computes_in_bf16_with_f32_parameters_and_field():
  """Flax's convention: ``dtype`` is the U-Net's computation, parameters stay f32 (the same
  tree as the f32 model's), the field is f32 and close to the f32 model's; gradients are f32."""
  shape = (16, 16, 16)
  rng = np.random.default_rng(2)
  moving = jnp.asarray(rng.random((1, *shape, 1)), jnp.float32)
  fixed = jnp.asarray(rng.random((1, *shape, 1)), jnp.float32)
  f32 = vmjax.vxm_dense("vm2", int_steps=5)
  bf16 = precision.with_dtype(f32, "bfloat16")
  assert bf16.dtype == jnp.bfloat16 and precision.with_dtype(f32, None) is f32
  variables = vmjax.init_variables(f32, jax.random.PRNGKey(0), shape)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      vmjax.init_variables(bf16, jax.random.PRNGKey(0), shape))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  # A flow layer large enough that the field is far from zero.
  variables = jax.tree_util.tree_map(lambda p: p * 3e4 if p.ndim == 5 and p.shape[-1] == 3
                                     else p, variables)
  ref, out = (jax.jit(m.apply)(variables, moving, fixed) for m in (f32, bf16))
  assert out.dtype == jnp.float32 and float(jnp.max(jnp.abs(ref))) > 0.3
  # bf16 keeps 8 bits of mantissa in the features: a few per cent of the field's size.
  assert float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
  # In the traced program the U-Net's convolutions are bf16 and the last one f32.
  jaxpr = str(jax.make_jaxpr(bf16.apply)(variables, moving, fixed))
  assert "bf16[1,8,8,8,16]" in jaxpr

  def loss(model, v):
    disp = model.apply(v, moving, fixed)
    return losses.ncc_loss(fixed, vmjax.warp(moving, disp)) + losses.grad_loss(disp)

  grads = jax.jit(jax.grad(lambda v: loss(bf16, v)))(variables)
  ref_grads = jax.jit(jax.grad(lambda v: loss(f32, v)))(variables)
  for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
    assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
  flat = jnp.concatenate([g.ravel() for g in jax.tree_util.tree_leaves(grads)])
  ref_flat = jnp.concatenate([g.ravel() for g in jax.tree_util.tree_leaves(ref_grads)])
  cosine = jnp.vdot(flat, ref_flat) / (jnp.linalg.norm(flat) * jnp.linalg.norm(ref_flat))
  assert float(cosine) > 0.95


def test_config_dtype_builds_the_model_and_rejects_others():
  from vmjax.configs import default
  config = default.get_config()
  assert networks.model_from_config(config.model).dtype == jnp.float32
  config.model.dtype = "bfloat16"
  assert networks.model_from_config(config.model).dtype == jnp.bfloat16
  config.model.dtype = "float16"
  # A DataError: the command lines report it in one line naming the setting.
  with pytest.raises(checks.DataError, match=r"model dtype must be one of .*config.model.dtype"):
    networks.model_from_config(config.model)
