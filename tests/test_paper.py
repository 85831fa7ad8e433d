"""The `paper` config: the published method, and its whole path run at reduced size.

The smoke test does what the README tells a user to do, with the data made here and only the
data, batch and step counts shrunk: `img2dataset` fetches images (file:// URLs) into webdataset
shards, `prepare_captions` makes the TFDS dataset, the README's `paper` command trains 2 steps of
GroupViT-S (bf16, every loss, the paper augmentation) from a random DeiT-S folder with the in-loop
VOC and ImageNet evaluators, `convert to-hf` exports the checkpoint and the eval binary evaluates
the export. The data sit where the config's defaults look (`~/...`, HOME pointed at a temporary
directory), so the README's command runs as written.
"""

import csv
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from mixreorg_jax.formats import model_files
from mixreorg_jax.models import groupvit
from mixreorg_jax.training import config as train_config
from mixreorg_jax.training import model_init

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# The README's paper command, run here as written (with the shrinking flags below appended).
PAPER_COMMAND = (
    "python -m mixreorg_jax.train --config configs/mixreorg.py:paper "
    "--workdir ~/runs/mixreorg_paper --config.data.dir=~/tensorflow_datasets/cc12m "
    "--config.model_init=~/models/deit-small-patch16-224"
)
SHRINK = [
    "--config.data.batch_size=4",
    "--config.data.worker_count=0",
    "--config.total_epochs=0",
    "--config.total_steps=2",
    "--config.warmup_epochs=0",
    "--config.warmup_steps=1",
    "--config.log_every_steps=1",
    "--config.checkpoint.every_steps=2",
    "--config.evals.voc.max_images=2",
    "--config.evals.imagenet.max_images=4",
]
CAPTIONS = [
    "a dog runs on the grass",
    "two cats sleep in a box",
    "a red car on the road",
    "a bird sits on a tree",
]


def _readme_commands() -> str:
    """The README's shell commands with continuation lines joined."""
    return " ".join(README.replace("\\\n", " ").split())


def _paper_config():
    return train_config.from_file(f"{REPO}/configs/mixreorg.py:paper")


# ---------------------------------------------------------------- the config
def test_paper_config_is_the_published_method():
    c = _paper_config()
    assert c.model.depths == (6, 3, 3) and c.model.width == 384 and c.model.dtype == "bfloat16"
    assert (c.mix.enabled, c.mix.group_size, c.mix.block_size) == (True, 2, 1)
    assert (c.mix.contextual_depth, c.mix.progressive_weight) == (1, 1.0)
    assert c.mix.progressive_mode == "average"
    published = ("contrastive", "multi_label", "restore", "mixseg")
    assert all(c.loss[name] == 1.0 for name in published)
    ours = ("group_balance", "segment_multi_label", "segment_retrieval", "classification")
    assert all(c.loss[name] == 0.0 for name in ours)
    assert (c.loss.multi_label_positives, c.loss.share_temperature) == ("own", False)
    assert (c.loss.mixseg_negatives, c.loss.mixseg_assignment) == ("group", "hard")
    assert c.data.prompt_templates == "imagenet80" and c.data.batch_size == 4096
    augment = c.data.augment
    assert augment.randaugment and augment.flip and augment.random_erasing == 0.25
    assert tuple(augment.crop_scale) == (0.08, 1.0)
    assert c.model_init == "~/models/deit-small-patch16-224" and c.model_init_load == ".*"
    assert {name: e.type for name, e in c.evals.items()} == {
        "voc": "segmentation",
        "imagenet": "classification",
    }


# The paper's ablations: each one override of the paper config (the README lists them).
ABLATIONS = {
    "--config.mix.contextual_depth=0": ("mix.contextual_depth", 0),
    "--config.mix.contextual_depth=2": ("mix.contextual_depth", 2),
    "--config.mix.progressive_weight=0": ("mix.progressive_weight", 0.0),
    "--config.mix.progressive_mode=add": ("mix.progressive_mode", "add"),
    "--config.loss.restore=0": ("loss.restore", 0.0),
    "--config.loss.mixseg=0": ("loss.mixseg", 0.0),
    "--config.loss.contrastive=0": ("loss.contrastive", 0.0),
    "--config.loss.multi_label=0": ("loss.multi_label", 0.0),
}


def test_paper_ablations_are_one_override_each_and_in_the_readme():
    from absl import flags
    from ml_collections import config_flags

    base = _paper_config().to_dict()
    for override, (field, value) in ABLATIONS.items():
        assert f"`{override}`" in README, override
        argv = ["train", f"--config={REPO}/configs/mixreorg.py:paper", override]
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file(
            "config", flag_values=flag_values, lock_config=True, sys_argv=argv
        )
        flag_values(argv)
        changed = flag_values.config.to_dict()
        section, key = field.split(".")
        assert changed[section][key] == value
        changed[section][key] = base[section][key]
        assert changed == base, override


# ---------------------------------------------------------------- the backbone
def _save_deit_s(folder: pathlib.Path) -> dict:
    """A DeiT-S/16 in facebook/deit-small-patch16-224's layout (ViTForImageClassification),
    random weights; returns its tensors as saved."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=224,
        patch_size=16,
        qkv_bias=True,
        num_labels=1000,
    )
    model = transformers.ViTForImageClassification(config)
    with torch.no_grad():  # nothing equal to our initialisation by chance
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    return model_files.read_safetensors(str(folder / "model.safetensors"))


def test_paper_deit_s_backbone_loads_every_mapped_tensor(tmp_path):
    config = _paper_config().model
    deit = _save_deit_s(tmp_path)
    variables = groupvit.init_variables(config, jax.random.key(0))
    before = model_files.flatten_tree(jax.device_get(variables))
    loaded = model_init.load_initial_variables(
        str(tmp_path), {k: v.shape for k, v in before.items()}, config
    )
    vit = "vit.encoder.layer"
    blocks = [(0, j) for j in range(6)] + [(1, j) for j in range(3)] + [(2, j) for j in range(3)]
    for layer, (stage, j) in enumerate(blocks):
        ours = f"params/vision/stages_{stage}/blocks_{j}"
        np.testing.assert_array_equal(
            loaded[f"{ours}/attn/query/kernel"],
            deit[f"{vit}.{layer}.attention.attention.query.weight"].T,
        )
        np.testing.assert_array_equal(
            loaded[f"{ours}/mlp/fc2/bias"], deit[f"{vit}.{layer}.output.dense.bias"]
        )
        np.testing.assert_array_equal(
            loaded[f"{ours}/norm1/scale"], deit[f"{vit}.{layer}.layernorm_before.weight"]
        )
    np.testing.assert_array_equal(
        loaded["params/vision/position_embedding"].reshape(196, 384),
        deit["vit.embeddings.position_embeddings"][0, 1:],
    )
    kernel = deit["vit.embeddings.patch_embeddings.projection.weight"]
    np.testing.assert_array_equal(
        loaded["params/vision/patch_embed/kernel"], kernel.transpose(2, 3, 1, 0)
    )
    # 16 tensors per block, patch kernel and bias, position embedding; nothing else.
    assert len(loaded) == 16 * 12 + 3
    backbone = (
        r"params/vision/(patch_embed/(kernel|bias)|position_embedding|stages_\d/blocks_\d/.*)"
    )
    assert all(re.fullmatch(backbone, k) for k in loaded)
    fresh = set(before) - set(loaded)  # group tokens, grouping blocks, norms, text, projectors
    assert {f"params/vision/stages_{i}/group_tokens" for i in (0, 1)} <= fresh
    assert {"params/vision/patch_norm/scale", "params/vision/norm/scale"} <= fresh
    assert any("/grouping/assign/" in k for k in fresh)


# ---------------------------------------------------------------- the smoke test
def _write_photo(path: pathlib.Path, rng, size=(72, 56)):
    image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=90)


def _write_tagger(nltk_data: pathlib.Path):
    """NLTK's perceptron tagger trained on two sentences, where `nltk.pos_tag` looks for it."""
    from nltk.tag import PerceptronTagger

    tagged = [
        [("a", "DT"), ("dog", "NN"), ("runs", "VBZ"), ("on", "IN"), ("the", "DT"), ("grass", "NN")],
        [
            ("two", "CD"),
            ("cats", "NNS"),
            ("sleep", "VBP"),
            ("in", "IN"),
            ("a", "DT"),
            ("box", "NN"),
        ],
    ]
    tagger = PerceptronTagger(load=False)
    tagger.train(tagged, nr_iter=5)
    folder = nltk_data / "taggers" / "averaged_perceptron_tagger_eng"
    folder.mkdir(parents=True)
    for value, name in zip(tagger.encode_json_obj(), tagger.param_files("eng")):
        (folder / name).write_text(json.dumps(value))


def _write_voc(root: pathlib.Path, rng):
    ids = ["2007_000033", "2007_000042"]
    for k, i in enumerate(ids):
        _write_photo(root / "JPEGImages" / f"{i}.jpg", rng, (64 + 8 * k, 48))
        label = rng.integers(0, 21, (48, 64 + 8 * k)).astype(np.uint8)
        label[:2] = 255
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        Image.fromarray(label).save(root / "SegmentationClass" / f"{i}.png")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")


def _write_imagenet(root: pathlib.Path, rng):
    names = ["goldfish", "tabby cat", "sports car"]
    for k, wnid in enumerate(("n01443537", "n02123045", "n04285008")):
        for j in range(2):
            _write_photo(root / "val" / wnid / f"ILSVRC2012_val_{k}{j}.JPEG", rng)
    (root / "class_names.txt").write_text("\n".join(names) + "\n")


def _run(args, env, cwd=REPO, check=True, timeout=900):
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def paper_home(tmp_path_factory):
    """A HOME with the paper's data where its config looks: the caption dataset (made by
    img2dataset and prepare_captions), the DeiT-S folder, VOC and an ImageNet-style val folder."""
    home = tmp_path_factory.mktemp("home")
    bin_dir = pathlib.Path(sys.executable).parent
    env = dict(
        os.environ,
        HOME=str(home),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",  # `python` as in an activated venv
        NO_ALBUMENTATIONS_UPDATE="1",  # img2dataset's augmentation library checks online
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    env.pop("XLA_FLAGS", None)  # one device, as a user's laptop
    rng = np.random.default_rng(0)
    photos = home / "photos"
    rows = []
    for i in range(32):
        _write_photo(photos / f"{i:03d}.jpg", rng)
        rows.append((f"file://{photos}/{i:03d}.jpg", CAPTIONS[i % len(CAPTIONS)]))
    _write_photo(photos / "uncaptioned.jpg", rng)
    rows.append((f"file://{photos}/uncaptioned.jpg", ""))  # a skip that preparation counts
    rows.append((f"file://{photos}/missing.jpg", "a dog that is not there"))  # a failed fetch
    with open(home / "urls.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        writer.writerows(rows)
    _run(
        [
            "img2dataset",
            f"--url_list={home / 'urls.csv'}",
            "--input_format=csv",
            "--url_col=url",
            "--caption_col=caption",
            "--output_format=webdataset",
            f"--output_folder={home / 'shards'}",
            "--processes_count=1",
            "--thread_count=4",
            "--resize_mode=no",
            "--enable_wandb=False",
        ],
        env,
        cwd=home,
    )
    stats = json.loads((home / "shards" / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_download"]) == (34, 33, 1)

    _write_tagger(home / "nltk_data")
    prepared = _run(
        [
            sys.executable,
            "-m",
            "mixreorg_jax.prepare_captions",
            f"--source={home}/shards/*.tar",
            f"--data_dir={home}/tensorflow_datasets",
            "--name=cc12m",
        ],
        env,
    )
    summary = json.loads(prepared.stdout.strip().splitlines()[-1])
    _save_deit_s(home / "models" / "deit-small-patch16-224")
    _write_voc(home / "data" / "VOCdevkit" / "VOC2012", rng)
    _write_imagenet(home / "data" / "imagenet", rng)
    return home, env, summary


def test_paper_command_is_the_readmes():
    assert PAPER_COMMAND in _readme_commands()


def test_paper_smoke_from_shards_to_hugging_face_export(paper_home):
    home, env, summary = paper_home
    assert summary["counts"]["train"]["examples"] == 32, summary
    assert (summary["skipped_bad_caption"], summary["skipped_corrupt_image"]) == (1, 0), summary
    train = _run(PAPER_COMMAND.replace("~", str(home)).split() + SHRINK, env)
    workdir = home / "runs" / "mixreorg_paper"
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if "total" in m][-1]
    assert last["step"] == 2
    for key in ("mixseg", "restore", "contrastive", "multi_label"):
        assert np.isfinite(last[key]), (key, train.stderr[-2000:])
    evaluated = {k: v for m in metrics for k, v in m.items() if "/" in k}
    assert {"voc/miou", "imagenet/top1", "imagenet/top5"} <= set(evaluated)
    assert 0.0 <= evaluated["imagenet/top1"] <= evaluated["imagenet/top5"] <= 1.0
    assert (workdir / "checkpoints" / "2").is_dir()  # the Orbax checkpoint
    config = json.loads((workdir / "config.json").read_text())
    assert config["mix"]["contextual_depth"] == 1 and config["model"]["dtype"] == "bfloat16"

    hf_dir = home / "hf_export"
    _run(
        [
            sys.executable,
            "-m",
            "mixreorg_jax.convert",
            "to-hf",
            f"--checkpoint={workdir / 'export'}",
            f"--output={hf_dir}",
        ],
        env,
    )
    assert (hf_dir / "config.json").exists() and (hf_dir / "model.safetensors").exists()
    _run(
        [
            sys.executable,
            "-m",
            "mixreorg_jax.evaluate",
            "--config=configs/eval/voc.py",
            f"--config.data_dir={home}/data",
            "--config.max_images=2",
            f"--checkpoint={hf_dir}",
            f"--output_dir={home / 'eval_voc'}",
        ],
        env,
    )
    results = json.loads((home / "eval_voc" / "results.json").read_text())
    assert results["num_images"] == 2 and 0.0 <= results["miou"] <= 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "--config.model_init=~/models/deit-tiny",
            "--config.model_init=none to train from scratch",
        ),
        ("--config.data.split=validation", "has no split 'validation'"),
        ("--config.evals.voc.data_dir=~/voc", "--config.evals.voc.enabled=False"),
    ],
    ids=["no_deit", "wrong_split", "no_voc"],
)
def test_paper_bad_paths_are_one_line_before_step_0(paper_home, override, message, request):
    home, env, _ = paper_home
    workdir = f"~/runs/{request.node.callspec.id}"
    command = PAPER_COMMAND.replace("~/runs/mixreorg_paper", workdir)
    result = _run(
        (command + " " + override).replace("~", str(home)).split() + SHRINK, env, check=False
    )
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and last.startswith("error: ") and message in last, last
    assert "Traceback" not in result.stderr
