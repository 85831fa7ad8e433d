"""The CLIP tokenizer against OpenAI CLIP's own `simple_tokenizer.py` (clip-anytorch's wheel).

The reference module is loaded from its file: importing the `clip` package would pull in
torchvision. Its rows are built as `clip.tokenize(texts, context_length, truncate=True)` builds
them: SOT + BPE + EOT, cut to `context_length` with EOT written last, zero-padded.
"""

import gzip
import hashlib
import importlib.util
import json
import os
import pathlib
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixreorg_jax.data import tokenizer as tokenizer_lib

SOT, EOT = 49406, 49407

TRICKY_TEXTS = [
    "a photo of a cat.",
    "Café crème brûlée on a naïve façade, São Paulo, Zürich",
    "東京タワーの夜景 and 서울 and 北京的猫",
    "a cat 🐱, a dog 🐶🏽 and a family 👩‍👩‍👧 ❤️",
    "The Mona Lisa â€” by Leonardo, cafÃ© in MÃ¼nchen",
    "Tom &amp;amp; Jerry &lt;3 &quot;quoted&quot; &#39;x&#39; &eacute;t&eacute; &nbsp;end",
    "Wait... what?!?! -- (yes) [no] {maybe} *** ~~~ @user #tag $5 100%",
    "It's the dog's toy; they're here, I'm sure we've seen you'll see he'd say can't won't",
    "IT'S UPPER CASE 'S 'T 'RE 'VE 'M 'LL 'D",
    "Numbers: 1234567890, 3.14159, 1,000,000 and ½ ² ٣ ⅷ",
    "  leading and\ttabs\n\nnewlines \r\n  trailing   ",
    "\u00a0non-breaking\u2003em space\u3000ideographic\u2028line sep\x85next",
    "",
    "   \n\t  ",
    "e&#769; combining accent vs e\u0301 vs \u00e9",
    "ﬁne ligatures ﬂ and ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
    "<|startoftext|>special<|endoftext|> and x<|endoftext|> and ?<|endoftext|>",
    "'ſ long s, 'ſtuff and <|ſtartoftext|>",
    "\x1b[31mred\x1b[0m terminal escapes, \x00 nul and \x1c\x1d separators",
    "İstanbul ß ẞ Σίσυφος ΟΔΥΣΣΕΥΣ \u0345 iota subscript",
    "a very long caption about a small red bicycle leaning on a wall " * 8,
    "日本語のとても長い説明文 " * 30,
]


@pytest.fixture(scope="module")
def openai_reference():
    """OpenAI's SimpleTokenizer, reading our vocabulary file."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "OpenAI CLIP reference not installed: pip install --no-deps clip-anytorch==2.6.0"
        )
    path = pathlib.Path(spec.submodule_search_locations[0]) / "simple_tokenizer.py"
    if not path.is_file():
        pytest.skip(f"OpenAI CLIP reference has no {path}")
    module_spec = importlib.util.spec_from_file_location("openai_clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(tokenizer_lib.DEFAULT_BPE_PATH))


def reference_ids(reference, texts, context_length):
    rows = np.zeros((len(texts), context_length), np.int32)
    for row, text in zip(rows, texts):
        tokens = [SOT, *reference.encode(text), EOT]
        if len(tokens) > context_length:
            tokens = tokens[:context_length]
            tokens[-1] = EOT
        row[: len(tokens)] = tokens
    return rows


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("clip_bpe_cache")


@pytest.fixture(scope="module")
def tokenize(cache_root):
    return tokenizer_lib.Tokenizer(77, cache_root=cache_root)


@pytest.fixture(scope="module")
def tokenize_8(cache_root):
    return tokenizer_lib.Tokenizer(8, cache_root=cache_root)


def test_assets_readme_sentence(tokenize):
    ids = tokenize("a photo of a cat.")
    np.testing.assert_array_equal(ids[0, :8], [49406, 320, 1125, 539, 320, 2368, 269, 49407])
    assert not ids[0, 8:].any()


def test_shipped_vocabulary_is_openai_clips():
    digest = hashlib.sha256(tokenizer_lib.DEFAULT_BPE_PATH.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def test_vocab_files_number_tokens_as_openai(openai_reference, tokenize):
    with open(tokenize.vocab_dir / "vocab.json", encoding="utf-8") as f:
        assert json.load(f) == openai_reference.encoder
    with open(tokenize.vocab_dir / "merges.txt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().splitlines()[1:]]
    assert merges == sorted(openai_reference.bpe_ranks, key=openai_reference.bpe_ranks.get)
    assert tokenize.vocab_size == len(openai_reference.encoder) == 49408
    assert (tokenize.sot_token_id, tokenize.eot_token_id) == (SOT, EOT)


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_matches_openai_on_tricky_text(openai_reference, tokenize, tokenize_8, text):
    np.testing.assert_array_equal(tokenize(text), reference_ids(openai_reference, [text], 77))
    np.testing.assert_array_equal(tokenize_8(text), reference_ids(openai_reference, [text], 8))


def test_batch_matches_openai(openai_reference, tokenize):
    np.testing.assert_array_equal(
        tokenize(TRICKY_TEXTS), reference_ids(openai_reference, TRICKY_TEXTS, 77)
    )


# Pieces of the tricky texts, recombined at random by hypothesis.
_FRAGMENTS = [
    "a",
    "Photo",
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "'s",
    "'T",
    "'re",
    "'",
    "&amp;",
    "&amp;amp;",
    "&#769;",
    "&lt;",
    "&",
    ";",
    "é",
    "e\u0301",
    "Ã©",
    "â€œ",
    "ﬁ",
    "Ａ",
    "日本",
    "🙂",
    "🏽",
    "\u200d",
    "1",
    "23",
    "½",
    "٣",
    "...",
    "?!",
    "<|endoftext|>",
    "<|startoftext|>",
    "<|",
    "|>",
    "ſ",
    "\u0345",
    "İ",
    "ß",
    "Σ",
    "\x1b[1m",
    "\x00",
    "\x1c",
    "\u00a0",
    "\u3000",
    "\u2028",
    "\x85",
]


@pytest.fixture(scope="module")
def tokenizers_by_length(tokenize, tokenize_8, cache_root):
    return {3: tokenizer_lib.Tokenizer(3, cache_root=cache_root), 8: tokenize_8, 77: tokenize}


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    text=st.one_of(
        st.lists(st.sampled_from(_FRAGMENTS), max_size=25).map("".join),
        st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
        st.text(st.characters(max_codepoint=0x7F), max_size=40),
    ),
    context_length=st.sampled_from([3, 8, 77]),
)
def test_matches_openai_on_random_text(
    openai_reference, tokenizers_by_length, text, context_length
):
    np.testing.assert_array_equal(
        tokenizers_by_length[context_length](text),
        reference_ids(openai_reference, [text], context_length),
    )


def test_shapes_and_dtype(tokenize, tokenize_8):
    assert tokenize("one text").shape == (1, 77)
    ids = tokenize_8(["one", "two texts", "three texts here"])
    assert ids.shape == (3, 8) and ids.dtype == np.int32
    assert tokenize([]).shape == (0, 77)
    np.testing.assert_array_equal(tokenize(("a", "b")), tokenize(["a", "b"]))


def test_empty_text_is_sot_eot(tokenize):
    np.testing.assert_array_equal(tokenize(""), [[SOT, EOT] + [0] * 75])


def test_truncation_keeps_eot_last(tokenize, tokenize_8):
    words = ["cat", "dog", "red", "car", "big", "sun", "sea", "sky"]  # one BPE token each
    for num_words in range(len(words) + 1):
        text = " ".join(words[:num_words])
        (untruncated,) = tokenize(text)
        assert untruncated[1 + num_words] == EOT
        (ids,) = tokenize_8(text)
        num_kept = min(num_words, 6)
        np.testing.assert_array_equal(ids[: 1 + num_kept], untruncated[: 1 + num_kept])
        assert ids[1 + num_kept] == EOT and not ids[2 + num_kept :].any()


def test_cache_dir_is_reused(tmp_path, monkeypatch):
    first = tokenizer_lib.Tokenizer(8, cache_root=tmp_path)
    vocab_file = first.vocab_dir / "vocab.json"
    stamp = vocab_file.stat().st_mtime_ns

    def fail_to_rewrite(*args):
        raise AssertionError("the cached vocabulary was rebuilt")

    monkeypatch.setattr(tokenizer_lib, "_write_vocab_dir", fail_to_rewrite)
    second = tokenizer_lib.Tokenizer(77, cache_root=tmp_path)
    assert second.vocab_dir == first.vocab_dir and vocab_file.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.vocab_dir.name]


def test_racing_builders_share_one_complete_dir(tmp_path):
    results, errors = [], []

    def build():
        try:
            results.append(tokenizer_lib.cached_vocab_dir(cache_root=tmp_path))
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]  # no staging dirs left
    assert sorted(p.name for p in results[0].iterdir()) == ["merges.txt", "vocab.json"]


def test_default_cache_root_and_temp_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    built = tokenizer_lib.cached_vocab_dir()
    assert built.parent == tmp_path / "xdg" / "mixreorg_jax" / "clip_bpe"

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_dir))
    monkeypatch.setattr(tokenizer_lib.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    fallback = tokenizer_lib.cached_vocab_dir()
    assert fallback.parent == tmp_path / "tmp" / f"mixreorg_jax-{os.getuid()}" / "clip_bpe"
    assert (fallback / "vocab.json").read_bytes() == (built / "vocab.json").read_bytes()


def test_get_tokenizer_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tokenizer_lib.get_tokenizer.cache_clear()
    try:
        assert tokenizer_lib.get_tokenizer(16) is tokenizer_lib.get_tokenizer(16)
        assert tokenizer_lib.get_tokenizer(16) is not tokenizer_lib.get_tokenizer(8)
        assert tokenizer_lib.get_tokenizer(16).context_length == 16
    finally:
        tokenizer_lib.get_tokenizer.cache_clear()


def test_missing_vocabulary_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP BPE merges file not found"):
        tokenizer_lib.Tokenizer(bpe_path=tmp_path / "missing.txt.gz", cache_root=tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not gzip at all", "not a gzipped UTF-8"),
        (gzip.compress(b"\xff\xfe not utf-8", mtime=0), "not a gzipped UTF-8"),
        (gzip.compress(b"#version: 0.2\na b\n", mtime=0), "holds 2 merges"),
        (
            gzip.compress(
                b"#version: 0.2\n" + b"a b\n" * 10 + b"abc\n" + b"a b\n" * 50000, mtime=0
            ),
            "line 12 is not a merge",
        ),
        (gzip.compress(b"#version: 0.2\n" + b"a b\n" * 50000, mtime=0), "duplicate vocabulary"),
    ],
)
def test_corrupt_vocabulary_file(tmp_path, content, message):
    bad_file = tmp_path / "bad.txt.gz"
    bad_file.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        tokenizer_lib.Tokenizer(bpe_path=bad_file, cache_root=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # nothing half-written is left to reuse


def test_bad_arguments(tokenize):
    with pytest.raises(TypeError, match="Texts must be str"):
        tokenize(["fine", b"bytes"])
    with pytest.raises(ValueError, match="context_length"):
        tokenizer_lib.Tokenizer(1)
