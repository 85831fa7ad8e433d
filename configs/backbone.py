r"""Backbone pre-training for the demo: the synthetic world's stand-in for ImageNet weights.

MixReorg starts from an image tower pre-trained on image-level labels (docs/method.md §3). Here
the demo model's patch embedding and stage-1 blocks learn which of the world's classes an image
shows (the caption's class words as labels, no masks, no text tower): a linear classifier on the
batch-standardised mean of the stage-1 patch tokens, sigmoid cross-entropy per class. The demo
then loads those tensors (`model_init_load`, `training.model_init.BACKBONE`):

  python -m mixreorg_jax.train --config configs/backbone.py \
      --workdir ~/tensorflow_datasets/mixreorg_backbone
  python -m mixreorg_jax.train --config configs/mixreorg.py:demo --workdir /tmp/mixreorg_demo \
      --config.model_init=~/tensorflow_datasets/mixreorg_backbone

`launch/local.sh` runs the first command when the backbone's export is missing.
"""

import ml_collections

from mixreorg_jax.data import synthetic
from mixreorg_jax.training import config as train_config


def get_config(arg=None):
    """`configs/backbone.py` pre-trains the demo model; `:tiny`, the tiny model (tests)."""
    variant = train_config.parse_variant(arg, ("demo", "tiny"), default="demo")
    c = train_config.apply_variant(train_config.base_config(), variant)
    c.mix.enabled = False
    # Only the classification term: no text, no grouping is computed.
    for name in ("contrastive", "multi_label", "restore", "mixseg", "group_balance"):
        c.loss[name] = 0.0
    c.loss.segment_multi_label = c.loss.segment_retrieval = 0.0
    c.loss.classification = 1.0
    # The world the demo trains on, its classes as the label vocabulary.
    world = synthetic.WorldConfig(**c.data.synthetic_world.to_dict())
    c.data.labels = tuple(synthetic.class_names(world)[1:])
    # Whole images: the labels name every object in them.
    c.data.augment.update(dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)))
    # Constant learning rate, light weight decay, no clipping (measured: docs/results.md 3.8).
    if variant == "demo":
        c.total_steps, c.warmup_steps = 600, 1
    c.optim.update(dict(lr=3e-3, warmup_lr=3e-3, min_lr=3e-3, weight_decay=1e-4, grad_clip=0.0))
    c.model_init = ""
    c.evals = ml_collections.ConfigDict()  # no text tower to evaluate zero-shot
    c.log_every_steps = 50
    c.checkpoint.every_steps = 200
    return c
