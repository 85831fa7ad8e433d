r"""Zero-shot ADE20K (SceneParsing) validation: 150 classes, no background (docs/method.md §2).

  python -m mixreorg_jax.evaluate --config configs/eval/ade20k.py \
      --config.data_dir=~/data --checkpoint=CKPT --output_dir=/tmp/eval_ade20k

data_dir: the folder holding ADEChallengeData2016.
"""

from mixreorg_jax.evaluation import segmentation_settings


def get_config(arg=None):
    del arg
    return segmentation_settings.default_config("ade20k").lock()
