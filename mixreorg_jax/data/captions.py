"""Prepares real image-caption data as a TFDS dataset (array_record) for the training pipeline.

Reads what `img2dataset` (or a hand-made folder) leaves on disk and writes the agreed features
`image` (PNG/JPEG bytes), `caption` (text) and `words` (the caption's candidate nouns and verbs,
`data/words.py`). Sources, told apart by their file names:
- webdataset shards `*.tar`: members `KEY.jpg` (or .jpeg/.png/.webp) and `KEY.txt`; other
  members (`KEY.json`, ...) are ignored.
- parquet `*.parquet` (img2dataset `--output_format parquet`): an image-bytes column `jpg` (or
  png/webp/image, also a {bytes: ...} struct) and a `caption` (or txt/text) column.
- tfrecord `*.tfrecord` (img2dataset `--output_format tfrecord`): tf.train.Examples with the
  same feature names as the parquet columns.
- a captions file `*.tsv` or `*.txt` (`filename<TAB>caption`, optional header), `*.csv`
  (header with a filename/file/image/path column and a caption/text column) or `*.jsonl` (one
  object per line with those keys); file names are relative to the captions file's folder.

A valid JPEG or PNG in RGB or greyscale is stored as is; any other image PIL can read (CMYK,
palette, WebP, ...) is converted to RGB and re-encoded as a quality-95 JPEG without chroma
subsampling. Unreadable or truncated images, and missing, empty or non-UTF-8 captions, are
skipped and counted, never fatal, and so is a damaged source file (its samples before the damage
are kept); the counts are logged and stored in the dataset's metadata (`skipped_corrupt_image`,
`skipped_bad_caption`, `re_encoded_image`, `unreadable_source`, and per split under `counts`).

From the command line:
  python -m mixreorg_jax.prepare_captions --source 'shards/{00000..00099}.tar' \
      --data_dir ~/tensorflow_datasets --name cc12m --num_workers 16
Read back with `tfds.builder_from_directory(f"{data_dir}/cc12m/1.0.0")` or
`tfds.builder("cc12m", data_dir=data_dir)`, e.g. `.as_data_source("train")`.
"""

import collections
import csv
import functools
import glob
import io
import itertools
import json
import multiprocessing
import os
import re
import struct
import tarfile
import types
from collections.abc import Iterator, Mapping, Sequence

import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from mixreorg_jax import progress
from mixreorg_jax.data import words as words_lib

VERSION = "1.0.0"
FEATURES = tfds.features.FeaturesDict(
    {
        "image": tfds.features.Image(shape=(None, None, 3)),
        "caption": tfds.features.Text(),
        "words": tfds.features.Sequence(tfds.features.Text()),
    }
)
COUNT_NAMES = (
    "examples",
    "skipped_corrupt_image",
    "skipped_bad_caption",
    "re_encoded_image",
    "unreadable_source",
)
# The metadata key naming the source files that were missing or unreadable (over all splits).
UNREADABLE_FILES = "unreadable_files"

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "image", "image/encoded")
CAPTION_KEYS = ("txt", "caption", "text")
FILENAME_KEYS = ("filename", "file", "image", "path")
_KEEP_AS_IS = {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L")}


# ---------------------------------------------------------------- source file names
def _expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: `{00000..00099}` (zero padding kept) and `{a,b}`."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*,[^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    first, last, alternatives = match.groups()
    if alternatives is not None:
        options = alternatives.split(",")
    else:
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
    return [e for option in options for e in _expand_braces(head + option + tail)]


def expand_sources(patterns: str | Sequence[str]) -> list[str]:
    """Files matching brace/glob patterns, in pattern order.

    A pattern matching no file is an error (a typo, most likely). A file that a brace range
    names but that is missing (a shard the download lost) is kept: reading it fails, and it is
    counted and named as an unreadable source.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    files = []
    for pattern in patterns:
        matched = [
            f
            for p in _expand_braces(os.path.expanduser(pattern))
            for f in (_glob(p) if glob.has_magic(p) else [p])
        ]
        if not any(epath.Path(f).is_file() for f in matched):
            raise FileNotFoundError(f"no source files match {pattern!r}")
        files.extend(matched)
    return files


def _glob(pattern: str) -> list[str]:
    """Files matching `pattern`, sorted: anywhere in a local path; in the last part only on
    other file systems (`gs://bucket/cc12m/*.tar`), which epath reads."""
    if "://" not in pattern:
        return [f for f in sorted(glob.glob(pattern)) if os.path.isfile(f)]
    folder, name = pattern.rsplit("/", 1)
    if glob.has_magic(folder):
        raise ValueError(f"{pattern!r}: on {folder.split('://')[0]}://, only file names may glob")
    return sorted(str(p) for p in epath.Path(folder).glob(name) if p.is_file())


# ---------------------------------------------------------------- validation
def checked_image(data: bytes | None) -> tuple[bytes | None, bool]:
    """(bytes to store, whether re-encoded); (None, False) for a missing or unreadable image.

    A JPEG is decoded at 1/8 scale (every entropy-coded byte is still read, so truncation is
    caught) to check it cheaply.
    """
    if not data:
        return None, False
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = (image.format, image.mode)
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        if kind in _KEEP_AS_IS:
            return data, False
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=95, subsampling=0)
        return out.getvalue(), True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None, False


def checked_caption(raw: bytes | str | None) -> str | None:
    """The stripped caption, or None if missing, empty or not valid UTF-8.

    Text read with errors="surrogateescape" carries undecodable bytes as lone surrogates, which
    count as not UTF-8.
    """
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if any("\udc80" <= c <= "\udcff" for c in raw):
        return None
    return raw.strip() or None


# ---------------------------------------------------------------- readers: (key, image, caption)
class DamagedSourceError(Exception):
    """A source file that cannot be read further (its samples read so far are kept)."""


def _read_webdataset(path: str) -> Iterator[tuple[str, bytes | None, bytes | None]]:
    """Samples of a webdataset tar: members grouped by key (the name up to the basename's first
    dot), which webdataset requires to be adjacent."""

    def sample(key, members):
        image = next((members[k] for k in IMAGE_KEYS if k in members), None)
        caption = next((members[k] for k in CAPTION_KEYS if k in members), None)
        return key, image, caption

    with epath.Path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        key, members = None, {}
        for member in tar:
            if not member.isfile():
                continue
            folder, base = os.path.split(member.name)
            if "." not in base:
                continue
            stem, ext = base.split(".", 1)
            member_key = os.path.join(folder, stem)
            if member_key != key:
                if key is not None:
                    yield sample(key, members)
                key, members = member_key, {}
            members[ext.lower()] = tar.extractfile(member).read()
        if key is not None:
            yield sample(key, members)


def _image_column_value(value):
    return value.get("bytes") if isinstance(value, dict) else value


def _read_parquet(path: str) -> Iterator[tuple[str, bytes | None, bytes | None]]:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    with epath.Path(path).open("rb") as f:
        try:
            parquet = pq.ParquetFile(f)
        except pa.ArrowInvalid as e:
            raise DamagedSourceError("not a readable parquet file") from e
        names = parquet.schema_arrow.names
        image_key = next((k for k in IMAGE_KEYS if k in names), None)
        caption_key = next((k for k in CAPTION_KEYS if k in names), None)
        if image_key is None or caption_key is None:
            raise ValueError(
                f"{path}: parquet needs an image column (one of {IMAGE_KEYS}) and a "
                f"caption column (one of {CAPTION_KEYS}); it has {names}"
            )
        columns = [image_key, caption_key] + (["key"] if "key" in names else [])
        row = 0
        batches = parquet.iter_batches(batch_size=256, columns=columns)
        while True:
            try:
                batch = next(batches, None)
            except pa.ArrowInvalid as e:
                raise DamagedSourceError(f"bad parquet data after row {row}") from e
            if batch is None:
                return
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                key = str(data["key"][i]) if "key" in data else str(row)
                yield key, _image_column_value(data[image_key][i]), data[caption_key][i]
                row += 1


def _read_tfrecord(path: str) -> Iterator[tuple[str, bytes | None, bytes | None]]:
    """Uncompressed TFRecords of tf.train.Examples, read without TensorFlow.

    A record is (uint64 length, uint32 CRC, data, uint32 CRC); the CRCs are not checked (the
    images are checked by decoding).
    """
    from google.protobuf import message as protobuf_message  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top

    with epath.Path(path).open("rb") as f:
        for row in itertools.count():
            header = f.read(12)
            if not header:
                return
            length = struct.unpack("<Q", header[:8])[0] if len(header) == 12 else -1
            data = f.read(length) if length >= 0 else b""
            if length < 0 or len(data) < length or len(f.read(4)) < 4:
                raise DamagedSourceError(f"truncated TFRecord at record {row}")
            try:
                features = tf_example_pb2.Example.FromString(data).features.feature
            except protobuf_message.DecodeError as e:
                raise DamagedSourceError(f"record {row} is not a tf.train.Example") from e

            def first_bytes(keys, features=features):
                for k in keys:
                    if k in features and features[k].bytes_list.value:
                        return features[k].bytes_list.value[0]
                return None

            key = first_bytes(("key",))
            yield (
                key.decode("utf-8", "replace") if key else str(row),
                first_bytes(IMAGE_KEYS),
                first_bytes(CAPTION_KEYS),
            )


def _caption_file_rows(path: str) -> Iterator[tuple[str, str]]:
    """(file name, caption) rows; undecodable bytes stay lone surrogates (see checked_caption)."""
    text = epath.Path(path).read_bytes().decode("utf-8", "surrogateescape")
    with io.StringIO(text, newline="") as f:
        if path.endswith(".jsonl"):
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    yield (
                        next((row[k] for k in FILENAME_KEYS if k in row), None),
                        next((row[k] for k in CAPTION_KEYS if k in row), None),
                    )
        elif path.endswith(".csv"):
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            file_key = next((k for k in FILENAME_KEYS if k in fields), None)
            caption_key = next((k for k in CAPTION_KEYS if k in fields), None)
            if file_key is None or caption_key is None:
                raise ValueError(
                    f"{path}: the CSV header needs a file name column (one of "
                    f"{FILENAME_KEYS}) and a caption column (one of "
                    f"{CAPTION_KEYS}); it has {fields}"
                )
            for row in reader:
                yield row[file_key], row[caption_key]
        else:
            for line_number, line in enumerate(f):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                name, _, caption = line.partition("\t")
                if line_number == 0 and name.lower() in FILENAME_KEYS:
                    continue  # a header
                yield name, caption


def _read_caption_file(path: str) -> Iterator[tuple[str, bytes | None, str | None]]:
    folder = os.path.dirname(path)
    for name, caption in _caption_file_rows(path):
        image = None
        if name:
            try:
                image = epath.Path(folder, name).read_bytes()
            except OSError:
                logging.warning("%s: cannot read image %r", path, name)
        yield str(name), image, caption


def _reader(path: str):
    name = os.path.basename(path).lower()
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return _read_webdataset
    if name.endswith(".parquet"):
        return _read_parquet
    if ".tfrecord" in name:  # also sharded names: x.tfrecord-00000-of-00010
        return _read_tfrecord
    if name.endswith((".tsv", ".csv", ".jsonl", ".txt")):
        return _read_caption_file
    raise ValueError(
        f"{path}: unknown source type; expected .tar (webdataset), .parquet, "
        ".tfrecord, or a captions file (.tsv, .csv, .jsonl)"
    )


# ---------------------------------------------------------------- one file -> examples
def prepare_file(path: str, tag: words_lib.Tagger | None = None):
    """-> (list of (key, example), counts) for one source file; bad samples skipped and counted."""
    reader = _reader(path)
    counts = collections.Counter({name: 0 for name in COUNT_NAMES})
    examples = []
    try:
        for ordinal, (key, raw_image, raw_caption) in enumerate(reader(path)):
            caption = checked_caption(raw_caption)
            if caption is None:
                counts["skipped_bad_caption"] += 1
                continue
            image, re_encoded = checked_image(raw_image)
            if image is None:
                counts["skipped_corrupt_image"] += 1
                continue
            counts["re_encoded_image"] += re_encoded
            example = dict(
                image=image, caption=caption, words=words_lib.candidate_words(caption, tag)
            )
            # The ordinal keeps keys unique where a file repeats a name (several captions of
            # one image in a captions file).
            examples.append((f"{path}#{ordinal}#{key}", example))
    except (DamagedSourceError, tarfile.TarError, EOFError, OSError) as e:
        # A truncated shard keeps the samples read before the damage.
        logging.error("%s: unreadable after %d examples (%s)", path, len(examples), e)
        counts["unreadable_source"] += 1
    counts["examples"] = len(examples)
    return examples, counts


# ---------------------------------------------------------------- the TFDS builder
class CaptionDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Image-caption pairs from local files; build one with `caption_builder(name, ...)`."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Image, caption and candidate words (NN, NNS, NNP, VB*)."}
    # No download checksums or package data to look up beside the code. (TFDS would look for
    # them through `importlib_resources`, which editable installs may lack.)
    code_path = None

    def __init__(
        self,
        *,
        sources: Mapping[str, Sequence[str]],
        tag: words_lib.Tagger | None = None,
        num_workers: int = 0,
        **kwargs,
    ):
        self._sources = {split: list(patterns) for split, patterns in sources.items()}
        self._tag = tag
        self._num_workers = num_workers
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"Image-caption pairs prepared by mixreorg_jax.data.captions from {self._sources}."
            ),
            features=FEATURES,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Local files only.
        if self._tag is None:
            words_lib.nltk_tagger()  # Fails now, with install instructions, if data is missing.
        return {
            split: self._generate_examples(split, expand_sources(patterns))
            for split, patterns in self._sources.items()
        }

    def _generate_examples(self, split: str, files: list[str]):
        prepare = functools.partial(prepare_file, tag=self._tag)
        if self._num_workers > 0:
            pool = multiprocessing.get_context("spawn").Pool(self._num_workers)
            results = pool.imap(prepare, files)
        else:
            pool, results = None, map(prepare, files)
        per_file, report = [], progress.Progress(len(files), f"preparing {split}", unit="files")
        try:
            for path, (examples, counts) in zip(files, results):
                per_file.append((split, path, counts))
                logging.info("%s: %s", path, dict(counts))
                report.update()
                yield from examples
        finally:
            if pool is not None:
                pool.terminate()
        record_counts(self.info.metadata, per_file)


class BeamCaptionDatasetBuilder(CaptionDatasetBuilder, skip_registration=True):
    """The same dataset, prepared by an Apache Beam pipeline (Dataflow, Flink, Spark, or the
    DirectRunner): one element per source file, each prepared by `prepare_file` on a worker.

    The per-file counts travel beside the examples to one JSON file in the dataset's (still
    unfinished) directory, which the launching process reads into the metadata when the
    pipeline is done; the same counts are Beam counters (namespace `mixreorg_jax.captions`)
    for the runner's monitoring.
    """

    def _split_generators(self, dl_manager, pipeline):
        import apache_beam as beam  # pylint: disable=g-import-not-at-top

        del dl_manager  # Local files only.
        # The tagger (NLTK's, loaded here) goes to the workers as data: they need no NLTK data.
        tagger = pipeline | "tagger" >> beam.Create([self._tag or words_lib.nltk_tagger()])
        splits, per_file = {}, []
        for split, patterns in self._sources.items():
            prepared = (
                pipeline
                | f"{split}_files" >> beam.Create(expand_sources(patterns))
                | f"{split}_spread" >> beam.Reshuffle()
                | f"{split}_prepare"
                >> beam.FlatMap(
                    _prepare_file_in_beam, split=split, tag=beam.pvalue.AsSingleton(tagger)
                ).with_outputs(_COUNTS, main="examples")
            )
            splits[split] = prepared.examples
            per_file.append(prepared[_COUNTS])
        _ = (
            per_file
            | "counts_together" >> beam.Flatten()
            | "counts_list" >> beam.combiners.ToList()
            | "counts_json" >> beam.Map(json.dumps)
            | "counts_write"
            >> beam.io.WriteToText(
                os.fspath(self._counts_file()), num_shards=1, shard_name_template=""
            )
        )
        return splits

    def _counts_file(self) -> epath.Path:
        return self.data_path / "source_file_counts.json"

    def _process_pipeline_result(self, pipeline_result):
        del pipeline_result
        record_counts(self.info.metadata, json.loads(self._counts_file().read_text()))
        self._counts_file().unlink()


_COUNTS = "counts"


def _prepare_file_in_beam(path: str, split: str, tag: words_lib.Tagger):
    """`prepare_file` as a Beam FlatMap: the examples, and (split, path, counts) on `_COUNTS`."""
    import apache_beam as beam  # pylint: disable=g-import-not-at-top

    examples, counts = prepare_file(path, tag)
    logging.info("%s: %s", path, dict(counts))
    for name, count in counts.items():
        beam.metrics.Metrics.counter("mixreorg_jax.captions", f"{split}/{name}").inc(count)
    yield beam.pvalue.TaggedOutput(_COUNTS, (split, path, dict(counts)))
    yield from examples


def record_counts(metadata: tfds.core.MetadataDict, per_file) -> None:
    """Stores `per_file`'s (split, source file, counts) in the dataset's metadata: the sums per
    split under `counts`, over all splits under each count's name (`COUNT_NAMES`), and the
    missing or unreadable files under `UNREADABLE_FILES`."""
    totals = metadata.setdefault("counts", {})
    unreadable = set(metadata.get(UNREADABLE_FILES, ()))
    for split, path, counts in per_file:
        split_totals = totals.setdefault(split, dict.fromkeys(COUNT_NAMES, 0))
        for name in COUNT_NAMES:
            split_totals[name] += counts[name]
        if counts["unreadable_source"]:
            unreadable.add(path)
    for split, split_totals in totals.items():
        logging.info("split %s: %s", split, split_totals)
    for name in COUNT_NAMES[1:]:
        metadata[name] = sum(c[name] for c in totals.values())
    metadata[UNREADABLE_FILES] = sorted(unreadable)


def caption_builder(
    name: str,
    sources: str | Sequence[str] | Mapping[str, Sequence[str]],
    *,
    data_dir: str,
    tag: words_lib.Tagger | None = None,
    num_workers: int = 0,
    beam: bool = False,
) -> CaptionDatasetBuilder:
    """A builder writing dataset `name` (array_record) under `data_dir`/`name`/1.0.0.

    `sources`: patterns of the train split, or {split: patterns}. `tag`: the part-of-speech
    tagger (default NLTK's). `num_workers` > 0 reads and checks files in that many processes;
    `beam` prepares them in an Apache Beam pipeline instead (`BeamCaptionDatasetBuilder`).
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"dataset name {name!r} must be snake_case: [a-z][a-z0-9_]*")
    if beam and num_workers:
        raise ValueError("num_workers is for the single-machine path; Beam has its own workers")
    if beam:
        try:
            import apache_beam  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
        except ImportError:
            raise ValueError(
                "preparing with Beam needs apache-beam: pip install 'mixreorg_jax[beam]'"
            ) from None
    if isinstance(sources, str) or not isinstance(sources, Mapping):
        sources = {"train": [sources] if isinstance(sources, str) else list(sources)}
    cls = types.new_class(
        f"CaptionDataset_{name}",
        (BeamCaptionDatasetBuilder if beam else CaptionDatasetBuilder,),
        {"skip_registration": True},
        lambda namespace: namespace.update(name=name, __module__=__name__),
    )
    return cls(
        sources=sources,
        tag=tag,
        num_workers=num_workers,
        data_dir=os.path.expanduser(data_dir),
        file_format="array_record",
    )


def prepare(
    name: str,
    sources,
    *,
    data_dir: str,
    tag: words_lib.Tagger | None = None,
    num_workers: int = 0,
    overwrite: bool = False,
    beam_runner: str | None = None,
    beam_options: Sequence[str] = (),
) -> str:
    """Prepares the dataset (if not there yet, or `overwrite`); returns its directory.

    `beam_runner` (e.g. DirectRunner, DataflowRunner, FlinkRunner, SparkRunner) or
    `beam_options` (Beam pipeline flags, `["--project=p", "--region=r", ...]`, a `--runner`
    among them) prepare it in an Apache Beam pipeline; the dataset is the same.
    """
    beam = bool(beam_runner or beam_options)
    builder = caption_builder(
        name, sources, data_dir=data_dir, tag=tag, num_workers=num_workers, beam=beam
    )
    mode = (
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if overwrite
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    config = tfds.download.DownloadConfig(download_mode=mode)
    if beam:
        from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top

        config.beam_runner = beam_runner
        config.beam_options = pipeline_options.PipelineOptions(flags=list(beam_options))
    builder.download_and_prepare(download_config=config)
    return str(builder.data_dir)
