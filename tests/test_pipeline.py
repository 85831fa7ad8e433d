"""The grain training pipeline (data/pipeline.py), augmentation (data/augment.py), prompts."""

import collections
import io
import json
import math
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mixreorg_jax.data import augment, captions, pipeline, prompts

CONTEXT = 8
NORMALISED_MIN = (0 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
NORMALISED_MAX = (1 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)


def fake_tagger(tokens):
    return [(t, "NN" if t in ("dog", "cat", "park", "ball") else "DT") for t in tokens]


class FakeTokenizer:
    """Whitespace words -> crc32 ids, zero-padded: distinct texts give distinct rows."""

    def __call__(self, texts):
        out = np.zeros((len(texts), CONTEXT), np.int32)
        for i, text in enumerate(texts):
            ids = [zlib.crc32(w.encode()) % 30000 + 1 for w in text.split()][:CONTEXT]
            out[i, : len(ids)] = ids
        return out


def photo(seed: int, width: int, height: int) -> bytes:
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_folder(folder, prefix: str, count: int, words_per_caption=("dog", "park", "ball")):
    folder.mkdir()
    lines = []
    for i in range(count):
        seed = zlib.crc32(f"{prefix}{i}".encode())
        (folder / f"{i}.jpg").write_bytes(photo(seed, 40 + i, 30 + 2 * i))
        nouns = " and ".join(words_per_caption[: i % (len(words_per_caption) + 1)])
        lines.append(f"{i}.jpg\t{prefix}{i} the {nouns}")
    (folder / "captions.tsv").write_text("\n".join(lines) + "\n")
    return folder / "captions.tsv"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    dirs = {}
    for name, count in (("aaa", 12), ("bbb", 8)):
        tsv = write_folder(root / name, name, count)
        dirs[name] = captions.prepare(name, str(tsv), data_dir=str(root / "tfds"), tag=fake_tagger)
    return dirs


def data_config(dirs, weights=(1.0,), **overrides):
    if isinstance(weights, str):
        weights = (weights,)
    config = pipeline.get_config_defaults()
    config.dir = ",".join(dirs)
    config.weights = ",".join(str(w) for w in weights)
    config.image_size = 16
    config.context_length = CONTEXT
    config.batch_size = 4
    config.include_caption = True
    config.read_threads = 2
    for key, value in overrides.items():
        config[key] = value
    return config


def iterator(config, process_index=0, process_count=1):
    return pipeline.make_train_iterator(
        config, process_index=process_index, process_count=process_count, tokenizer=FakeTokenizer()
    )


# ---------------------------------------------------------------- pipeline
def test_batch_shapes_dtypes_and_tokens(datasets):
    it = iterator(data_config([datasets["aaa"]]))
    assert it.num_examples == 12 and it.dataset_sizes == [12]
    batch = next(it)
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["tokens"].shape == (4, CONTEXT) and batch["tokens"].dtype == np.int32
    assert batch["prompt_tokens"].shape == (4, 3, CONTEXT)
    assert batch["prompt_tokens"].dtype == np.int32
    assert batch["prompt_ids"].shape == (4, 3) and batch["prompt_ids"].dtype == np.int32
    np.testing.assert_array_equal(batch["tokens"], FakeTokenizer()(list(batch["caption"])))
    for caption, prompt_tokens in zip(batch["caption"], batch["prompt_tokens"]):
        # Example i's caption has i % 4 nouns; the prompts are padded with the caption.
        num_words = int(caption.split()[0][3:]) % 4
        caption_row = FakeTokenizer()([str(caption)])[0]
        assert sum((row == caption_row).all() for row in prompt_tokens) == 3 - num_words
    for caption, ids in zip(batch["caption"], batch["prompt_ids"]):
        assert (ids == -1).sum() == 3 - int(caption.split()[0][3:]) % 4


def test_prompt_template_set_is_configurable(datasets):
    batch = next(iterator(data_config([datasets["aaa"]], prompt_templates="photo")))
    photo_prefix = FakeTokenizer()(["a photo of a"])[0, :4]
    for ids, rows in zip(batch["prompt_ids"], batch["prompt_tokens"]):
        for word_id, row in zip(ids, rows):
            assert (row[:4] == photo_prefix).all() == (word_id >= 0)
    with pytest.raises(ValueError, match="unknown prompt template set 'imagenet'"):
        iterator(data_config([datasets["aaa"]], prompt_templates="imagenet"))


def test_image_level_labels_mark_the_caption_words_of_the_label_vocabulary(datasets):
    assert "labels" not in next(iterator(data_config([datasets["aaa"]])))
    batch = next(iterator(data_config([datasets["aaa"]], labels=("ball", "dog", "cat"))))
    assert batch["labels"].shape == (4, 3) and batch["labels"].dtype == np.float32
    for caption, labels in zip(batch["caption"], batch["labels"]):
        num_words = int(caption.split()[0][3:]) % 4  # the first of ("dog", "park", "ball")
        np.testing.assert_array_equal(labels, [num_words >= 3, num_words >= 1, 0])


def test_two_processes_see_every_example_once_per_epoch(datasets):
    config = data_config([datasets["aaa"]])  # 12 examples, 2 per process per batch
    epochs = {0: [], 1: []}
    for process in range(2):
        it = iterator(config, process, 2)
        for epoch in range(2):
            epochs[epoch].append([c for _ in range(3) for c in next(it)["caption"]])
    everything = sorted(f"aaa{i}" for i in range(12))
    for epoch in range(2):
        seen = [str(c).split()[0] for process_captions in epochs[epoch] for c in process_captions]
        assert sorted(seen) == everything
    # Each process's shard is reshuffled every epoch.
    assert epochs[0][0] != epochs[1][0] or epochs[0][1] != epochs[1][1]


def test_restored_iterator_continues_identically(datasets):
    config = data_config([datasets["aaa"], datasets["bbb"]], weights=(1.0, 1.0))
    assert config.augment.random_resized_crop and config.augment.randaugment
    assert config.augment.random_erasing > 0
    original = iterator(config, 1, 2)
    for _ in range(5):  # past the end of an epoch of the smaller shard
        next(original)
    state = json.loads(json.dumps(original.get_state()))
    assert len(json.dumps(state)) < 200
    expected = [next(original) for _ in range(3)]
    restored = iterator(config, 1, 2)
    next(restored)  # a different position, overwritten by set_state
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_mixing_follows_weights(datasets):
    config = data_config([datasets["aaa"], datasets["bbb"]], weights=(3.0, 1.0), batch_size=8)
    config.augment.randaugment = False
    it = iterator(config)
    counts = collections.Counter(str(c)[:3] for _ in range(10) for c in next(it)["caption"])
    assert counts["aaa"] + counts["bbb"] == 80
    assert abs(counts["aaa"] / 80 - 0.75) < 0.05


def test_same_seed_same_batches_other_seed_differs(datasets):
    first = next(iterator(data_config([datasets["aaa"]])))
    again = next(iterator(data_config([datasets["aaa"]])))
    other = next(iterator(data_config([datasets["aaa"]], shuffle_seed=1)))
    np.testing.assert_array_equal(first["image"], again["image"])
    assert not np.array_equal(first["image"], other["image"])


def test_config_errors_name_the_problem(datasets, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        iterator(data_config([str(tmp_path / "nowhere")]))
    with pytest.raises(ValueError, match="not divisible by the process count 3"):
        iterator(data_config([datasets["aaa"]]), 0, 3)
    with pytest.raises(ValueError, match="no split 'validation'"):
        config = data_config([datasets["aaa"]])
        config.split = "validation"
        iterator(config)
    with pytest.raises(ValueError, match="config.data.dir is empty"):
        iterator(data_config([" "]))
    with pytest.raises(ValueError, match="config.data.weights has 1 entries for 2 directories"):
        iterator(data_config([datasets["aaa"], datasets["bbb"]], weights=(1.0,)))
    with pytest.raises(ValueError, match="config.data.split has 2 entries for 1 directories"):
        iterator(data_config([datasets["aaa"]], split="train,validation"))
    with pytest.raises(ValueError, match="'heavy' is not a number"):
        iterator(data_config([datasets["aaa"]], weights="heavy"))
    with pytest.raises(ValueError, match="weight -1.0; it must be > 0"):
        iterator(data_config([datasets["aaa"]], weights=(-1.0,)))
    with pytest.raises(ValueError, match="needs config.data.synthetic_dir"):
        iterator(data_config(["synthetic"], synthetic_dir=""))

    class NoWords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "caption": tfds.features.Text(),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield "0", {"image": photo(0, 8, 8), "caption": "a dog"}

    builder = NoWords(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    with pytest.raises(ValueError, match=r"lacks feature\(s\) \['words'\]") as error:
        iterator(data_config([str(tmp_path / "no_words")]))
    assert str(builder.data_dir) in str(error.value)


def test_version_parent_and_per_dataset_splits(datasets):
    version_dir = datasets["aaa"]
    config = data_config([version_dir.rsplit("/", 1)[0], datasets["bbb"]], weights=(2, 1))
    config.split = "train, train"
    specs = pipeline.resolve_datasets(config)
    assert [(s.dir, s.split, s.weight) for s in specs] == [
        (version_dir, "train", 2.0),
        (datasets["bbb"], "train", 1.0),
    ]
    assert next(iterator(config))["image"].shape == (4, 16, 16, 3)


# ---------------------------------------------------------------- prompts
def test_prompt_templates_and_construction():
    assert len(prompts.IMAGENET_TEMPLATES) == 80 == len(set(prompts.IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for t in prompts.IMAGENET_TEMPLATES)
    rng = np.random.default_rng(0)
    words = ["dog", "cat", "ball", "park", "tree"]
    for _ in range(20):
        texts, ids = prompts.multi_label_prompts(words, "the caption", rng)
        used = [w for t in texts for w in words if f" {w}" in t or t.startswith(w)]
        assert len(texts) == 3 and len(set(used)) == 3  # three different words
        assert ids == [prompts.word_id(w) for w in used]
        assert all(
            any(t == tmpl.format(w) for tmpl in prompts.IMAGENET_TEMPLATES for w in words)
            for t in texts
        )
    texts, ids = prompts.multi_label_prompts(["dog"], "the caption", rng)
    assert texts[1:] == ["the caption"] * 2 and "dog" in texts[0]
    assert ids == [prompts.word_id("dog"), -1, -1]
    assert prompts.multi_label_prompts([], "the caption", rng) == (["the caption"] * 3, [-1] * 3)
    assert prompts.word_id("Dog") == prompts.word_id("dog") != prompts.word_id("cat")
    assert 0 <= prompts.word_id("dog") < 2**31
    texts, _ = prompts.multi_label_prompts(words, "c", rng, template_set=prompts.templates("photo"))
    assert all(t.startswith("a photo of a ") for t in texts)
    a = prompts.multi_label_prompts(words, "c", np.random.default_rng(7))
    assert a == prompts.multi_label_prompts(words, "c", np.random.default_rng(7))


# ---------------------------------------------------------------- augmentation
IMAGE = photo(5, 96, 64)
ALL_OFF = augment.AugmentOptions(
    random_resized_crop=False, flip=False, randaugment=False, random_erasing=0.0
)


def test_train_image_shapes_ranges_and_determinism():
    options = augment.AugmentOptions(random_erasing=0.0)
    for seed in range(10):
        x = augment.train_image(IMAGE, np.random.default_rng(seed), size=24, options=options)
        assert x.shape == (24, 24, 3) and x.dtype == np.float32
        assert (x >= NORMALISED_MIN - 1e-5).all() and (x <= NORMALISED_MAX + 1e-5).all()
    full = augment.AugmentOptions()
    a = augment.train_image(IMAGE, np.random.default_rng(3), size=24, options=full)
    b = augment.train_image(IMAGE, np.random.default_rng(3), size=24, options=full)
    c = augment.train_image(IMAGE, np.random.default_rng(4), size=24, options=full)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_all_switches_off_is_the_eval_centre_crop():
    reference = augment.eval_image(IMAGE, size=24)
    for seed in range(3):
        np.testing.assert_array_equal(
            augment.train_image(IMAGE, np.random.default_rng(seed), size=24, options=ALL_OFF),
            reference,
        )
    # The eval crop is the centre square of side 0.875 * short side (exactly so when decoded at
    # full resolution).
    reference = augment.eval_image(IMAGE, size=24, jpeg_draft=False)
    full = Image.open(io.BytesIO(IMAGE)).convert("RGB")
    side = 64 * 0.875
    box = ((96 - side) / 2, (64 - side) / 2, (96 + side) / 2, (64 + side) / 2)
    expected = augment.normalize(full.resize((24, 24), Image.Resampling.BILINEAR, box=box))
    np.testing.assert_allclose(reference, expected, atol=1e-6)


def test_flip_switch():
    reference = augment.eval_image(IMAGE, size=24)
    options = ALL_OFF.__class__(**{**ALL_OFF.__dict__, "flip": True})
    flipped = [
        np.array_equal(
            augment.train_image(IMAGE, np.random.default_rng(s), size=24, options=options),
            reference[:, ::-1],
        )
        for s in range(20)
    ]
    assert 3 < sum(flipped) < 17  # about half


def test_randaugment_switch_and_every_op():
    reference = augment.eval_image(IMAGE, size=24)
    options = ALL_OFF.__class__(
        **{**ALL_OFF.__dict__, "randaugment": True, "randaugment_prob": 1.0}
    )
    changed = [
        not np.array_equal(
            augment.train_image(IMAGE, np.random.default_rng(s), size=24, options=options),
            reference,
        )
        for s in range(10)
    ]
    assert sum(changed) >= 7  # timm's ops all change a photo at m ~ 9
    base = Image.open(io.BytesIO(IMAGE)).convert("RGB").resize((24, 24))
    for name, op in augment.RANDAUGMENT_OPS.items():
        out = op(base, 9.0, np.random.default_rng(0))
        assert out.size == base.size and out.mode == "RGB", name
        assert np.array_equal(np.asarray(out), np.asarray(base)) == (name == "identity"), name
    # Magnitude 0 leaves the image alone for ops whose strength is the magnitude (not timm's
    # PosterizeIncreasing, which keeps 4 bits at 0; tests/test_augment.py checks it).
    for name in (
        "rotate",
        "color",
        "contrast",
        "brightness",
        "sharpness",
        "shear_x",
        "shear_y",
        "translate_x",
        "translate_y",
    ):
        out = augment.RANDAUGMENT_OPS[name](base, 0.0, np.random.default_rng(0))
        assert np.abs(np.asarray(out, int) - np.asarray(base, int)).max() <= 1, name


def test_random_erasing_switch():
    reference = augment.eval_image(IMAGE, size=32)
    options = ALL_OFF.__class__(**{**ALL_OFF.__dict__, "random_erasing": 1.0})
    for seed in range(5):
        x = augment.train_image(IMAGE, np.random.default_rng(seed), size=32, options=options)
        erased = (x != reference).any(-1)
        rows, cols = np.nonzero(erased)
        box_area = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        assert 0.02 * 32 * 32 * 0.5 <= box_area <= 32 * 32 / 3 * 1.5
        assert erased.sum() > 0.9 * box_area  # one filled rectangle
    x = np.zeros((32, 32, 3), np.float32)
    assert augment.random_erasing(x, np.random.default_rng(0), prob=0.0) is x


def test_random_resized_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(300):
        width, height = int(rng.integers(20, 200)), int(rng.integers(20, 200))
        left, top, w, h = augment.random_resized_crop_box(
            width, height, rng, (0.08, 1.0), (3 / 4, 4 / 3)
        )
        assert left >= 0 and left + w <= width and top >= 0 and top + h <= height
        assert w * h >= 0.08 * width * height * 0.8
    # A very wide image falls back to the widest centred crop of the largest allowed ratio.
    left, top, w, h = augment.random_resized_crop_box(
        1000, 10, np.random.default_rng(0), (0.99, 1.0), (3 / 4, 4 / 3)
    )
    assert (w, h) == (13, 10) and left == (1000 - 13) // 2


def test_jpeg_draft_decoding_is_close_to_full_decoding():
    big = photo(9, 800, 600)
    fast = augment.eval_image(big, size=32, jpeg_draft=True)
    slow = augment.eval_image(big, size=32, jpeg_draft=False)
    assert np.abs(fast - slow).mean() < 0.05
    assert math.isclose(float(fast.mean()), float(slow.mean()), abs_tol=0.02)


def test_unknown_augment_option_is_an_error():
    with pytest.raises(ValueError, match="randaugment_magnitdue"):
        augment.AugmentOptions.from_config({"randaugment_magnitdue": 5})
    options = augment.AugmentOptions.from_config({"crop_scale": [0.5, 1.0]})
    assert options.crop_scale == (0.5, 1.0) and options.flip
