"""Preparing real image-caption data (data/captions.py, data/words.py, the prepare_captions
program) from tiny fixture trees."""

import io
import json
import logging
import os
import struct
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

from mixreorg_jax import prepare_captions
from mixreorg_jax.data import captions
from mixreorg_jax.data import words as words_lib

FAKE_TAGS = {
    "dog": "NN",
    "dogs": "NNS",
    "cat": "NN",
    "park": "NN",
    "Paris": "NNP",
    "runs": "VBZ",
    "running": "VBG",
    "sat": "VBD",
    "big": "JJ",
    "the": "DT",
}


def fake_tagger(tokens):
    """A stand-in for nltk.pos_tag: a fixed lexicon, everything else a determiner."""
    return [(t, FAKE_TAGS.get(t, "DT")) for t in tokens]


def smooth_image(seed: int, size=(20, 16)) -> Image.Image:
    """A smooth random colour field (JPEG keeps it well, unlike noise)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (3, 3, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)


def jpeg(seed: int, size=(20, 16), mode="RGB") -> bytes:
    image = smooth_image(seed, size)
    if mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def png(seed: int, mode="RGB") -> bytes:
    image = smooth_image(seed, (10, 12))
    if mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def masked_crc32c(data: bytes) -> bytes:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    crc ^= 0xFFFFFFFF
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC32C, the data, its masked CRC32C."""
    length = struct.pack("<Q", len(data))
    return length + masked_crc32c(length) + data + masked_crc32c(data)


def read_back(directory: str, split="train") -> dict[str, dict]:
    """caption -> record with the image's stored bytes and the words as str."""
    builder = tfds.builder_from_directory(directory)
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    records = {}
    for i in range(len(source)):
        record = source[i]
        caption = record["caption"].decode()
        assert caption not in records
        records[caption] = dict(image=record["image"], words=[w.decode() for w in record["words"]])
    return records


def add_member(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_candidate_words_tags_lowercase_and_dedupe():
    caption = "The big dog runs, the Dog sat in Paris with 2 cats and dogs!"
    assert words_lib.candidate_words(caption, fake_tagger) == [
        "dog",
        "runs",
        "sat",
        "paris",
        "dogs",
    ]
    assert words_lib.candidate_words("", fake_tagger) == []
    # Punctuation or digits tagged as nouns are not words.
    assert words_lib.candidate_words("dog 2019 ...", lambda toks: [(t, "NN") for t in toks]) == [
        "dog"
    ]


def test_missing_tagger_data_says_how_to_install(monkeypatch):
    def missing(*args, **kwargs):
        raise LookupError("Resource averaged_perceptron_tagger_eng not found.")

    monkeypatch.setattr(words_lib.nltk.tag, "PerceptronTagger", missing)
    words_lib.nltk_tagger.cache_clear()
    with pytest.raises(
        RuntimeError, match="python -m nltk.downloader averaged_perceptron_tagger_eng"
    ):
        words_lib.candidate_words("a dog")
    words_lib.nltk_tagger.cache_clear()


def test_expand_sources_braces_and_globs(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    names = [
        os.path.basename(f) for f in captions.expand_sources(str(tmp_path / "{00000..00001}.tar"))
    ]
    assert names == ["00000.tar", "00001.tar"]
    assert len(captions.expand_sources([str(tmp_path / "*.tar")])) == 3
    with pytest.raises(FileNotFoundError, match="00007"):
        captions.expand_sources(str(tmp_path / "{00005..00007}.tar"))


def test_webdataset_tar_round_trip_with_bad_samples(tmp_path):
    good = {f"{i:04d}": (jpeg(i), f"a dog runs in the park {i}") for i in range(4)}
    cmyk = jpeg(10, mode="CMYK")
    palette_png = png(11, mode="P")
    grey = jpeg(12, mode="L")
    whole = jpeg(13)
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, (image, caption) in good.items():
            add_member(tar, f"{key}.jpg", image)
            add_member(tar, f"{key}.txt", caption.encode())
            add_member(tar, f"{key}.json", json.dumps({"key": key}).encode())
        add_member(tar, "0100.jpg", whole[: len(whole) // 2])  # truncated JPEG
        add_member(tar, "0100.txt", b"a truncated cat")
        add_member(tar, "0101.jpg", b"not an image at all")
        add_member(tar, "0101.txt", b"a garbage cat")
        add_member(tar, "0102.txt", b"a cat with no image")
        add_member(tar, "0103.jpg", jpeg(20))
        add_member(tar, "0103.txt", b"   \n")  # empty caption
        add_member(tar, "0104.jpg", jpeg(21))
        add_member(tar, "0104.txt", b"a caf\xe9 in Paris")  # Latin-1, not UTF-8
        add_member(tar, "0105.jpg", jpeg(22))  # no caption
        add_member(tar, "0200.jpg", cmyk)
        add_member(tar, "0200.txt", b"a CMYK cat")
        add_member(tar, "0201.png", palette_png)
        add_member(tar, "0201.txt", "a palette cat \u00e9t\u00e9".encode())
        add_member(tar, "0202.jpg", grey)
        add_member(tar, "0202.txt", b"a grey dog sat")

    directory = captions.prepare(
        "shards",
        str(tmp_path / "{00000..00000}.tar"),
        data_dir=str(tmp_path / "tfds"),
        tag=fake_tagger,
    )
    records = read_back(directory)
    expected = {caption: image for image, caption in good.values()}
    assert set(records) == set(expected) | {
        "a CMYK cat",
        "a palette cat \u00e9t\u00e9",
        "a grey dog sat",
    }
    for caption, image in expected.items():
        assert records[caption]["image"] == image  # stored as is, not re-encoded
        assert records[caption]["words"] == ["dog", "runs", "park"]
    assert records["a grey dog sat"]["image"] == grey
    assert records["a grey dog sat"]["words"] == ["dog", "sat"]
    assert records["a palette cat \u00e9t\u00e9"]["words"] == ["cat"]
    for caption, original in (("a CMYK cat", cmyk), ("a palette cat \u00e9t\u00e9", palette_png)):
        stored = Image.open(io.BytesIO(records[caption]["image"]))
        assert stored.format == "JPEG" and stored.mode == "RGB"
        reference = np.asarray(Image.open(io.BytesIO(original)).convert("RGB"), np.float32)
        assert np.abs(np.asarray(stored, np.float32) - reference).mean() < 8

    builder = tfds.builder_from_directory(directory)
    metadata = builder.info.metadata
    assert metadata["skipped_corrupt_image"] == 3  # truncated, garbage, missing
    assert metadata["skipped_bad_caption"] == 3  # empty, non-UTF-8, missing
    assert metadata["re_encoded_image"] == 2
    assert metadata["counts"]["train"]["examples"] == 7
    assert builder.info.splits["train"].num_examples == 7

    # Default decoding gives the pixels of the stored bytes; the name + data_dir route works too.
    decoded = tfds.builder("shards", data_dir=str(tmp_path / "tfds")).as_data_source("train")
    for i in range(len(decoded)):
        record = decoded[i]
        stored = records[record["caption"].decode()]["image"]
        reference = np.asarray(Image.open(io.BytesIO(stored)).convert("RGB"))
        np.testing.assert_array_equal(record["image"], reference)


def test_folder_with_tsv_csv_and_jsonl(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    images = {f"img{i}.jpg": jpeg(30 + i) for i in range(3)}
    for name, data in images.items():
        (folder / name).write_bytes(data)
    (folder / "pic.png").write_bytes(png(40))
    (folder / "captions.tsv").write_bytes(
        b"filename\tcaption\n"
        b"img0.jpg\tthe cat sat in the park\n"
        b"img1.jpg\tdogs running\n"
        b"missing.jpg\ta lost dog\n"
        b"img2.jpg\t\n"
        b"img1.jpg\tcaf\xe9 (Latin-1)\n"
        b"pic.png\ta cat in Paris\n"
        b"img0.jpg\ta second caption of the cat\n"
    )
    (folder / "more.jsonl").write_text(
        json.dumps({"file": "img2.jpg", "caption": "a cat (jsonl)"}) + "\n\n"
    )
    (folder / "more.csv").write_text('filename,text\nimg1.jpg,"a dog, big (csv)"\n')

    directory = captions.prepare(
        "folder",
        [str(folder / "captions.tsv"), str(folder / "more.*")],
        data_dir=str(tmp_path / "tfds"),
        tag=fake_tagger,
    )
    records = read_back(directory)
    assert sorted(records) == sorted(
        [
            "the cat sat in the park",
            "dogs running",
            "a cat in Paris",
            "a second caption of the cat",
            "a cat (jsonl)",
            "a dog, big (csv)",
        ]
    )
    assert records["a second caption of the cat"]["image"] == images["img0.jpg"]
    assert records["the cat sat in the park"]["image"] == images["img0.jpg"]
    assert records["the cat sat in the park"]["words"] == ["cat", "sat", "park"]
    assert records["dogs running"]["words"] == ["dogs", "running"]
    assert records["a cat in Paris"]["image"] == png(40)  # RGB PNG kept as is
    assert records["a cat in Paris"]["words"] == ["cat", "paris"]
    assert records["a cat (jsonl)"]["image"] == images["img2.jpg"]
    assert records["a dog, big (csv)"]["image"] == images["img1.jpg"]
    metadata = tfds.builder_from_directory(directory).info.metadata
    assert metadata["skipped_corrupt_image"] == 1
    assert metadata["skipped_bad_caption"] == 2  # empty, non-UTF-8


def test_parquet_and_tfrecord_like_img2dataset(tmp_path):
    table = pa.table(
        {
            "key": ["000", "001", "002"],
            "jpg": [jpeg(50), None, jpeg(52)],  # img2dataset leaves failed downloads empty
            "caption": ["a dog in the park", "a lost cat", "a cat sat"],
        }
    )
    pq.write_table(table, tmp_path / "00000.parquet")
    with open(tmp_path / "00000.tfrecord", "wb") as f:
        for key, image, caption in (("100", jpeg(60), b"dogs running"), ("101", jpeg(61), b"")):
            example = tf_example_pb2.Example()
            for name, value in (("key", key.encode()), ("jpg", image), ("txt", caption)):
                example.features.feature[name].bytes_list.value.append(value)
            f.write(tfrecord(example.SerializeToString()))
    directory = captions.prepare(
        "img2dataset_outputs",
        [str(tmp_path / "*.parquet"), str(tmp_path / "*.tfrecord")],
        data_dir=str(tmp_path / "tfds"),
        tag=fake_tagger,
    )
    records = read_back(directory)
    assert sorted(records) == ["a cat sat", "a dog in the park", "dogs running"]
    assert records["a dog in the park"]["image"] == jpeg(50)
    assert records["a cat sat"] == dict(image=jpeg(52), words=["cat", "sat"])
    assert records["dogs running"] == dict(image=jpeg(60), words=["dogs", "running"])
    metadata = tfds.builder_from_directory(directory).info.metadata
    assert (metadata["skipped_corrupt_image"], metadata["skipped_bad_caption"]) == (1, 1)


def run_prepare_captions(argv: list[str]) -> None:
    """`python -m mixreorg_jax.prepare_captions ARGV` in this process: its flags on their own
    FlagValues (the global ones hold other programs' flags of the same names)."""
    flag_values = flags.FlagValues()
    prepare_captions.define_flags(flag_values)
    prepare_captions.main(flag_values(["prepare_captions", *argv]), flag_values)


def test_command_line_and_worker_processes(tmp_path, monkeypatch, capsys):
    for shard in range(2):
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as tar:
            for i in range(3):
                add_member(tar, f"{shard}{i}.jpg", jpeg(100 * shard + i))
                add_member(tar, f"{shard}{i}.txt", f"cat {shard} {i}".encode())
    # A damaged shard keeps the samples before the damage and is counted.
    complete = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(complete[: len(complete) - 3000])
    (tmp_path / "00003.parquet").write_bytes(b"PAR1 but not really")
    # The command line uses NLTK's tagger; here the fake one stands in for it.
    monkeypatch.setattr(words_lib, "nltk_tagger", lambda: fake_tagger)
    run_prepare_captions(
        [
            "--source",
            str(tmp_path / "{00000..00001}.tar"),
            "--data_dir",
            str(tmp_path / "tfds"),
            "--name",
            "cli",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped_corrupt_image"] == 0 and summary["counts"]["train"]["examples"] == 6
    records = read_back(summary["dir"])
    assert sorted(records) == sorted(f"cat {s} {i}" for s in range(2) for i in range(3))
    assert all(r["words"] == ["cat"] for r in records.values())
    damaged = captions.prepare(
        "damaged",
        [str(tmp_path / "00002.tar"), str(tmp_path / "00003.parquet")],
        data_dir=str(tmp_path / "tfds"),
        tag=fake_tagger,
    )
    counts = tfds.builder_from_directory(damaged).info.metadata["counts"]["train"]
    assert counts["unreadable_source"] == 2 and 0 < counts["examples"] < 3
    assert set(read_back(damaged)) < {f"cat 1 {i}" for i in range(3)}

    # Two worker processes give the same dataset.
    directory = captions.prepare(
        "workers",
        str(tmp_path / "0000[01].tar"),
        data_dir=str(tmp_path / "tfds"),
        tag=fake_tagger,
        num_workers=2,
    )
    assert read_back(directory) == records


def test_bad_name_and_unknown_source_type(tmp_path):
    with pytest.raises(ValueError, match="snake_case"):
        captions.caption_builder("CC-12M", "x.tar", data_dir=str(tmp_path))
    (tmp_path / "data.zip").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown source type"):
        captions.prepare(
            "zipped", str(tmp_path / "data.zip"), data_dir=str(tmp_path / "tfds"), tag=fake_tagger
        )


def test_command_line_errors_are_one_line(tmp_path, monkeypatch):
    def missing(*args, **kwargs):
        raise LookupError("Resource averaged_perceptron_tagger_eng not found.")

    (tmp_path / "captions.tsv").write_text("a.jpg\ta dog\n")
    argv = ["--source", str(tmp_path / "captions.tsv"), "--data_dir", str(tmp_path / "tfds")]
    with pytest.raises(SystemExit, match="^error: dataset name 'CC-12M' must be snake_case"):
        run_prepare_captions([*argv, "--name", "CC-12M"])
    monkeypatch.setattr(words_lib.nltk.tag, "PerceptronTagger", missing)
    words_lib.nltk_tagger.cache_clear()
    try:
        with pytest.raises(
            SystemExit,
            match="^error: NLTK's part-of-speech tagger data .*; "
            "python -m nltk.downloader averaged_perceptron_tagger_eng;",
        ):
            run_prepare_captions([*argv, "--name", "untagged"])
    finally:
        words_lib.nltk_tagger.cache_clear()
    monkeypatch.setattr(words_lib, "nltk_tagger", lambda: fake_tagger)
    with pytest.raises(SystemExit, match=r"^error: no source files match '.*/missing\.tar'$"):
        run_prepare_captions(
            ["--source", str(tmp_path / "missing.tar"), "--data_dir", str(tmp_path), "--name", "x"]
        )


def test_beam_pipeline_writes_the_single_machine_dataset(tmp_path, monkeypatch, capsys, caplog):
    """The DirectRunner over shards with bad samples, a truncated shard and a missing one: the
    same examples in the same order, the same counts, the same unreadable files named."""
    for shard in range(4):
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as tar:
            for i in range(5):
                add_member(tar, f"{shard}{i}.jpg", jpeg(10 * shard + i))
                add_member(tar, f"{shard}{i}.txt", f"a dog {shard} {i}".encode())
            add_member(tar, f"{shard}9.jpg", b"not an image")
            add_member(tar, f"{shard}9.txt", b"a broken cat")
            add_member(tar, f"{shard}8.jpg", jpeg(99))
            add_member(tar, f"{shard}8.txt", b"  ")
    with tarfile.open(tmp_path / "00003.tar") as tar:  # cut in the middle of 32.jpg
        cut = tar.getmember("32.jpg").offset_data + 100
    (tmp_path / "00003.tar").write_bytes((tmp_path / "00003.tar").read_bytes()[:cut])
    sources = str(tmp_path / "{00000..00004}.tar")  # 00004 is missing
    caplog.set_level(logging.INFO)
    single = captions.prepare("pairs", sources, data_dir=str(tmp_path / "one"), tag=fake_tagger)
    done = "preparing train: 5/5 files (100%) in "
    assert any(r.getMessage().startswith(done) for r in caplog.records)  # progress with an ETA
    monkeypatch.setattr(words_lib, "nltk_tagger", lambda: fake_tagger)
    run_prepare_captions(
        [
            *("--source", sources, "--data_dir", str(tmp_path / "beam"), "--name", "pairs"),
            "--beam_runner=DirectRunner",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    def examples(directory):
        builder = tfds.builder_from_directory(directory)
        source = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
        return [
            (e["image"], e["caption"], list(e["words"]))
            for e in map(source.__getitem__, range(len(source)))
        ]

    expected = examples(single)
    assert len(expected) == 17  # 3 whole shards of 5, the truncated one's first 2
    assert examples(summary["dir"]) == expected
    # The runner and its options passed through, as for Dataflow: the same again.
    run_prepare_captions(
        [
            *("--source", sources, "--data_dir", str(tmp_path / "opts"), "--name", "pairs"),
            "--beam_pipeline_options=runner=DirectRunner,direct_num_workers=2",
        ]
    )
    with_options = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert examples(with_options["dir"]) == expected
    assert {k: v for k, v in with_options.items() if k != "dir"} == {
        k: v for k, v in summary.items() if k != "dir"
    }
    metadata = tfds.builder_from_directory(single).info.metadata
    assert metadata[captions.UNREADABLE_FILES] == [
        str(tmp_path / "00003.tar"),
        str(tmp_path / "00004.tar"),
    ]
    assert (metadata["skipped_corrupt_image"], metadata["skipped_bad_caption"]) == (3, 3)
    assert metadata["counts"]["train"]["examples"] == len(expected)
    assert {k: summary[k] for k in metadata} == dict(metadata)

    # Without apache-beam, or with worker processes too: one line each.
    argv = ["--source", sources, "--data_dir", str(tmp_path / "x"), "--name", "pairs"]
    with pytest.raises(SystemExit, match="num_workers is for the single-machine path"):
        run_prepare_captions([*argv, "--beam_runner=DirectRunner", "--num_workers=2"])
    monkeypatch.setitem(sys.modules, "apache_beam", None)
    with pytest.raises(SystemExit, match=r"pip install 'mixreorg_jax\[beam\]'"):
        run_prepare_captions([*argv, "--beam_runner=DirectRunner"])
