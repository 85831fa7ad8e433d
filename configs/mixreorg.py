r"""MixReorg: GroupViT plus mixed patch reorganisation (docs/method.md §3-4).

Variants (`configs/mixreorg.py:VARIANT`): paper, demo (default), tiny.

  python -m mixreorg_jax.train --config configs/mixreorg.py:demo --workdir /tmp/mixreorg_demo
  python -m mixreorg_jax.train --config configs/mixreorg.py:paper --workdir gs://BUCKET/mixreorg \
      --config.data.dir=gs://BUCKET/tfds/cc12m --config.model_init=DEIT_S_DIR \
      --config.evals.voc.data_dir=VOC_ROOT --config.evals.imagenet.dir=IMAGENET_VAL_DIR

`paper` is the published method, and the ablations of the paper are one override each (README):
`mix.contextual_depth` 0/1/2, `mix.progressive_weight=0` or `mix.progressive_mode=add`, and
`loss.restore=0`, `loss.mixseg=0`, `loss.contrastive=0`, `loss.multi_label=0`.
"""

from mixreorg_jax.training import config as train_config


def get_config(arg=None):
    variant = train_config.parse_variant(arg, train_config.VARIANTS, default="demo")
    c = train_config.apply_variant(train_config.base_config(), variant)
    # The published method (docs/method.md §3-4): patches mixed in pairs one by one after
    # Lc = 1 contextual block, progressive mixing after each of the other five stage-1 blocks,
    # restoration before grouping; the loss weights are the base config's (contrastive and
    # multi-label on the original branch, contrastive on the restored one, mixed segmentation
    # against the group's captions, all 1.0).
    c.mix.enabled = True
    c.mix.group_size = 2
    c.mix.block_size = 1
    c.mix.contextual_depth = 1
    c.mix.progressive_weight = 1.0
    # "add" piles one more copy of the original tokens onto the mixed ones after each of the five
    # blocks (their RMS grows to 5.9x the original branch's at GroupViT-S initialisation);
    # "average" keeps them on the original's scale (1.0x; test_mixreorg_model.py measures both).
    c.mix.progressive_mode = "average"
    if variant == "paper":
        # The ImageNet backbone (docs/method.md §3): DeiT-S/16's patch embedding and 12 blocks,
        # from `huggingface-cli download facebook/deit-small-patch16-224 --local-dir DIR`.
        c.model_init = "~/models/deit-small-patch16-224"
    elif variant == "demo":
        # The demo's departures, each measured on the synthetic benchmark (docs/results.md):
        # mixing before any block, since from the world's backbone contextual mixing lets the
        # mixed segments find their source by context instead of its classes (3.8);
        c.mix.contextual_depth = 0
        # no progressive mixing, for the same reason (3.8);
        c.mix.progressive_weight = 0.0
        # the mixed-segmentation loss weighs 4, the one term that reads the mixed branch (3.9).
        c.loss.mixseg = 4.0
        # (The demo's other departures, shared with GroupViT's demo: training/config.py.)
    return c
