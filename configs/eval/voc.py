r"""Zero-shot PASCAL VOC 2012 val: 20 classes + background, bg_thresh 0.95 (docs/method.md §2).

  python -m mixreorg_jax.evaluate --config configs/eval/voc.py \
      --config.data_dir=~/data --checkpoint=CKPT --output_dir=/tmp/eval_voc

data_dir: the folder holding VOCdevkit/VOC2012 (or that folder itself). Every field of
`mixreorg_jax.evaluation.segmentation_settings.default_config` can be overridden, e.g.
`--config.max_images=50 --config.save_predictions=10 --config.templates="('imagenet80',)"`.
"""

from mixreorg_jax.evaluation import segmentation_settings


def get_config(arg=None):
    del arg
    return segmentation_settings.default_config("voc").lock()
