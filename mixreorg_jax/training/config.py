"""Every field of a train config, with its default; `configs/*.py` start from `base_config()`.

Configs are locked `ml_collections.ConfigDict`s: a command-line override of a key that does not
exist (`--config.optim.lrr=1`) fails, naming the key.
"""

import dataclasses
import runpy

import ml_collections

from mixreorg_jax.data import pipeline, synthetic
from mixreorg_jax.models import presets
from mixreorg_jax.training import model_init


def from_file(spec: str) -> ml_collections.ConfigDict:
    """`PATH.py[:ARG]` -> its `get_config(ARG)`, the config a `--config=PATH.py:ARG` flag loads."""
    path, _, arg = spec.partition(":")
    return runpy.run_path(path)["get_config"](arg or None)


def parse_variant(arg: str | None, known: tuple[str, ...], default: str) -> str:
    """The variant named by `configs/x.py:variant`; an unknown one is an error listing the known."""
    variant = arg or default
    if variant not in known:
        raise ValueError(f"unknown config variant {variant!r}; known: {', '.join(known)}")
    return variant


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = presets.get_model_config("demo")

    # Input pipeline (mixreorg_jax/data/pipeline.py has every field). `dir`: prepared TFDS
    # directories separated by commas (with `split` and `weights`), or "synthetic" for the
    # built-in world, prepared on first use under `synthetic_dir` with the `synthetic_world`
    # settings.
    c.data = pipeline.get_config_defaults()
    c.data.dir = "synthetic"
    c.data.synthetic_dir = "~/tensorflow_datasets/mixreorg_synthetic"
    c.data.synthetic_world = ml_collections.ConfigDict(dataclasses.asdict(synthetic.WorldConfig()))
    c.data.batch_size = 64

    # Duration: steps, or epochs of the (first) training dataset when > 0.
    c.total_steps = 1000
    c.total_epochs = 0.0
    c.warmup_steps = 100
    c.warmup_epochs = 0.0

    c.optim = ml_collections.ConfigDict(
        dict(
            lr=1.6e-3,
            warmup_lr=4e-6,
            min_lr=4e-5,
            scale_lr_by_batch=True,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.05,
            grad_clip=5.0,
        )
    )

    # MixReorg (docs/method.md §4).
    c.mix = ml_collections.ConfigDict(
        dict(
            enabled=True,  # False: plain GroupViT training
            group_size=2,  # K, images mixed together
            block_size=1,  # one permutation per block_size x block_size patches
            contextual_depth=1,  # Lc, stage-1 blocks run on the original images before mixing
            progressive_weight=1.0,  # lambda of progressive mixing; 0 turns it off
            progressive_mode="add",  # or "average": divided by 1 + lambda
        )
    )

    # Loss weights (the terms of training/objective.py's TERMS; a weight of 0 skips the term) and
    # their settings (docs/method.md §4; "ours": this project's options, off here).
    c.loss = ml_collections.ConfigDict(
        dict(
            contrastive=1.0,  # image-text InfoNCE on the original branch (L_orig)
            multi_label=1.0,  # GroupViT's multi-label contrastive loss (L_orig)
            multi_label_positives="own",  # or "same_word" (ours): also others' prompts of a word
            restore=1.0,  # image-text InfoNCE on the restored branch (L_restore)
            mixseg=1.0,  # mixed patches classified by their source caption (L_mixseg)
            mixseg_negatives="group",  # L_mixseg's captions: the group's K, or the "batch"'s
            mixseg_assignment="hard",  # chain of straight-through assignments, or "soft" (ours)
            group_balance=0.0,  # ours, against grouping collapse (losses.group_balance_loss)
            segment_multi_label=0.0,  # ours: multi-label scores from the best-matching segment
            segment_retrieval=0.0,  # ours: each prompt against all segments of the batch
            share_temperature=False,  # GroupViT's option: multi-label on the image-text scale
            classification=0.0,  # backbone pre-training: image-level labels (configs/backbone.py)
        )
    )

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

    c.log_every_steps = 50
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, max_to_keep=3, async_save=True))
    # Resume order: the workdir's own checkpoint, else `resume` (another run's checkpoints/ dir or
    # workdir), else `model_init` (parameters only: our checkpoint or export, a converted Hugging
    # Face GroupViT, or a Hugging Face ViT/DeiT folder for the backbone), else scratch.
    # model_init_load: a regex; only the variables whose flat path ('params/vision/...',
    # 'batch_stats/...') it fully matches are taken from `model_init`, the rest start fresh.
    c.resume = ""
    c.model_init = ""
    c.model_init_load = ".*"

    # In-loop evaluators (mixreorg_jax/evaluation): name -> dict(type=..., every_steps=..., ...).
    c.evals = ml_collections.ConfigDict()
    return c


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets dotted fields (`{"optim.lr": 1e-3}`) of `c`; an unknown field is an error naming it."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = c
        for parent in parents:
            node = node[parent]
        if leaf not in node:
            raise ValueError(f"{key}: no such config field")
        node[leaf] = value
    return c


VARIANTS = ("paper", "demo", "tiny")


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """Sizes, data and schedule of a variant; method switches are left to the config file.

    paper: GroupViT-S, global batch 4096, 30 epochs (2 warm-up) of prepared CC12M.
    demo:  the README's main job: the demo model on the synthetic world, minutes on 2 CPU cores.
    tiny:  a few steps of the tiny model on a tiny synthetic world (tests).
    """
    if variant == "paper":
        c.model = presets.get_model_config("groupvit_s")
        c.data.dir = "~/tensorflow_datasets/cc12m"
        c.data.batch_size = 4096
        c.data.worker_count = 16
        c.total_epochs, c.warmup_epochs = 30.0, 2.0
        c.log_every_steps = 100
        c.checkpoint.every_steps = 1000
        c.model.dtype = "bfloat16"
        # Zero-shot VOC mIoU and ImageNet top-1/top-5 as GroupViT's trainer reports them, about
        # once an epoch (CC12M: ~10M pairs / 4096); fields left out take the evaluators' defaults
        # (the released protocol). ImageNet's folders are WordNet ids: its class names come from
        # a file of one name a line (docs/evaluation.md).
        every_steps = 2500
        c.evals = ml_collections.ConfigDict(
            dict(
                voc=dict(
                    type="segmentation",
                    enabled=True,
                    dataset="voc",
                    data_dir="~/data/VOCdevkit/VOC2012",
                    max_images=0,
                    every_steps=every_steps,
                ),
                imagenet=dict(
                    type="classification",
                    enabled=True,
                    data_dir="~/data/imagenet/val",
                    class_names="~/data/imagenet/class_names.txt",
                    max_images=0,
                    every_steps=every_steps,
                ),
            )
        )
    elif variant == "demo":
        c.model = presets.get_model_config("demo")
        c.model.weight_init = "lecun_normal"  # GroupViT's std 0.02 is made for width 384
        c.data.batch_size = 64
        # Objects wear their class's texture, so one 4 px patch can show its class.
        c.data.synthetic_world.update(
            dict(
                image_size=32,
                class_texture_prob=1.0,
                train_size=20_000,
                validation_size=500,
                test_size=500,
            )
        )
        # Whole shapes carry the caption's meaning: crops keep most of the image. No flips:
        # captions say "to the left of", and the class textures' two diagonal stripes are each
        # other's mirror image (a flipped triangle wears the star's).
        c.data.augment.update(
            dict(crop_scale=(0.6, 1.0), flip=False, randaugment=False, random_erasing=0.0)
        )
        # 1200 steps: the quick start takes 6-7 minutes on 2 CPU cores
        # (docs/results.md 3.1); at 400 neither model knows the class names (3.3).
        c.total_steps, c.warmup_steps = 1200, 40
        c.optim.lr, c.optim.min_lr, c.optim.warmup_lr = 1e-3, 1e-5, 1e-6
        c.optim.scale_lr_by_batch = False
        # Ours, for a world of 8 class nouns (docs/results.md 3.2-3.3): every prompt
        # of a batch's word is a positive, the prompts use the evaluation's one template, and
        # grouping is kept from collapsing.
        c.data.prompt_templates = "photo"
        c.loss.update(dict(multi_label_positives="same_word", group_balance=1.0))
        # Ours (docs/results.md 3.5): the caption's words also score the image's segments, all on the
        # evaluation's logit scale; no caption-contrastive terms (so no restoration loss).
        c.loss.update(
            dict(
                contrastive=0.0,
                restore=0.0,
                segment_multi_label=1.0,
                segment_retrieval=1.0,
                share_temperature=True,
            )
        )
        # A `model_init` gives the demo only its backbone, as ImageNet weights give MixReorg's
        # (docs/method.md §3): the patch embedding and stage-1 blocks, pre-trained on the world's
        # image-level labels by configs/backbone.py (launch/local.sh runs it first).
        c.model_init_load = model_init.BACKBONE
        c.log_every_steps = 20
        c.checkpoint.every_steps = 200
        # The world's validation mIoU (and a few mask overlays) in TensorBoard as it trains, on
        # its first 128 images, the background threshold chosen on as many training images:
        # ~20 s each time, where all 500 would add minutes to the demo.
        c.evals = ml_collections.ConfigDict(
            dict(
                val=dict(
                    type="segmentation",
                    enabled=True,
                    dataset="synthetic",
                    split="val",
                    bg_thresh_split="train",
                    max_images=128,
                    every_steps=200,
                )
            )
        )
    elif variant == "tiny":
        c.model = presets.get_model_config("tiny")
        c.data.batch_size = 16
        c.data.synthetic_dir = "/tmp/mixreorg_tiny_synthetic"
        c.data.synthetic_world.update(
            dict(image_size=32, train_size=256, validation_size=16, test_size=16)
        )
        c.total_steps, c.warmup_steps = 6, 2
        c.optim.lr, c.optim.scale_lr_by_batch = 1e-3, False
        c.log_every_steps = 2
        c.checkpoint.every_steps = 3
    # The input pipeline follows the model's input size and context length.
    c.data.image_size = c.model.image_size
    c.data.context_length = c.model.context_length
    return c
