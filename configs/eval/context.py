r"""Zero-shot PASCAL Context val. Variants: 60 (default: 59 classes + background, bg_thresh 0.35,
the released evaluation) and 59 (no background; background pixels ignored).

  python -m mixreorg_jax.evaluate --config configs/eval/context.py \
      --config.data_dir=~/data --checkpoint=CKPT --output_dir=/tmp/eval_context
  python -m mixreorg_jax.evaluate --config configs/eval/context.py:59 \
      --config.data_dir=~/data --checkpoint=CKPT --output_dir=/tmp/eval_context59

data_dir: the folder holding VOCdevkit/VOC2010 with mmseg's converted SegmentationClassContext.
"""

from mixreorg_jax.evaluation import segmentation_settings
from mixreorg_jax.training import config as train_config


def get_config(arg=None):
    variant = train_config.parse_variant(arg, ("60", "59"), default="60")
    return segmentation_settings.default_config(f"context{variant}").lock()
