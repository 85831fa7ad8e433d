r"""MixReorg: GroupViT plus mixed patch reorganisation (docs/method.md §4).

Variants (`configs/mixreorg.py:VARIANT`): paper, demo (default), tiny.

  python -m mixreorg_jax.train --config configs/mixreorg.py:demo --workdir /tmp/mixreorg_demo
  python -m mixreorg_jax.train --config configs/mixreorg.py:paper --workdir gs://BUCKET/mixreorg \
      --config.data.datasets='[{"dir": "gs://BUCKET/tfds/cc12m", "split": "train", "weight": 1.0}]'
"""

from mixreorg_jax.training import config as train_config


def get_config(arg=None):
    variant = train_config.parse_variant(arg, train_config.VARIANTS, default="demo")
    c = train_config.apply_variant(train_config.base_config(), variant)
    # The method's settings, chosen on the synthetic benchmark (docs/results.md 1-2). From the pre-trained backbone the images are mixed before any block has seen
    # their source image (no contextual or progressive mixing): contextual features let the mixed
    # segments follow their source without learning its classes.
    c.mix.enabled = True
    c.mix.group_size = 2
    c.mix.block_size = 1
    c.mix.contextual_depth = 0
    c.mix.progressive_weight = 0.0
    c.mix.progressive_mode = "add"
    # The loss weights are the base config's (docs/method.md §4: every term at 1.0, the mixed
    # images against their group's captions), which the demo variant changes; its
    # mixed-segmentation loss, the one term that reads the mixed branch, weighs 4 (measured
    # against 1 and 2: docs/results.md 3.9).
    if variant == "demo":
        c.loss.mixseg = 4.0
    return c
