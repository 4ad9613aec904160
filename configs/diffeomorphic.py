"""Diffeomorphic VoxelMorph (Dalca et al. 2019 / TMI 2019 appendix): the network predicts a
stationary velocity, integrated with 7 scaling-and-squaring steps at half resolution; the
image term is symmetric (bidirectional)."""

from vmjax.configs import default
from vmjax import config_args


def get_config(arg=None):
  config = default.get_config()
  config.model.int_steps = 7
  config.model.int_downsize = 2
  config.loss.bidir = True
  return config_args.apply_arg(config, arg)
