r"""Zero-shot image-text retrieval on a held-out caption split: recall@1, 5 and 10, image to
text and text to image.

  python -m mixreorg_jax.evaluate --config configs/eval/retrieval.py \
      --config.data_dir=~/tensorflow_datasets/cc12m_val --checkpoint=CKPT \
      --output_dir=/tmp/eval_retrieval

data_dir: a caption dataset (one caption per image) prepared by `python -m
mixreorg_jax.prepare_captions --split validation ...`, e.g. from pairs held out of the training
data; split: the split to rank ('validation'). The first `max_images` pairs (1000; 0: all) are
ranked. Every field of `mixreorg_jax.evaluation.retrieval.default_config` can be overridden.
"""

from mixreorg_jax.evaluation import retrieval


def get_config(arg=None):
    del arg
    return retrieval.default_config().lock()
