"""The synthetic world: determinism, mask/caption agreement, colour independence, TFDS round trip,
and its programs (prepare_synthetic, experiments/world)."""

import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from mixreorg_jax import prepare_synthetic
from mixreorg_jax.data import synthetic, synthetic_tfds
from mixreorg_jax.experiments import world as world_program

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY = dict(train_size=24, validation_size=8, test_size=6)


def _same_example(a, b):
    return (
        np.array_equal(a["image"], b["image"])
        and np.array_equal(a["mask"], b["mask"])
        and a["caption"] == b["caption"]
        and a["words"] == b["words"]
    )


def test_an_example_is_a_pure_function_of_seed_split_and_index():
    config = synthetic.WorldConfig()
    reference = synthetic.generate_example(17, "train", config)
    # Out of order, after other draws, with an equal but distinct config object.
    synthetic.generate_example(3, "test", config)
    again = synthetic.generate_example(17, "train", synthetic.WorldConfig())
    assert _same_example(reference, again)
    assert reference["image"].tobytes() == again["image"].tobytes()
    for other in (
        synthetic.generate_example(17, "validation", config),
        synthetic.generate_example(17, "test", config),
        synthetic.generate_example(18, "train", config),
        synthetic.generate_example(17, "train", synthetic.WorldConfig(seed=1)),
    ):
        assert not np.array_equal(reference["image"], other["image"])


def test_shapes_dtypes_label_range_and_class_names():
    assert synthetic.CLASS_NAMES == [
        "background",
        "circle",
        "square",
        "triangle",
        "star",
        "cross",
        "ring",
        "heart",
        "crescent",
    ]
    for config in (
        synthetic.WorldConfig(),
        synthetic.WorldConfig(image_size=48, num_classes=12, max_objects=4),
    ):
        names = synthetic.class_names(config)
        assert len(names) == config.num_classes + 1 and names[0] == "background"
        seen = set()
        for index in range(40):
            example = synthetic.generate_example(index, "test", config)
            size = config.image_size
            assert example["image"].shape == (size, size, 3) and example["image"].dtype == np.uint8
            assert example["mask"].shape == (size, size) and example["mask"].dtype == np.uint8
            assert example["mask"].max() <= config.num_classes  # no ignore (255) pixels either
            assert config.min_objects <= len(example["objects"]) <= config.max_objects
            seen |= set(np.unique(example["mask"]).tolist())
        assert 0 in seen and len(seen) > config.num_classes // 2


def test_bad_configs_and_arguments_are_errors():
    with pytest.raises(ValueError, match="num_classes"):
        synthetic.WorldConfig(num_classes=len(synthetic.SHAPE_NAMES) + 1)
    with pytest.raises(ValueError, match="min_objects"):
        synthetic.WorldConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="Unknown split"):
        synthetic.generate_example(0, "dev")
    with pytest.raises(ValueError, match="imag_size"):
        synthetic_tfds.world_config(imag_size=32)
    with pytest.raises(ValueError, match="does not divide"):
        world_program.patch_majority_labels(np.zeros((64, 64), np.uint8), 5)


@pytest.mark.parametrize("synonym_prob", [0.0, 1.0])
def test_caption_words_name_exactly_the_classes_in_the_mask(synonym_prob):
    config = synthetic.WorldConfig(synonym_prob=synonym_prob)
    names = synthetic.class_names(config)
    for index in range(150):
        example = synthetic.generate_example(index, "train", config)
        in_mask = {names[c] for c in np.unique(example["mask"]) if c != 0}
        in_words = {synthetic.WORD_TO_CLASS[w] for w in example["words"]}
        assert in_mask == in_words, (example["caption"], example["words"], in_mask)
        written = {synthetic.SYNONYMS.get(n, n) if synonym_prob else n for n in in_mask}
        assert sorted(example["words"]) == sorted(written)  # one word per class, no repeats
        for word in example["words"]:
            assert word == word.lower() and word in example["caption"]
        for obj in example["objects"]:  # every named object is clearly visible
            assert obj["pixels"] >= 30


def _mutual_information(a, b):
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1)
    joint /= joint.sum()
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    nonzero = joint > 0
    return float(np.sum(joint[nonzero] * np.log(joint[nonzero] / outer[nonzero])))


def _permutation_p_value(a, b, rng, permutations=200):
    observed = _mutual_information(a, b)
    null = [_mutual_information(a, rng.permutation(b)) for _ in range(permutations)]
    return observed, (1 + sum(n >= observed for n in null)) / (1 + permutations)


def test_colour_and_texture_carry_no_information_about_the_class():
    objects = [o for i in range(300) for o in synthetic.generate_example(i, "train")["objects"]]
    classes = np.array([o["class_id"] for o in objects])
    colours = np.array([o["colour_id"] for o in objects])
    textures = np.array([synthetic.TEXTURES.index(o["texture"]) for o in objects])
    assert len(objects) > 500
    rng = np.random.default_rng(0)
    class_entropy = np.log(len(np.unique(classes)))
    for attribute in (colours, textures):
        observed, p_value = _permutation_p_value(classes, attribute, rng)
        assert observed < 0.05 * class_entropy and p_value > 0.01, (observed, p_value)
    # The statistic does see a dependence of the prototype's kind (75% of objects in their
    # class's colour), so the check above can fail.
    tied = np.where(rng.random(len(classes)) < 0.75, classes, colours)
    observed, p_value = _permutation_p_value(classes, tied, rng)
    assert observed > 0.3 * class_entropy and p_value < 0.01


def test_class_textures_tie_the_pattern_but_not_the_colour_to_the_class():
    config = synthetic.WorldConfig(image_size=32, class_texture_prob=0.5)
    objects = [
        o for i in range(300) for o in synthetic.generate_example(i, "train", config)["objects"]
    ]
    signature = [o["texture"] == synthetic.CLASS_TEXTURES[o["class_id"] - 1] for o in objects]
    assert 0.4 < np.mean(signature) < 0.6
    assert all(o["texture"] in synthetic.TEXTURES for o, s in zip(objects, signature) if not s)
    classes = np.array([o["class_id"] for o in objects])
    colours = np.array([o["colour_id"] for o in objects])
    observed, p_value = _permutation_p_value(classes, colours, np.random.default_rng(0))
    assert observed < 0.05 * np.log(len(np.unique(classes))) and p_value > 0.01, (observed, p_value)
    # The pattern is visible: striped classes alternate between two shades along their axis.
    example = synthetic.generate_example(
        0,
        "train",
        synthetic.WorldConfig(
            image_size=64, class_texture_prob=1.0, noise_std=0.0, min_objects=1, max_objects=1
        ),
    )
    [obj] = example["objects"]
    pixels = example["image"][example["mask"] == obj["class_id"]]
    assert len(np.unique(pixels.round(-1), axis=0)) >= (1 if obj["texture"] == "solid" else 2)


def test_colour_only_classifiers_are_near_chance():
    config = synthetic.WorldConfig()
    result = world_program.colour_only_baseline(config, num_train=150, num_test=60)
    assert result["object_accuracy"] < 2 * result["chance_accuracy"]
    assert result["foreground_pixel_accuracy"] < 2 * result["chance_accuracy"]
    assert result["pixel_miou"] < 0.3
    # The mIoU is ops/miou.py's: all background has IoU = its share of the pixels, each class in
    # the ground truth 0, and the classes in neither are left out.
    masks = np.stack([synthetic.generate_example(i, "test", config)["mask"] for i in range(60)])
    present = np.unique(masks)
    assert present[0] == 0
    expected = np.mean(masks == 0) / len(present)
    np.testing.assert_allclose(result["all_background_miou"], expected, rtol=1e-12)


def test_patch_label_ceiling_is_exact_at_patch_1_and_falls_with_patch_size():
    config = synthetic.WorldConfig(image_size=32)
    assert world_program.patch_label_ceiling(config, 1, num_examples=10, mode="nearest") == 1.0
    assert world_program.patch_label_ceiling(config, 1, num_examples=10, mode="bilinear") == 1.0
    at_4, at_8 = (world_program.patch_label_ceiling(config, p, num_examples=30) for p in (4, 8))
    assert 0.4 < at_8 < at_4 < 1.0
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :5] = 3  # the top-left 4x4 patch is all 3; top-right has 4 of 16 pixels at 3
    np.testing.assert_array_equal(world_program.patch_majority_labels(mask, 4), [[3, 0], [0, 0]])


@pytest.mark.parametrize("shape", [(5, 7), (6, 4, 3)])
def test_png_bytes_decode_exactly(shape):
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for level in (0, 1):
        decoded = np.asarray(Image.open(io.BytesIO(synthetic_tfds.png_bytes(array, level))))
        np.testing.assert_array_equal(decoded, array)


def _record_bytes(dataset_dir):
    files = sorted(f for f in os.listdir(dataset_dir) if ".array_record" in f)
    assert [f.split("-")[1].split(".")[0] for f in files] == ["test", "train", "validation"]
    return {f: open(os.path.join(dataset_dir, f), "rb").read() for f in files}


def test_prepare_reads_back_exactly_and_is_reproducible(tmp_path, monkeypatch):
    path = synthetic_tfds.prepare_synthetic(str(tmp_path / "a"), num_workers=1, **TINY)
    world = synthetic.WorldConfig(**TINY)

    train = tfds.builder_from_directory(path).as_data_source("train")
    assert len(train) == TINY["train_size"]
    for index in range(TINY["train_size"]):
        record, expected = train[index], synthetic.generate_example(index, "train", world)
        np.testing.assert_array_equal(record["image"], expected["image"])
        assert record["caption"].decode() == expected["caption"]
        assert [w.decode() for w in record["words"]] == expected["words"]

    for split in ("validation", "test"):
        dataset = synthetic_tfds.SyntheticSegmentation(path, split)
        assert dataset.has_background and dataset.class_names == synthetic.CLASS_NAMES
        assert len(dataset) == TINY[f"{split}_size"] and dataset.world == world
        for index in range(len(dataset)):
            item, expected = dataset[index], synthetic.generate_example(index, split, world)
            np.testing.assert_array_equal(item["image"], expected["image"])
            np.testing.assert_array_equal(item["label"], expected["mask"])
            assert (
                item["label"].shape == expected["mask"].shape
                and item["id"] == f"{split}_{index:06d}"
            )

    # Reuse: same config -> same directory, files untouched; another config -> another directory.
    stamps = {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in os.listdir(path)}
    assert synthetic_tfds.prepare_synthetic(str(tmp_path / "a"), **TINY) == path
    assert stamps == {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in os.listdir(path)}
    from_root = synthetic_tfds.SyntheticSegmentation(str(tmp_path / "a"), "test", **TINY)
    assert len(from_root) == TINY["test_size"]
    other = synthetic_tfds.prepare_synthetic(
        str(tmp_path / "a"), num_workers=1, **{**TINY, "seed": 1}
    )
    assert other != path and _record_bytes(other) != _record_bytes(path)

    # Another directory, generated by two worker processes in small chunks: identical files.
    monkeypatch.setattr(synthetic_tfds, "_MIN_EXAMPLES_PER_WORKER", 1)
    monkeypatch.setattr(synthetic_tfds, "_CHUNK", 5)
    parallel = synthetic_tfds.prepare_synthetic(str(tmp_path / "b"), num_workers=2, **TINY)
    assert _record_bytes(parallel) == _record_bytes(path)


def run_program(program, argv: list[str]) -> None:
    """`python -m PROGRAM ARGV` in this process: its flags on their own FlagValues (the global
    ones hold other programs' flags of the same names)."""
    flag_values = flags.FlagValues()
    program.define_flags(flag_values)
    program.main(flag_values([program.__name__, *argv]), flag_values)


def test_prepare_synthetic_program_takes_every_world_field_as_a_flag(tmp_path, capsys):
    sizes = ["--train_size", "4", "--validation_size", "0", "--test_size", "2"]
    run_program(
        prepare_synthetic,
        ["--data_dir", str(tmp_path), "--image_size", "32", "--max_rotation", "0.5", *sizes],
    )
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    world = dict(image_size=32, max_rotation=0.5, train_size=4, validation_size=0, test_size=2)
    path = synthetic_tfds.prepare_synthetic(str(tmp_path), **world)  # reused, not prepared again
    assert printed.startswith(path + " (")
    assert synthetic_tfds.SyntheticSegmentation(path).world == synthetic.WorldConfig(**world)

    with pytest.raises(SystemExit, match=r"^error: image_size must be in \[16, 1024\], got 8$"):
        run_program(prepare_synthetic, ["--data_dir", str(tmp_path), "--image_size", "8"])
    with pytest.raises(SystemExit, match=r"^error: unexpected arguments \['32'\]$"):
        run_program(prepare_synthetic, ["--data_dir", str(tmp_path), "32"])


def test_world_program_prints_speed_ceilings_and_colour_scores(capsys):
    run_program(world_program, ["--num_examples", "8", "--image_size", "32", "--patch_sizes", "8"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("generation (one process): ")
    assert lines[1].startswith("patch 8, nearest: perfect-patch-label mIoU 0.")
    assert lines[2].startswith("patch 8, bilinear: perfect-patch-label mIoU 0.")
    assert lines[3].startswith("colour only: {'pixel_miou': ") and len(lines) == 4
    with pytest.raises(SystemExit, match="^error: patch_size 5 does not divide image size 32$"):
        run_program(world_program, ["--image_size", "32", "--patch_sizes", "5"])


def test_prepare_synthetic_from_the_command_line(tmp_path):
    """The real program, started as users start it (its own process, flags parsed by absl)."""
    world = dict(image_size=16, train_size=3, validation_size=0, test_size=1)
    result = subprocess.run(
        [sys.executable, "-m", "mixreorg_jax.prepare_synthetic", f"--data_dir={tmp_path}"]
        + [f"--{name}={value}" for name, value in world.items()],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    path = result.stdout.strip().splitlines()[-1].split(" (")[0]
    assert path == synthetic_tfds.prepare_synthetic(str(tmp_path), **world)
    assert len(tfds.builder_from_directory(path).as_data_source("train")) == 3
