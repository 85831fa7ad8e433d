r"""GroupViT (Xu et al. 2022): image-text contrastive + multi-label loss, no mixing.

Variants (`configs/groupvit.py:VARIANT`): paper, demo (default), tiny.

  python -m mixreorg_jax.train --config configs/groupvit.py:demo --workdir /tmp/groupvit_demo
"""

from mixreorg_jax.training import config as train_config


def get_config(arg=None):
    variant = train_config.parse_variant(arg, train_config.VARIANTS, default="demo")
    c = train_config.apply_variant(train_config.base_config(), variant)
    c.mix.enabled = False
    c.loss.restore = 0.0
    c.loss.mixseg = 0.0
    return c
