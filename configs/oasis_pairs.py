"""The shipped pretrained model (``vmjax.pretrained``): subject-to-subject, diffeomorphic,
semi-supervised VM-2 on OASIS-TRT-20 (``configs/oasis.py``'s data).

Pairs mode over subjects 1-12 (132 ordered pairs, both images augmented), validation on the
pairs among 13-15. Diffeomorphic (7 scaling-and-squaring steps at half resolution) so the field
does not fold; the auxiliary Dice loss on the training subjects' manual labels (VoxelMorph
TMI'19 section IV-C, ``loss.seg_weight``) over the 98 labels of ``labels.txt``.
``downsample=2`` (2 mm) on a CPU; ``downsample=1`` on a GPU.
"""

from vmjax.configs import oasis
from vmjax import config_args


def get_config(arg=None):
  config = oasis.get_config()
  config.data.mode = "pairs"
  config.data.atlas = ""
  config.data.train = ",".join(oasis.subject(i) for i in range(1, 13))
  config.model.int_steps = 7
  config.model.int_downsize = 2
  config.loss.seg_weight = 1.0
  config.augment.fixed = True
  config.num_steps = 6000
  config.log_every = 20
  config.eval_every = 250
  config.checkpoint_every = 250
  return config_args.apply_arg(config, arg)
