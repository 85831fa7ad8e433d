"""Candidate words of a caption for the multi-label contrastive loss: its nouns and verbs.

GroupViT tags each caption with NLTK and keeps the words tagged NN, NNS, NNP or VB* (docs/method.md §1).
Here that happens once, when a dataset is prepared (`data/captions.py`), and the words are stored
with the example, so training never runs the tagger.

Tokens come from NLTK's word tokenizer without the sentence splitter (captions are one sentence,
and this needs no `punkt` data); only the perceptron tagger's data is needed. Words are lower-cased
(the CLIP tokenizer lower-cases anyway) and each is kept once, in caption order.

A tagger is any `tag(tokens: list[str]) -> list[tuple[str, str]]` (e.g. `nltk.pos_tag`); tests
pass a small fake one.
"""

import functools
from collections.abc import Callable, Sequence

import nltk

Tagger = Callable[[list[str]], Sequence[tuple[str, str]]]

CANDIDATE_TAGS = frozenset({"NN", "NNS", "NNP", "VB", "VBD", "VBG", "VBN", "VBP", "VBZ"})

TAGGER_RESOURCE = "averaged_perceptron_tagger_eng"


@functools.cache
def _word_tokenizer() -> nltk.tokenize.NLTKWordTokenizer:
    return nltk.tokenize.NLTKWordTokenizer()


class MissingTaggerData(RuntimeError):
    """NLTK's tagger data is not installed; the message says how to install it."""


@functools.cache
def nltk_tagger() -> Tagger:
    """NLTK's English perceptron tagger; a clear error saying how to install its data if missing."""
    try:
        return nltk.tag.PerceptronTagger().tag
    except LookupError as e:
        raise MissingTaggerData(
            f"NLTK's part-of-speech tagger data ('{TAGGER_RESOURCE}', for nltk {nltk.__version__})"
            " is not installed. Install it with:\n"
            f"  python -m nltk.downloader {TAGGER_RESOURCE}\n"
            "(or set NLTK_DATA to a directory that holds taggers/"
            f"{TAGGER_RESOURCE}/)."
        ) from e


def candidate_words(caption: str, tag: Tagger | None = None) -> list[str]:
    """The caption's nouns and verbs (NN, NNS, NNP, VB*), lower-cased, each once, in order."""
    tokens = _word_tokenizer().tokenize(caption)
    if not tokens:
        return []
    tagged = (tag or nltk_tagger())(tokens)
    words = []
    for token, pos in tagged:
        word = token.lower()
        if pos in CANDIDATE_TAGS and any(c.isalpha() for c in word) and word not in words:
            words.append(word)
    return words
