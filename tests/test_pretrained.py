"""The shipped model: its parameters load without a template, as the tree its config builds."""

import jax
import numpy as np

from vmjax import networks
from vmjax import pretrained


def test_the_shipped_model_loads_as_the_tree_its_config_builds():
  """pretrained.load reads the parameters' own nested dict (no init); it must be the tree,
  shapes and dtypes that the model's init gives, and the model must apply to it."""
  for name in pretrained.available():
    model, variables, _ = pretrained.load(name)
    target = networks.init_variables(model, jax.random.PRNGKey(0), (2 ** model.levels,) * 3)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(target)
    for got, want in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(target)):
      assert got.shape == want.shape and got.dtype == want.dtype
    x = np.zeros((1,) + (2 ** model.levels,) * 3 + (1,), np.float32)
    assert model.apply(variables, x, x).shape == x.shape[:4] + (3,)
