"""Prompt texts for GroupViT's multi-label contrastive loss (docs/method.md §1).

Each caption gives `NUM_PROMPTS` texts: up to that many of its candidate words (nouns and verbs,
extracted once at preparation, see `data/words.py`), drawn without replacement, each put in a
template drawn from the 80 ImageNet prompt templates of CLIP; a caption with fewer words is padded
with the raw caption, so every example has exactly `NUM_PROMPTS` prompts. Each prompt also gets
the id of its word (`word_id`; -1 for the caption), which the multi-label loss can use to treat
the same word in another example's prompt as a positive (`loss.multi_label_positives`).
"""

import zlib
from collections.abc import Sequence

import numpy as np

NUM_PROMPTS = 3

# The 80 ImageNet prompt templates of CLIP's zero-shot classification, in CLIP's order.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)


# `data.prompt_templates`: the template sets a config can name.
TEMPLATE_SETS = {"imagenet80": IMAGENET_TEMPLATES, "photo": ("a photo of a {}.",)}


def templates(name: str) -> tuple[str, ...]:
    """The template set called `name` (a key of TEMPLATE_SETS); unknown names are an error."""
    if name not in TEMPLATE_SETS:
        raise ValueError(f"unknown prompt template set {name!r}; known: {sorted(TEMPLATE_SETS)}")
    return TEMPLATE_SETS[name]


def word_id(word: str) -> int:
    """A stable non-negative int32 id of a (lower-cased) word, the same in every process."""
    return zlib.crc32(word.lower().encode("utf-8")) & 0x7FFFFFFF


def multi_label_prompts(
    words: Sequence[str],
    caption: str,
    rng: np.random.Generator,
    num_prompts: int = NUM_PROMPTS,
    template_set: Sequence[str] = IMAGENET_TEMPLATES,
) -> tuple[list[str], list[int]]:
    """(`num_prompts` texts: min(num_prompts, len(words)) templated words, then the caption;
    their word ids, -1 for the caption).

    Words are drawn without replacement, each into an independently drawn template of
    `template_set`.
    """
    num_words = min(num_prompts, len(words))
    chosen = rng.choice(len(words), size=num_words, replace=False) if num_words else []
    drawn = rng.integers(len(template_set), size=num_words)
    prompts = [template_set[t].format(words[w]) for w, t in zip(chosen, drawn)]
    ids = [word_id(words[w]) for w in chosen]
    padding = num_prompts - num_words
    return prompts + [caption] * padding, ids + [-1] * padding
