"""Zero-shot classification: top-1/top-5 against numpy from the model's own embeddings, from a
class-folder tree and from a TFDS split, the class-name rules, the eval binary, and what
`evaluation.create` does with missing data and `enabled=False`."""

import io
import json
import logging
import os
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from mixreorg_jax import evaluate, evaluation
from mixreorg_jax.data import augment
from mixreorg_jax.data.tokenizer import get_tokenizer
from mixreorg_jax.evaluation import classification
from mixreorg_jax.formats import model_files
from mixreorg_jax.models import groupvit, presets
from mixreorg_jax.training import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Folder names in sorted order: class k is FOLDERS[k]; '_' reads as a space.
FOLDERS = ("aeroplane", "black_cat", "cow", "dog", "green_grass", "horse", "sheep")
IMAGES_PER_CLASS = 2
TEMPLATES = ("a photo of a {}.", "a drawing of the {}.")
CONFIG = presets.get_model_config("tiny")


def random_variables(config: ml_collections.ConfigDict, seed: int = 0) -> dict:
    """{'params', 'batch_stats'} of GroupViT(config) drawn in numpy (initialising the model would
    compile both towers for nothing); BatchNorm variances and LayerNorm scales near 1."""
    rng = np.random.default_rng(seed)

    def random_leaf(path, leaf):
        name = jax.tree_util.keystr(path)
        if "'var'" in name or "'scale'" in name:
            return (1 + 0.1 * rng.random(leaf.shape)).astype(leaf.dtype)
        return (rng.standard_normal(leaf.shape) * 0.3).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(random_leaf, model_files.abstract_variables(config))


def encoded_image(seed: int, fmt: str) -> bytes:
    """A noisy picture with a coloured block, its size and colours varying with `seed`."""
    rng = np.random.default_rng(seed)
    height, width = rng.integers(28, 60, 2)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = rng.integers(0, 256, 3)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format=fmt)
    return out.getvalue()


def write_class_folders(root, folders=FOLDERS, per_class=IMAGES_PER_CLASS) -> list:
    """ROOT/CLASS/*.{JPEG,png} (and a file that is not an image); returns [(bytes, label)] in
    the order of the folder tree (classes sorted, then file names)."""
    items = []
    for label, folder in enumerate(folders):
        os.makedirs(os.path.join(root, folder))
        for k in range(per_class):
            suffix, fmt = (".JPEG", "JPEG") if k % 2 == 0 else (".png", "PNG")
            data = encoded_image(100 * label + k, fmt)
            with open(os.path.join(root, folder, f"img{k}{suffix}"), "wb") as f:
                f.write(data)
            items.append((data, label))
        with open(os.path.join(root, folder, "notes.txt"), "w") as f:
            f.write("not an image\n")
    return items


@pytest.fixture(scope="module")
def variables():
    return random_variables(CONFIG)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("classes"))
    return root, write_class_folders(root)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, folder):
    """The same images and labels as a TFDS split (array_record, in the folder tree's order)."""
    _, items = folder
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=FOLDERS),
        }
    )
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_classes",
        version="1.0.0",
        features=features,
        split_datasets={
            "validation": [
                (k, dict(image=data, label=label)) for k, (data, label) in enumerate(items)
            ]
        },
        data_dir=data_dir,
        file_format="array_record",
        disable_shuffling=True,
    )
    return data_dir


@jax.jit
def image_embeddings(variables, images):
    """The model's own embeddings of normalised images, straight from GroupViT."""
    model = groupvit.GroupViT(CONFIG)
    return model.apply(variables, images, method=groupvit.GroupViT.encode_image)["embedding"]


@jax.jit
def text_embeddings(variables, tokens):
    model = groupvit.GroupViT(CONFIG)
    return model.apply(variables, tokens, method=groupvit.GroupViT.encode_text)["embedding"]


def reference(variables, items, class_names, templates=TEMPLATES) -> dict:
    """Top-1 and top-5 computed in numpy from the model's embeddings of the eval crops and the
    template-averaged class texts."""
    crops = np.stack([augment.eval_image(data, size=CONFIG.image_size) for data, _ in items])
    image_emb = np.asarray(image_embeddings(variables, crops), np.float64)
    texts = [t.format(name) for name in class_names for t in templates]
    tokens = get_tokenizer(CONFIG.context_length)(texts)
    text_emb = np.asarray(text_embeddings(variables, tokens), np.float64)
    text_emb = text_emb.reshape(len(class_names), len(templates), -1)
    class_emb = text_emb.mean(axis=1)
    class_emb /= np.linalg.norm(class_emb, axis=1, keepdims=True)
    order = np.argsort(-(image_emb @ class_emb.T), axis=1)
    labels = np.array([label for _, label in items])
    return dict(
        top1=float(np.mean(order[:, 0] == labels)),
        top5=float(np.mean([label in row[:5] for label, row in zip(labels, order)])),
    )


def make_evaluator(**fields) -> classification.Evaluator:
    eval_config = ml_collections.ConfigDict(dict(templates=TEMPLATES, batch=5, **fields))
    return classification.Evaluator(eval_config, model=groupvit.GroupViT(CONFIG))


def as_state(variables):
    return {"params": {"model": variables["params"]}, "batch_stats": variables["batch_stats"]}


def test_folder_and_tfds_split_match_numpy(variables, folder, tfds_dir, caplog):
    root, items = folder
    names = [name.replace("_", " ") for name in FOLDERS]
    expected = reference(variables, items, names)
    assert expected["top5"] > 0 and expected["top1"] < expected["top5"] < 1  # not trivial

    evaluator = make_evaluator(data_dir=root)
    assert evaluator.class_names == names  # sorted folders, '_' as a space
    assert evaluator.embedder.batch == 8  # 5 rounded up to the 8 devices: 14 = 8 + 6 (padded)
    caplog.set_level(logging.INFO)
    results = evaluator.evaluate(variables)
    assert results["num_images"] == len(items) and results["split"] is None
    done = f"classification {root}: {len(items)}/{len(items)} images (100%) in "
    assert any(r.getMessage().startswith(done) for r in caplog.records)  # progress with an ETA
    assert results["metrics"] == pytest.approx(expected, abs=1e-12)
    assert results["protocol"]["local_devices"] == 8
    # As the training loop calls it: its mesh set, the state on it.
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
    with jax.set_mesh(mesh):
        state = jax.device_put(as_state(variables), sharding.replicated(mesh))
        assert evaluator.run(state) == results["metrics"]

    from_tfds = make_evaluator(tfds_name="tiny_classes", data_dir=tfds_dir, split="validation")
    assert from_tfds.class_names == names
    assert from_tfds.evaluate(variables)["metrics"] == results["metrics"]

    # The first five images only (this process's share of them: all, with one process).
    first = make_evaluator(data_dir=root, max_images=5).evaluate(variables)
    assert first["num_images"] == 5
    assert first["metrics"] == pytest.approx(reference(variables, items[:5], names), abs=1e-12)


def test_wordnet_ids_need_class_names(variables, tmp_path):
    wnids = ("n01440764", "n01443537")
    items = write_class_folders(str(tmp_path / "val"), wnids, per_class=1)
    with pytest.raises(
        ValueError, match=r"WordNet ids \(n01440764, \.\.\.\): give their names in class_names"
    ):
        make_evaluator(data_dir=str(tmp_path / "val"))

    names_file = tmp_path / "names.txt"
    names_file.write_text("tench\ngreat_white shark\n")
    evaluator = make_evaluator(data_dir=str(tmp_path / "val"), class_names=str(names_file))
    assert evaluator.class_names == ["tench", "great_white shark"]  # the file's, as they are
    assert evaluator.evaluate(variables)["metrics"] == pytest.approx(
        reference(variables, items, ["tench", "great_white shark"]), abs=1e-12
    )

    names_file.write_text("tench\n")
    with pytest.raises(ValueError, match="has 1 class names for 2 classes"):
        make_evaluator(data_dir=str(tmp_path / "val"), class_names=str(names_file))


def test_tfds_split_needs_labels_and_random_access(tmp_path):
    features = dict(image=tfds.features.Image(shape=(None, None, 3)))
    for name, file_format, more_features, message in (
        ("no_labels", "array_record", {}, "needs an 'image' and a 'label' \\(ClassLabel\\)"),
        (
            "tfrecords",
            "tfrecord",
            {"label": tfds.features.ClassLabel(names=("a",))},
            "array_record",
        ),
    ):
        example = dict(image=encoded_image(0, "PNG"), **({"label": 0} if more_features else {}))
        tfds.dataset_builders.store_as_tfds_dataset(
            name=name,
            version="1.0.0",
            features=tfds.features.FeaturesDict({**features, **more_features}),
            split_datasets={"validation": [(0, example)]},
            data_dir=str(tmp_path),
            file_format=file_format,
        )
        with pytest.raises(ValueError, match=message):
            make_evaluator(tfds_name=name, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no split 'test'"):
        make_evaluator(tfds_name="tfrecords", data_dir=str(tmp_path), split="test")


def test_binary_runs_the_imagenet_config(variables, folder, tmp_path, capsys):
    root, items = folder
    checkpoint = str(tmp_path / "model")
    model_files.save_model(checkpoint, variables, CONFIG)
    argv = [
        "evaluate",
        f"--config={REPO}/configs/eval/imagenet.py",
        f"--config.data_dir={root}",
        "--config.batch=5",
        f"--checkpoint={checkpoint}",
        f"--output_dir={tmp_path / 'out'}",
    ]
    flag_values = flags.FlagValues()
    evaluate.define_flags(flag_values, argv)
    flag_values(argv)
    config = flag_values.config
    assert config.type == "classification" and config.templates == ("imagenet80",)
    assert config.crop_fraction == 0.875
    config.templates = TEMPLATES  # 2 templates rather than 80: faster, the same code
    returned = evaluate.run(config, flag_values.checkpoint, flag_values.output_dir)
    with open(tmp_path / "out" / "results.json") as f:
        assert json.load(f) == returned
    names = [name.replace("_", " ") for name in FOLDERS]
    assert returned["metrics"] == pytest.approx(reference(variables, items, names), abs=1e-12)
    summary = capsys.readouterr().out.splitlines()[-2]
    assert summary.startswith(f"{root}, 14 images, top1 ") and ", top5 " in summary


def test_create_checks_data_up_front_and_skips_disabled_entries(tmp_path):
    model = groupvit.GroupViT(CONFIG)
    missing = str(tmp_path / "nowhere")
    for name, entry, path in (
        ("imagenet", dict(type="classification", data_dir=missing), missing),
        (
            "imagenet_tfds",
            dict(type="classification", tfds_name="tiny_x", data_dir=missing),
            missing,
        ),
        ("voc", dict(type="segmentation", dataset="voc", data_dir=missing), missing),
        ("retrieval", dict(data_dir=missing), missing),
    ):
        with pytest.raises(FileNotFoundError) as error:
            evaluation.create(ml_collections.ConfigDict({name: entry}), model=model)
        text = str(error.value)
        assert text.startswith(f"config.evals.{name}: ") and "\n" not in text
        assert path in text
        assert text.endswith(f"--config.evals.{name}.enabled=False")

        entry["enabled"] = False
        assert evaluation.create(ml_collections.ConfigDict({name: entry}), model=model) == []

    with pytest.raises(
        ValueError, match="config.evals.imagenet: classification evaluator: unknown field 'bacth'"
    ):
        evaluation.create(
            ml_collections.ConfigDict({"imagenet": dict(type="classification", bacth=3)}),
            model=model,
        )
    with pytest.raises(
        ValueError,
        match="unknown evaluator type 'detection'; known: classification, retrieval, segmentation",
    ):
        evaluation.create(ml_collections.ConfigDict({"detection": {}}), model=model)
    package = os.path.join(REPO, "mixreorg_jax", "evaluation")
    with_evaluator = [
        name[:-3]
        for name in sorted(os.listdir(package))
        if name.endswith(".py") and "\nclass Evaluator" in pathlib.Path(package, name).read_text()
    ]
    assert {k: f"mixreorg_jax.evaluation.{k}" for k in with_evaluator} == evaluation.KNOWN
