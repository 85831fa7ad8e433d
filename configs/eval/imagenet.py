r"""Zero-shot ImageNet-1k val classification, top-1 and top-5 (GroupViT's protocol: CLIP's 80
prompt templates, the 224 px centre crop of the short side resized to 256).

  python -m mixreorg_jax.evaluate --config configs/eval/imagenet.py \
      --config.data_dir=~/data/imagenet/val --config.class_names=~/data/imagenet/names.txt \
      --checkpoint=CKPT --output_dir=/tmp/eval_imagenet

data_dir: the val images in one folder per class (DIR/n01440764/*.JPEG, ...: classes in sorted
folder order); or a TFDS split in array_record format: `--config.tfds_name=imagenet2012
--config.data_dir=~/tensorflow_datasets --config.split=validation`. class_names: a text file of
the 1000 class names, one a line in class order (the folders and TFDS's labels are WordNet ids).
Every field of `mixreorg_jax.evaluation.classification.default_config` can be overridden, e.g.
`--config.max_images=1000`.
"""

from mixreorg_jax.evaluation import classification


def get_config(arg=None):
    del arg
    return classification.default_config().lock()
