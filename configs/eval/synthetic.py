r"""The synthetic world's test split; the background threshold is chosen on its validation split.

  python -m mixreorg_jax.evaluate --config configs/eval/synthetic.py \
      --config.data_dir=~/tensorflow_datasets/mixreorg_synthetic --checkpoint=/tmp/mixreorg_demo \
      --output_dir=/tmp/eval_synthetic --config.save_predictions=16

data_dir: the prepared world (`python -m mixreorg_jax.prepare_synthetic --data_dir DIR`), or its
root (the default world is prepared there on first use). Windows, resize and stride follow the
model (window = its image_size: one window per image of the same size). bg_thresh='auto' sweeps
`bg_sweep` on `bg_thresh_split` ('val') and reports the chosen value; never set it to 'test'.
"""

from mixreorg_jax.evaluation import segmentation_settings


def get_config(arg=None):
    del arg
    return segmentation_settings.default_config("synthetic").lock()
