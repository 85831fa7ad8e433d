"""The segmentation evaluator and the eval binary, end to end on a tiny VOC-layout fixture.

The checkpoint is a random `transformers.GroupViTModel` of a tiny config, saved with
save_pretrained and converted with `huggingface.from_hf`; windows are 32 px, the model's input size.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from absl import flags
from PIL import Image

from mixreorg_jax import evaluate, evaluation
from mixreorg_jax.data import segmentation_sets
from mixreorg_jax.evaluation import inference, segmentation, segmentation_settings, visualize
from mixreorg_jax.formats import huggingface
from mixreorg_jax.models import groupvit
from mixreorg_jax.ops import miou as miou_ops
from mixreorg_jax.training import checkpointing, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs", "eval")
# 32 px windows at stride 16 for the tiny model; a short side of 32 px.
SMALL_PROTOCOL = dict(short_side=32, window=32, stride=16)
# Landscape at the short side already, and portrait to be resized to (43, 32); the perfect-
# prediction test reuses the first size (and so its compilations).
IMAGE_SIZES = ((32, 48), (48, 36), (32, 48))
NUM_CLASSES = len(segmentation_sets.VOC_CLASSES)


def _tiny_hf_config():
    return transformers.GroupViTConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=128,
            depths=[2, 1, 1],
            num_hidden_layers=4,
            num_group_tokens=[8, 4, 0],
            num_output_groups=[8, 4, 4],
            num_attention_heads=2,
            image_size=32,
            patch_size=4,
            assign_mlp_ratio=[0.5, 4],
        ),
        projection_dim=32,
        projection_intermediate_dim=64,
    )


def write_hf_checkpoint(directory: str, seed: int = 0) -> str:
    """A random HF GroupViT, converted; weights scaled up so that groups and classes vary."""
    torch.manual_seed(seed)
    model = transformers.GroupViTModel(_tiny_hf_config()).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.ndim >= 2 and tensor.is_floating_point():
                tensor.copy_(
                    torch.randn(tensor.shape, generator=generator) * tensor.shape[-1] ** -0.5
                )
    hf_dir = os.path.join(directory, "hf")
    model.save_pretrained(hf_dir)
    checkpoint = os.path.join(directory, "converted")
    huggingface.from_hf(hf_dir, checkpoint)
    return checkpoint


def write_voc_fixture(root: str, sizes, seed: int = 0, splits=("val",)) -> dict:
    """VOCdevkit/VOC2012 with JPEG images, index-PNG masks (blobs of a few classes, a 255 border
    line) and split files; returns {id: label}."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "VOCdevkit", "VOC2012")
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    labels = {}
    for k, (height, width) in enumerate(sizes):
        image_id = f"2007_{k:06d}"
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        label = np.zeros((height, width), np.uint8)
        rows, cols = np.mgrid[:height, :width]
        for class_id in rng.choice(np.arange(1, NUM_CLASSES), 3, replace=False):
            cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(6, 16)
            blob = (rows - cy) ** 2 + (cols - cx) ** 2 < r * r
            label[blob] = class_id
            image[blob] = rng.integers(0, 256, 3)
        label[height // 2, :] = 255
        Image.fromarray(image).save(os.path.join(base, "JPEGImages", image_id + ".jpg"), quality=95)
        Image.fromarray(label, mode="L").save(
            os.path.join(base, "SegmentationClass", image_id + ".png")
        )
        labels[image_id] = label
    for split in splits:
        with open(os.path.join(base, "ImageSets", "Segmentation", split + ".txt"), "w") as f:
            f.write("\n".join(labels) + "\n")
    return labels


@pytest.fixture(scope="module", autouse=True)
def cli_with_bad_input(tmp_path_factory):
    """The real command line with a missing checkpoint, started first so that its start-up
    (imports) runs beside the other tests; `test_bad_input_is_a_one_line_error` checks it."""
    missing = tmp_path_factory.mktemp("missing")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mixreorg_jax.evaluate",
            f"--config={CONFIGS}/voc.py",
            f"--config.data_dir={missing}",
            f"--checkpoint={missing}/no_model",
            f"--output_dir={missing}/out",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_hf_checkpoint(str(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("voc"))
    return root, write_voc_fixture(root, IMAGE_SIZES, splits=("val", "train"))


def load_eval_config(name: str, arg=None) -> ml_collections.ConfigDict:
    """configs/eval/NAME.py's get_config(arg), loaded from its path like the binary does."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "python -m mixreorg_jax.evaluate" in module.__doc__
    return module.get_config(arg)


def run_binary(argv: list[str]) -> dict:
    """The binary's flags parsed from ARGV, then its `run`, in this process (which shares the
    compiled functions between tests; `main` only adds log filtering and `jax.distributed`
    start-up)."""
    argv = ["evaluate"] + argv
    flag_values = flags.FlagValues()
    evaluate.define_flags(flag_values, argv)
    flag_values(argv)
    return evaluate.run(flag_values.config, flag_values.checkpoint, flag_values.output_dir)


@pytest.fixture(scope="module")
def voc_results(checkpoint, voc, tmp_path_factory):
    root, _ = voc
    output_dir = str(tmp_path_factory.mktemp("eval_voc"))
    returned = run_binary(
        [
            f"--config={CONFIGS}/voc.py",
            f"--config.data_dir={root}",
            "--config.short_side=32",
            "--config.window=32",
            "--config.stride=16",
            f"--config.save_predictions={len(IMAGE_SIZES)}",
            f"--checkpoint={checkpoint}",
            f"--output_dir={output_dir}",
        ]
    )
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    assert results == returned
    return output_dir, results


def test_binary_writes_complete_results_consistent_with_the_saved_masks(voc, voc_results):
    root, labels = voc
    output_dir, results = voc_results
    assert results["dataset"] == "voc" and results["split"] == "val"
    assert results["num_images"] == len(IMAGE_SIZES)
    assert results["bg_thresh"] == 0.95
    assert results["class_names"] == list(segmentation_sets.VOC_CLASSES)
    assert set(results["per_class_iou"]) == set(segmentation_sets.VOC_CLASSES)
    assert results["protocol"]["templates"] == ["a photo of a {}."]
    assert (results["protocol"]["window"], results["protocol"]["stride"]) == (32, 16)
    assert set(results["baselines"]) == {"all_background", "top_class", "group_oracle"}
    for baseline in results["baselines"].values():
        assert 0.0 <= baseline["miou"] <= 1.0
    assert results["images_per_second"] > 0

    # mIoU and the confusion matrix recomputed from the saved predicted masks.
    total = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for image_id, label in labels.items():
        predicted = np.array(Image.open(os.path.join(output_dir, "predictions", image_id + ".png")))
        assert predicted.shape == label.shape
        total += np.asarray(
            miou_ops.confusion_matrix(jnp.asarray(predicted), jnp.asarray(label), NUM_CLASSES)
        )
        for picture in (image_id + ".png", image_id + "_groups.png"):
            assert os.path.getsize(os.path.join(output_dir, "pictures", picture)) > 0
    np.testing.assert_array_equal(total, results["confusion_matrix"])
    assert np.count_nonzero(total.sum(axis=0)) >= 3  # background and at least two classes
    miou, per_class = miou_ops.miou_from_confusion(total)
    assert results["miou"] == pytest.approx(miou, abs=1e-12)
    for name, iou in zip(segmentation_sets.VOC_CLASSES, per_class):
        expected = None if np.isnan(iou) else pytest.approx(iou, abs=1e-12)
        assert results["per_class_iou"][name] == expected

    # The all-background baseline by hand: background IoU = its share of the labelled pixels.
    valid = np.concatenate([label[label != 255] for label in labels.values()])
    present = len(np.unique(valid))
    assert results["baselines"]["all_background"]["miou"] == pytest.approx(
        np.mean(valid == 0) / present
    )


def _one_device_mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))


def test_eight_devices_equal_one_device(checkpoint, voc, voc_results):
    root, _ = voc
    _, results = voc_results
    assert results["protocol"]["local_devices"] == 8
    variables, model_config = checkpointing.load_variables(checkpoint)
    one_device = _one_device_mesh()
    # Also the 'auto' threshold's plumbing: swept on 'train' (the same images here), which
    # leaves one candidate, the fixed run's 0.95.
    evaluator = segmentation.Evaluator(
        ml_collections.ConfigDict(
            dict(
                dataset="voc",
                data_dir=root,
                bg_thresh="auto",
                bg_thresh_split="train",
                bg_sweep=(0.95,),
                **SMALL_PROTOCOL,
            )
        ),
        model=groupvit.GroupViT(model_config),
        mesh=one_device,
    )
    single = evaluator.evaluate(variables)
    assert single["protocol"]["local_devices"] == 1
    assert single["bg_thresh"] == 0.95
    assert single["bg_thresh_sweep"] == {"0.95": results["miou"]}
    np.testing.assert_array_equal(single["confusion_matrix"], results["confusion_matrix"])
    for name, baseline in results["baselines"].items():
        assert single["baselines"][name]["miou"] == baseline["miou"]


def _perfect_crop_outputs(
    encoded,
    log_scale,
    class_emb,
    label_crops,
    thresholds,
    *,
    crop_hw,
    patch_size,
    num_label_classes,
    top_k,
):
    """Scores that are the ground truth itself: a background channel per threshold (below 0.5
    it never wins, so those thresholds score worse), then one per class."""
    del encoded, log_scale, crop_hw, patch_size, top_k
    truth = jax.nn.one_hot(label_crops, num_label_classes, axis=1)  # 255 -> all zero
    background = [
        jnp.where(thresholds[t] > 0.5, truth[:, 0], -1.0)[:, None]
        for t in range(thresholds.shape[0])
    ]
    num_crops = label_crops.shape[0]
    favourite = jax.nn.one_hot(jnp.full((num_crops,), 6), class_emb.shape[0])  # class 'car'
    return dict(
        scores=jnp.concatenate(background + [truth[:, 1:]], axis=1),
        oracle=truth,
        image_probs=favourite,
        groups=jnp.zeros(label_crops.shape, jnp.int32),
    )


def test_perfect_prediction_gives_miou_exactly_one(checkpoint, monkeypatch, tmp_path):
    # Images at the short side already: resizing is the identity, and the windows overlap.
    labels = write_voc_fixture(str(tmp_path), [IMAGE_SIZES[0]] * 2, seed=3, splits=("val", "train"))
    monkeypatch.setattr(inference, "encode_crops", lambda *args, **kwargs: None)
    monkeypatch.setattr(inference, "crop_outputs", _perfect_crop_outputs)
    variables, model_config = checkpointing.load_variables(checkpoint)
    # As the training loop calls it: its mesh set, the state on it.
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
    state = jax.device_put(
        {"params": {"model": variables["params"]}, "batch_stats": variables["batch_stats"]},
        sharding.replicated(mesh),
    )
    evals = ml_collections.ConfigDict(
        {
            "fixed": dict(
                type="segmentation", dataset="voc", data_dir=str(tmp_path), **SMALL_PROTOCOL
            ),
            "auto": dict(
                type="segmentation",
                dataset="voc",
                data_dir=str(tmp_path),
                bg_thresh="auto",
                bg_thresh_split="train",
                bg_sweep=(0.3, 0.7),
                summary_images=0,
                **SMALL_PROTOCOL,
            ),
        }
    )
    built = dict(
        evaluation.create(evals, model=groupvit.GroupViT(model_config), mesh=mesh, config=None)
    )
    assert built["fixed"].due(10, 10) and not built["fixed"].due(5, 10)
    with jax.set_mesh(mesh):
        fixed, auto = built["fixed"].run(state), built["auto"].run(state)
    assert fixed["miou"] == 1.0
    assert fixed["miou_group_oracle"] == 1.0
    # Every pixel 'car' (label 7): IoU of car = its share if present, 0 for every other class.
    valid = np.concatenate([label[label != 255] for label in labels.values()])
    expected_top = np.mean(valid == 7) / len(np.unique(valid))
    assert fixed["miou_top_class"] == pytest.approx(expected_top)
    assert fixed["miou_all_background"] == pytest.approx(
        np.mean(valid == 0) / len(np.unique(valid))
    )
    assert auto["bg_thresh"] == 0.7 and auto["miou"] == 1.0

    # The image summary (summary_images=4; two images here): the predicted masks, which are the
    # ground truth with ignored pixels background, over the images, fitted into 32 x 32.
    assert "overlays" not in auto
    overlays = fixed.pop("overlays")
    assert overlays.shape == (2, 32, 32, 3) and overlays.dtype == np.uint8
    assert all(isinstance(v, float) for v in fixed.values())
    dataset = segmentation_sets.get_segmentation_dataset("voc", str(tmp_path))
    for overlay, example in zip(overlays, [dataset[k] for k in range(len(dataset))]):
        prediction = np.where(example["label"] == 255, 0, example["label"])
        expected = visualize.summary_overlay(example["image"], prediction, True, 32)
        np.testing.assert_array_equal(overlay, expected)
    assert not np.array_equal(overlays[0], visualize.fit_square(dataset[0]["image"], 32))


def test_bad_input_is_a_one_line_error(checkpoint, voc, tmp_path, cli_with_bad_input):
    root, _ = voc
    for data_dir, model, message in (
        (f"{tmp_path}/nowhere", checkpoint, "not found"),
        (root, f"{tmp_path}/no_model", "no model"),
    ):
        config = load_eval_config("voc")
        config.data_dir = data_dir
        with pytest.raises(SystemExit) as exit_info:
            evaluate.run(config, model, str(tmp_path / "out"))
        text = str(exit_info.value.code)
        assert text.startswith("error: ") and message in text and "\n" not in text

    model = groupvit.GroupViT(checkpointing.load_variables(checkpoint)[1])
    for overrides, message in (
        (dict(bg_thresh=None), "has a background class"),
        (dict(window=0, stride=-1), "stride must be positive"),
        (dict(windw=3), "unknown field 'windw'"),
        (dict(save_predictions=2), "needs output_dir"),
    ):
        with pytest.raises(ValueError, match=message):
            segmentation.Evaluator(
                ml_collections.ConfigDict(dict(dataset="voc", data_dir=root, **overrides)),
                model=model,
            )

    # The real command line ends in one line on stderr.
    _, stderr = cli_with_bad_input.communicate(timeout=300)
    assert cli_with_bad_input.returncode != 0, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: no model at ")
    assert "Traceback" not in stderr


def test_configs_and_settings():
    for name, dataset, bg in (
        ("voc", "voc", 0.95),
        ("coco_object", "coco_object", 0.95),
        ("ade20k", "ade20k", None),
        ("synthetic", "synthetic", "auto"),
    ):
        config = load_eval_config(name)
        assert config.dataset == dataset and config.bg_thresh == bg
    assert (load_eval_config("context").dataset, load_eval_config("context").bg_thresh) == (
        "context60",
        0.35,
    )
    assert (
        load_eval_config("context", "59").dataset,
        load_eval_config("context", "59").bg_thresh,
    ) == ("context59", None)
    with pytest.raises(ValueError, match="known: 60, 59"):
        load_eval_config("context", "61")
    assert load_eval_config("imagenet").type == "classification"
    retrieval_config = load_eval_config("retrieval")
    assert (retrieval_config.type, retrieval_config.max_images) == ("retrieval", 1000)
    for name in ("voc", "imagenet", "retrieval"):
        assert load_eval_config(name).enabled
    assert inference.expand_templates(("imagenet80",))[:1] == ("a bad photo of a {}.",)
    with pytest.raises(ValueError, match="'{}'"):
        inference.expand_templates(("a photo",))
    assert [segmentation_settings.parse_bg_thresh(v) for v in ("auto", "None", 0.5, "0.25")] == [
        "auto",
        None,
        0.5,
        0.25,
    ]
