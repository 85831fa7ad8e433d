"""Segmentation eval set readers on tiny fixture trees in each set's standard layout."""

import os
import sys
import types

import numpy as np
import pytest
from PIL import Image

from mixreorg_jax.data import segmentation_sets as sets


def _write_jpeg(path, rng, hw):
    # Smooth, with a distinct level per channel: near-lossless as a JPEG, and a BGR/RGB swap or a
    # wrong file could not pass the closeness check below.
    rows, cols = np.meshgrid(np.arange(hw[0]), np.arange(hw[1]), indexing="ij")
    image = np.array([40, 128, 220]) + rng.integers(0, 20, 3) + 2 * (rows + cols)[..., None]
    image = image.astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path, quality=100, subsampling=0)
    return image


def _write_label(path, label, palette=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    label_image = Image.fromarray(label, mode="L")
    if palette:
        label_image = label_image.convert("P")
        label_image.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
    label_image.save(path)


def _build_tree(
    root, image_dir, label_dir, label_suffix, ids, rng, max_label, palette=False, split_file=None
):
    """Writes images + labels; returns {id: (image array, label array, image path)}."""
    written = {}
    for k, i in enumerate(ids):
        hw = (10 + k, 14 - k)
        image_path = os.path.join(root, image_dir, i + ".jpg")
        image = _write_jpeg(image_path, rng, hw)
        label = rng.integers(0, max_label + 1, hw).astype(np.uint8)
        label[0, :3] = 255
        label[-1, -2:] = 0
        _write_label(os.path.join(root, label_dir, i + label_suffix), label, palette)
        written[i] = (image, label, image_path)
    if split_file:
        os.makedirs(os.path.dirname(os.path.join(root, split_file)), exist_ok=True)
        with open(os.path.join(root, split_file), "w") as f:
            f.write("\n".join(ids) + "\n")
    return written


def _check_examples(dataset, written, expected_ids, label_fn):
    assert len(dataset) == len(expected_ids)
    for index, example_id in enumerate(expected_ids):
        example = dataset[index]
        assert example["id"] == example_id
        image, label, image_path = written[example_id]
        assert example["image"].dtype == np.uint8 and example["image"].shape == image.shape
        assert np.abs(example["image"].astype(int) - image).max() <= 3  # JPEG, nearly lossless
        # Exactly the decoded file's RGB pixels.
        with Image.open(image_path) as f:
            np.testing.assert_array_equal(example["image"], np.asarray(f.convert("RGB")))
        assert example["label"].dtype == np.uint8
        np.testing.assert_array_equal(example["label"], label_fn(label))


def _reference_reduce_zero(label):
    out = label.astype(int) - 1
    out[(label == 0) | (label == 255)] = 255
    return out.astype(np.uint8)


def test_voc(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "VOCdevkit" / "VOC2012"
    ids = ["2007_000033", "2007_000042", "2007_000061"]
    written = _build_tree(
        str(root),
        "JPEGImages",
        "SegmentationClass",
        ".png",
        ids,
        rng,
        20,
        palette=True,
        split_file="ImageSets/Segmentation/val.txt",
    )
    with Image.open(root / "SegmentationClass" / (ids[0] + ".png")) as f:
        assert f.mode == "P"
    dataset = sets.get_segmentation_dataset("voc", str(tmp_path))
    _check_examples(dataset, written, ids, lambda label: label)
    assert dataset.has_background and len(dataset.class_names) == 21
    assert dataset.class_names[0] == "background"
    assert {"table", "plant", "monitor"} <= set(dataset.class_names)
    assert not {"diningtable", "pottedplant", "tvmonitor"} & set(dataset.class_names)
    # data_dir may also be the set's own folder.
    assert sets.get_segmentation_dataset("voc", str(root)).ids == ids


def test_pascal_context_60_and_59(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "VOCdevkit" / "VOC2010"
    ids = ["2008_000002", "2008_000008"]
    written = _build_tree(
        str(root),
        "JPEGImages",
        "SegmentationClassContext",
        ".png",
        ids,
        rng,
        59,
        split_file="ImageSets/SegmentationContext/val.txt",
    )
    context60 = sets.get_segmentation_dataset("context60", str(tmp_path))
    _check_examples(context60, written, ids, lambda label: label)
    assert context60.has_background and len(context60.class_names) == 60
    assert context60.class_names[0] == "background" and context60.class_names[1] == "airplane"

    context59 = sets.get_segmentation_dataset("context59", str(tmp_path))
    _check_examples(context59, written, ids, _reference_reduce_zero)
    assert not context59.has_background and len(context59.class_names) == 59
    assert context59.class_names == context60.class_names[1:]
    label = context59[0]["label"]
    assert (label[-1, -2:] == 255).all() and (label[0, :3] == 255).all()
    assert sets.DATASET_DEFAULTS["context60"]["bg_thresh"] == 0.35
    assert sets.DATASET_DEFAULTS["context59"]["bg_thresh"] is None


def test_coco_object(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "coco"
    ids = ["000000000285", "000000000139", "000000000632"]
    written = _build_tree(
        str(root), "images/val2017", "annotations/val2017", "_instanceTrainIds.png", ids, rng, 80
    )
    # A training image must not leak into val.
    _write_jpeg(str(root / "images" / "train2017" / "000000000009.jpg"), rng, (8, 8))
    dataset = sets.get_segmentation_dataset("coco_object", str(tmp_path))
    _check_examples(dataset, written, sorted(ids), lambda label: label)
    assert dataset.has_background and len(dataset.class_names) == 81
    assert dataset.class_names[:3] == ["background", "person", "bicycle"]
    assert dataset.class_names[-1] == "toothbrush"
    assert sets.DATASET_DEFAULTS["coco_object"]["bg_thresh"] == 0.95


def test_ade20k(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "ADEChallengeData2016"
    ids = ["ADE_val_00000002", "ADE_val_00000001"]
    written = _build_tree(
        str(root), "images/validation", "annotations/validation", ".png", ids, rng, 150
    )
    dataset = sets.get_segmentation_dataset("ade20k", str(tmp_path))
    _check_examples(dataset, written, sorted(ids), _reference_reduce_zero)
    assert not dataset.has_background and len(dataset.class_names) == 150
    assert dataset.class_names[:3] == ["wall", "building", "sky"]
    label = dataset[0]["label"]
    assert set(np.unique(label)) <= set(range(150)) | {255}
    assert sets.DATASET_DEFAULTS["ade20k"]["bg_thresh"] is None


def test_missing_paths_name_the_expected_location(tmp_path):
    with pytest.raises(FileNotFoundError, match="VOCdevkit/VOC2012/JPEGImages"):
        sets.get_segmentation_dataset("voc", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016/images/validation"):
        sets.get_segmentation_dataset("ade20k", str(tmp_path))

    rng = np.random.default_rng(4)
    root = tmp_path / "VOCdevkit" / "VOC2012"
    _build_tree(str(root), "JPEGImages", "SegmentationClass", ".png", ["a", "b"], rng, 20)
    with pytest.raises(FileNotFoundError, match="ImageSets/Segmentation/val.txt"):
        sets.get_segmentation_dataset("voc", str(tmp_path))
    os.makedirs(root / "ImageSets" / "Segmentation")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\nc\n")
    with pytest.raises(FileNotFoundError, match="c.jpg"):
        sets.get_segmentation_dataset("voc", str(tmp_path))

    coco = tmp_path / "coco"
    _write_jpeg(str(coco / "images" / "val2017" / "x.jpg"), rng, (8, 8))
    _write_label(str(coco / "annotations" / "val2017" / "x.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(FileNotFoundError, match="x_instanceTrainIds.png"):
        sets.get_segmentation_dataset("coco_object", str(tmp_path))


def test_bad_label_png_and_index(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "ADEChallengeData2016"
    _build_tree(str(root), "images/validation", "annotations/validation", ".png", ["a"], rng, 150)
    dataset = sets.get_segmentation_dataset("ade20k", str(tmp_path))
    with pytest.raises(IndexError):
        dataset[1]
    Image.fromarray(np.zeros((10, 14, 3), np.uint8)).save(root / "annotations/validation/a.png")
    with pytest.raises(ValueError, match="index"):
        dataset[0]


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(
        ValueError, match="voc, context60, context59, coco_object, ade20k, synthetic"
    ):
        sets.get_segmentation_dataset("cityscapes", str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        sets.get_segmentation_dataset("coco_object", str(tmp_path), split="test")


def test_synthetic_dispatches_lazily(tmp_path, monkeypatch):
    calls = []

    class FakeSyntheticSegmentation:
        def __init__(self, data_dir, split):
            calls.append((data_dir, split))

    fake_module = types.ModuleType("mixreorg_jax.data.synthetic_tfds")
    fake_module.SyntheticSegmentation = FakeSyntheticSegmentation
    monkeypatch.setitem(sys.modules, "mixreorg_jax.data.synthetic_tfds", fake_module)
    dataset = sets.get_segmentation_dataset("synthetic", str(tmp_path), split="test")
    assert isinstance(dataset, FakeSyntheticSegmentation)
    sets.get_segmentation_dataset("synthetic", str(tmp_path))
    assert calls == [(str(tmp_path), "test"), (str(tmp_path), "validation")]
