r"""Zero-shot COCO-Object val2017: COCO's 80 thing classes + background, bg_thresh 0.95.

  python -m mixreorg_jax.evaluate --config configs/eval/coco_object.py \
      --config.data_dir=~/data --checkpoint=CKPT --output_dir=/tmp/eval_coco_object

data_dir: the folder holding coco/{images,annotations}/val2017 (masks from GroupViT's
convert_dataset/convert_coco_object.py).
"""

from mixreorg_jax.evaluation import segmentation_settings


def get_config(arg=None):
    del arg
    return segmentation_settings.default_config("coco_object").lock()
