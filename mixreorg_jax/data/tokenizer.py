"""CLIP's byte-pair-encoding text tokenizer, giving the same ids as OpenAI CLIP's.

Texts become fixed-length int32 rows: `<|startoftext|>`, the BPE ids, `<|endoftext|>`, then zeros
up to `context_length`. A text too long for the row keeps its first `context_length - 2` BPE ids, so
the end-of-text token is always the row's last non-pad token (the text encoder pools its feature
there: the position of the argmax of the ids).

The vocabulary is the one OpenAI CLIP ships (`assets/bpe_simple_vocab_16e6.txt.gz`). It is turned
once into the `vocab.json` + `merges.txt` pair that `transformers.CLIPTokenizer` loads, in a cache
directory keyed by the merges file's hash; `CLIPTokenizer`'s Rust BPE model merges each new word.

Usage:
  tokenize = get_tokenizer(context_length=77)
  ids = tokenize(["a photo of a cat.", "a photo of a dog."])  # int32 [2, 77]
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import json
import os
import pathlib
import re
import shutil
import tempfile
import zlib
from collections.abc import Sequence

import ftfy
import numpy as np
import regex
import transformers

DEFAULT_BPE_PATH = pathlib.Path(__file__).parents[1] / "assets" / "bpe_simple_vocab_16e6.txt.gz"

# OpenAI's SimpleTokenizer keeps the first 49152 - 256 - 2 merges of the file (after its
# "#version" header line), so that 256 bytes + 256 `</w>` bytes + merges + 2 specials = 49408.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"

# OpenAI's pre-tokenizing pattern. Its IGNORECASE matters even on lower-cased text: the long s
# (U+017F) then matches "s" in "'s", and U+0345 falls outside every alternative.
_OPENAI_PIECE = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
    r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
# OpenAI's whitespace_clean pattern, in its engine (whose `\s`, unlike `re`'s, excludes \x1c-\x1f).
_WHITESPACE_RUN = regex.compile(r"\s+")
# Text made only of these characters passes through ftfy and html.unescape unchanged: ASCII is
# never mojibake, no '&' means no entity, and tab and newline are the ASCII controls ftfy keeps.
# Most captions are like this, and ftfy costs ~50 us a string.
_PLAIN_ASCII = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")


def _byte_symbols() -> dict[int, str]:
    """Byte -> the printable character standing for it (GPT-2's byte encoder), in vocab order.

    Printable Latin-1 bytes stand for themselves and come first; the other 68 bytes follow in byte
    order as chr(256 + n).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {
        **{b: chr(b) for b in printable},
        **{b: chr(256 + n) for n, b in enumerate(others)},
    }


def read_merges(bpe_path: str | os.PathLike) -> list[tuple[str, str]]:
    """The merges OpenAI CLIP uses, read from its gzipped merges file.

    Raises:
      FileNotFoundError: no file at `bpe_path`.
      ValueError: the file is not a gzipped CLIP merges file.
    """
    bpe_path = pathlib.Path(bpe_path)
    if not bpe_path.is_file():
        raise FileNotFoundError(f"CLIP BPE merges file not found: {bpe_path}")
    try:
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(f"{bpe_path} is not a gzipped UTF-8 CLIP BPE merges file: {e}") from e
    merge_lines = lines[1 : NUM_MERGES + 1]
    if len(merge_lines) < NUM_MERGES:
        raise ValueError(
            f"{bpe_path} holds {len(merge_lines)} merges after its header line; CLIP uses the "
            f"first {NUM_MERGES}."
        )
    merges = [tuple(line.split()) for line in merge_lines]
    for line_number, merge in enumerate(merges, start=2):
        if len(merge) != 2:
            raise ValueError(
                f"{bpe_path} line {line_number} is not a merge (two symbols): "
                f"{merge_lines[line_number - 2]!r}"
            )
    return merges


def vocab_from_merges(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Token -> id exactly as OpenAI's SimpleTokenizer numbers them.

    Ids: the 256 byte symbols, the same with `</w>`, each merge's concatenation in merge order,
    then `<|startoftext|>` and `<|endoftext|>`.
    """
    byte_symbols = list(_byte_symbols().values())
    tokens = [
        *byte_symbols,
        *(s + "</w>" for s in byte_symbols),
        *(first + second for first, second in merges),
        SOT_TOKEN,
        EOT_TOKEN,
    ]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"The merges give {len(tokens) - len(vocab)} duplicate vocabulary tokens.")
    return vocab


def _default_cache_root() -> pathlib.Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"
    return base / "mixreorg_jax" / "clip_bpe"


def _write_vocab_dir(bpe_path: pathlib.Path, out_dir: pathlib.Path) -> None:
    merges = read_merges(bpe_path)
    vocab = vocab_from_merges(merges)
    with open(out_dir / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(out_dir / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{first} {second}\n" for first, second in merges)


def cached_vocab_dir(
    bpe_path: str | os.PathLike = DEFAULT_BPE_PATH,
    cache_root: str | os.PathLike | None = None,
) -> pathlib.Path:
    """The directory holding `vocab.json` + `merges.txt` for `bpe_path`, built on first use.

    The directory is named by the merges file's hash under `cache_root` (default
    `$XDG_CACHE_HOME/mixreorg_jax/clip_bpe`, else `~/.cache/...`; a temp directory if that
    cannot be written). It is filled under a temporary name and renamed into place, so processes
    that race to build it each see either no directory or a complete one.
    """
    bpe_path = pathlib.Path(bpe_path)
    if not bpe_path.is_file():
        raise FileNotFoundError(f"CLIP BPE merges file not found: {bpe_path}")
    digest = hashlib.sha256(bpe_path.read_bytes()).hexdigest()[:16]
    roots = (
        [pathlib.Path(cache_root)]
        if cache_root is not None
        else [
            _default_cache_root(),
            pathlib.Path(tempfile.gettempdir()) / f"mixreorg_jax-{os.getuid()}" / "clip_bpe",
        ]
    )
    write_errors = []
    for root in roots:
        final_dir = root / digest
        if (final_dir / "vocab.json").is_file() and (final_dir / "merges.txt").is_file():
            return final_dir
        try:
            root.mkdir(parents=True, exist_ok=True)
            staging_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=root))
        except OSError as e:
            write_errors.append(f"{root}: {e}")
            continue
        try:
            _write_vocab_dir(bpe_path, staging_dir)
            try:
                os.rename(staging_dir, final_dir)
            except OSError:
                if not (final_dir / "vocab.json").is_file():
                    raise
                # Another process renamed its complete copy into place first.
        finally:
            shutil.rmtree(staging_dir, ignore_errors=True)
        return final_dir
    raise OSError(f"No writable cache directory for the CLIP vocabulary: {write_errors}")


def clean_text(text: str) -> str:
    """OpenAI CLIP's text normalisation before BPE: ftfy, HTML entities, whitespace, lower case."""
    if not _PLAIN_ASCII.fullmatch(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


def pieces(text: str) -> list[str]:
    """The pieces OpenAI CLIP BPE-encodes separately: `text` cleaned, then split by its regex."""
    return _OPENAI_PIECE.findall(clean_text(text))


class Tokenizer:
    """Texts -> int32 [N, context_length] CLIP token ids (SOT, BPE, EOT, zero padding).

    Each text is cleaned and split into pieces in Python, with OpenAI's regex engine; each new
    piece is BPE-encoded by `CLIPTokenizer`'s Rust BPE model and its ids cached, as OpenAI caches
    its BPE output, so the common words of a caption stream cost one dict lookup. The backend's
    own text pipeline is not used: its NFC pass would recompose what html.unescape decomposed
    (e.g. "e&#769;"), and its case-sensitive split, with an older Unicode table, cuts some texts
    elsewhere than OpenAI's.
    """

    # Bounds the piece cache of a long-running data worker (~200 bytes an entry, so ~50 MB).
    max_cached_pieces = 1 << 18

    def __init__(
        self,
        context_length: int = 77,
        *,
        bpe_path: str | os.PathLike = DEFAULT_BPE_PATH,
        cache_root: str | os.PathLike | None = None,
    ):
        if context_length < 2:
            raise ValueError(f"context_length must hold SOT and EOT (>= 2), got {context_length}.")
        self.context_length = context_length
        self.vocab_dir = cached_vocab_dir(bpe_path, cache_root)
        # `CLIPTokenizer(vocab_file=..., merges_file=...)` silently ignores its files; the
        # directory route is the one that reads them.
        clip_tokenizer = transformers.CLIPTokenizer.from_pretrained(
            self.vocab_dir, local_files_only=True
        )
        if len(clip_tokenizer) != VOCAB_SIZE:
            raise ValueError(
                f"Loaded a {len(clip_tokenizer)}-token vocabulary from {self.vocab_dir}; "
                f"CLIP's has {VOCAB_SIZE}."
            )
        self._bpe = clip_tokenizer.backend_tokenizer.model
        self._symbol_of_byte = _byte_symbols()
        self._sot_id = clip_tokenizer.convert_tokens_to_ids(SOT_TOKEN)
        self._eot_id = clip_tokenizer.convert_tokens_to_ids(EOT_TOKEN)
        # OpenAI's regex makes a special token written in the text one piece; its ids are the
        # special token's, never BPE's (OpenAI seeds its BPE cache the same way).
        self._special_piece_ids = {SOT_TOKEN: [self._sot_id], EOT_TOKEN: [self._eot_id]}
        self._piece_ids = dict(self._special_piece_ids)

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def sot_token_id(self) -> int:
        return self._sot_id

    @property
    def eot_token_id(self) -> int:
        return self._eot_id

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Token ids, int32 [N, context_length]; a single string gives N = 1."""
        if isinstance(texts, str):
            texts = [texts]
        max_bpe_ids = self.context_length - 2
        ids = np.zeros((len(texts), self.context_length), np.int32)
        ids[:, 0] = self._sot_id
        for row, text in zip(ids, texts):
            if not isinstance(text, str):
                raise TypeError(f"Texts must be str, got {type(text).__name__}: {text!r}")
            bpe_ids = []
            for piece in pieces(text):
                piece_ids = self._piece_ids.get(piece)
                bpe_ids += piece_ids if piece_ids is not None else self._encode_piece(piece)
                if len(bpe_ids) >= max_bpe_ids:
                    del bpe_ids[max_bpe_ids:]
                    break
            row[1 : 1 + len(bpe_ids)] = bpe_ids
            row[1 + len(bpe_ids)] = self._eot_id
        return ids

    def _encode_piece(self, piece: str) -> list[int]:
        """BPE ids of one piece (as a word: its last symbol takes `</w>`), now cached."""
        symbols = "".join(self._symbol_of_byte[b] for b in piece.encode("utf-8"))
        piece_ids = [token.id for token in self._bpe.tokenize(symbols)]
        if len(self._piece_ids) >= self.max_cached_pieces:
            self._piece_ids = dict(self._special_piece_ids)
        self._piece_ids[piece] = piece_ids
        return piece_ids


@functools.cache
def get_tokenizer(context_length: int = 77) -> Tokenizer:
    """The shared `Tokenizer` for `context_length`, built once per process."""
    return Tokenizer(context_length)
