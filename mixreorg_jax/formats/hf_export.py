"""What a Hugging Face GroupViT folder holds beside its weights, and where a checkpoint came from.

`huggingface.to_hf` writes, next to config.json and model.safetensors:

  vocab.json, merges.txt     CLIP's BPE vocabulary (`transformers.CLIPTokenizer` reads the pair)
  tokenizer_config.json      CLIPTokenizer with model_max_length = the model's context length
  special_tokens_map.json    its special tokens (padding with the end token)
  preprocessor_config.json   CLIPImageProcessor: our eval crop (short side to
                             image_size / crop_fraction, centre crop image_size), our mean/std
  README.md                  the model card: architecture, training record, last evaluation,
                             how transformers' preprocessing differs from ours, the command

The facts about our preprocessing live in the data layer (data/tokenizer.py, data/augment.py),
which formats/ does not import: the caller passes them as a `Preprocessing`.

A checkpoint's training record is read when it is a training workdir (WORKDIR/export is the model)
or that workdir's export/: WORKDIR/config.json is the training config the trainer wrote,
WORKDIR/metrics.jsonl its logged metrics, one JSON object a line, in-loop evaluation results
under keys "EVAL/METRIC" (e.g. "voc/miou").
"""

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
# PIL's resampling filter numbers, as preprocessor_config.json stores them.
PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How this project turns pictures and texts into model inputs at evaluation.

    vocab_dir: a folder with CLIP's vocab.json and merges.txt (`tokenizer.cached_vocab_dir()`).
    image_mean, image_std: per-channel normalisation of [0, 1] RGB (`augment.IMAGENET_MEAN/STD`).
    crop_fraction: the eval centre crop's side over the image's short side (`augment.eval_image`).
    resample: the PIL filter (number) the eval crop is resized with.
    """

    vocab_dir: str
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    crop_fraction: float
    resample: int


@dataclasses.dataclass(frozen=True)
class TrainingRecord:
    """What a training workdir says about the run that made a checkpoint.

    workdir: the workdir's path. config: its config.json (None when unreadable; `config_error`
    says why). last_step: the largest step in metrics.jsonl (None without metrics).
    evaluations: {"EVAL/METRIC": (value, step)}, each the last value logged.
    """

    workdir: str
    config: dict | None
    config_error: str
    last_step: int | None
    evaluations: dict[str, tuple[float, int]]


# ---------------------------------------------------------------- where the model is
def find_model(checkpoint: str) -> tuple[str, str | None]:
    """(the model checkpoint directory, its training workdir or None) of `checkpoint`.

    `checkpoint` is a model checkpoint, a training workdir whose training finished (its export/),
    or the export/ of one.
    """
    path = os.path.abspath(os.path.expanduser(checkpoint))
    if os.path.isdir(os.path.join(path, "export")):
        return os.path.join(path, "export"), path
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise FileNotFoundError(
            f"{checkpoint} is a training workdir without export/: its training has not finished "
            "(the trainer writes export/ at the last step)"
        )
    parent = os.path.dirname(path)
    is_export = os.path.basename(path) == "export"
    if is_export and os.path.isfile(os.path.join(parent, "config.json")):
        return path, parent
    return path, None


def read_training_record(workdir: str) -> TrainingRecord:
    """The training config and the last step and evaluation results of `workdir`'s metrics.

    Lines of metrics.jsonl that are not JSON objects (a line cut short by a crash) are skipped.
    """
    config, config_error = None, ""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        config_error = f"{type(e).__name__}: {e}"
        logging.warning("%s/config.json is unreadable: %s", workdir, config_error)
    last_step, evaluations = None, {}
    metrics_file = os.path.join(workdir, "metrics.jsonl")
    if os.path.isfile(metrics_file):
        with open(metrics_file) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    continue
                step = record["step"]
                last_step = step if last_step is None else max(last_step, step)
                for key, value in record.items():
                    if "/" in key and isinstance(value, (int, float)):
                        evaluations[key] = (float(value), step)
    return TrainingRecord(workdir, config, config_error, last_step, evaluations)


# ---------------------------------------------------------------- the output folder
def check_output(output: str, overwrite: bool, model_dir: str) -> None:
    """Raises if `output` may not be written: it exists (without `overwrite`), it is not an
    earlier export (a folder with config.json, or empty), or it holds the model being exported."""
    if not os.path.lexists(output):
        return
    if not overwrite:
        raise FileExistsError(f"{output} exists; --overwrite replaces it")
    real_output, real_model = os.path.realpath(output), os.path.realpath(model_dir)
    if os.path.commonpath([real_output, real_model]) == real_output:
        raise ValueError(f"{output} holds the checkpoint {model_dir}; write the export elsewhere")
    if not os.path.isdir(output) or (
        os.listdir(output) and not os.path.isfile(os.path.join(output, "config.json"))
    ):
        raise ValueError(
            f"{output} is not a Hugging Face folder (no config.json); --overwrite replaces only "
            "an earlier export or an empty folder"
        )


def replace_folder(staging: str, output: str) -> None:
    """Moves the finished folder `staging` to `output`, replacing what is there."""
    if not os.path.lexists(output):
        os.rename(staging, output)
        return
    old = staging + ".old"
    os.rename(output, old)
    os.rename(staging, output)
    shutil.rmtree(old)


def write_json(path: str, value: Any) -> None:
    """`value` as indented JSON, with a final newline."""
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------- tokenizer and image processor
def tokenizer_config(context_length: int) -> dict:
    """tokenizer_config.json: transformers' CLIPTokenizer, at most `context_length` ids a text."""
    return dict(
        tokenizer_class="CLIPTokenizer",
        model_max_length=context_length,
        padding_side="right",
        truncation_side="right",
        clean_up_tokenization_spaces=False,
        **special_tokens(),
    )


def special_tokens() -> dict:
    """special_tokens_map.json."""
    # Padding with the end token, as transformers' CLIP tokenizers do. Ours pads with id 0, "!",
    # which as a special token would also replace each "!" of a text.
    return dict(bos_token=SOT_TOKEN, eos_token=EOT_TOKEN, unk_token=EOT_TOKEN, pad_token=EOT_TOKEN)


def resize_side(image_size: int, crop_fraction: float) -> int:
    """The short side CLIPImageProcessor resizes to before its centre crop of `image_size`."""
    return round(image_size / crop_fraction)


def exact_crop(image_size: int, crop_fraction: float) -> bool:
    """Whether CLIPImageProcessor's crop of a square picture is exactly ours: the resized side is
    image_size / crop_fraction, and what the crop cuts off is even (split equally)."""
    side = resize_side(image_size, crop_fraction)
    return math.isclose(side * crop_fraction, image_size) and (side - image_size) % 2 == 0


def preprocessor_config(image_size: int, preprocessing: Preprocessing) -> dict:
    """preprocessor_config.json: CLIPImageProcessor making our eval crop of `image_size`."""
    return dict(
        image_processor_type="CLIPImageProcessor",
        processor_class="CLIPProcessor",
        do_convert_rgb=True,
        do_resize=True,
        size=dict(shortest_edge=resize_side(image_size, preprocessing.crop_fraction)),
        resample=preprocessing.resample,
        do_center_crop=True,
        crop_size=dict(height=image_size, width=image_size),
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(preprocessing.image_mean),
        image_std=list(preprocessing.image_std),
    )


# ---------------------------------------------------------------- the model card
def _get(config: Mapping | None, dotted: str, default: Any = None) -> Any:
    """config["a"]["b"] for "a.b", or `default` where a key is missing."""
    value = config
    for key in dotted.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return default
        value = value[key]
    return value


def method_name(config: Mapping | None) -> str:
    """The method: MixReorg when the training config enables mixing, else GroupViT."""
    return "MixReorg" if _get(config, "mix.enabled", False) else "GroupViT"


def _datasets(data: Mapping) -> list[str]:
    """The training data of a config's `data` section, one line a dataset."""
    specs = data.get("datasets") or [dict(dir=data.get("dir"), split=data.get("split"))]
    lines = []
    for spec in specs:
        synthetic = spec.get("synthetic")
        name = "the synthetic world (`prepare_synthetic`)" if synthetic else f"`{spec.get('dir')}`"
        weight = spec.get("weight")
        lines.append(
            f"{name}, split `{spec.get('split')}`" + (f", weight {weight}" if weight else "")
        )
    return lines


def _training_section(record: TrainingRecord | None, checkpoint: str) -> list[str]:
    if record is None:
        return [
            f"The checkpoint `{checkpoint}` is not part of a training workdir (no config.json "
            "beside its folder), so its training config, data and steps are not known here.",
        ]
    config = record.config
    lines = [f"Training workdir: `{record.workdir}`."]
    if config is None:
        lines.append(f"Its config.json could not be read ({record.config_error}).")
    else:
        lines += ["", "| | |", "|---|---|", f"| method | {method_name(config)} |"]
        data = config.get("data") or {}
        for i, line in enumerate(_datasets(data)):
            lines.append(f"| {'data' if i == 0 else ''} | {line} |")
        for label, key in (
            ("batch size", "data.batch_size"),
            ("image size", "data.image_size"),
            ("total steps (config)", "total_steps"),
            ("total epochs (config)", "total_epochs"),
            ("warm-up steps", "warmup_steps"),
            ("learning rate", "optim.lr"),
            ("weight decay", "optim.weight_decay"),
            ("initialised from", "model_init"),
            ("resumed from", "resume"),
        ):
            value = _get(config, key)
            if value not in (None, "", 0, 0.0):
                lines.append(f"| {label} | `{value}` |")
        losses = {k: v for k, v in (config.get("loss") or {}).items() if isinstance(v, float) and v}
        if losses:
            weights = ", ".join(f"{k} {v:g}" for k, v in losses.items())
            lines.append(f"| loss weights | {weights} |")
        if _get(config, "mix.enabled"):
            mix = ", ".join(f"{k} {v}" for k, v in config["mix"].items() if k != "enabled")
            lines.append(f"| mixing | {mix} |")
    if record.last_step is None:
        lines += ["", "No metrics.jsonl in the workdir: the steps trained are not known."]
    else:
        lines += ["", f"Steps trained: {record.last_step} (the last step in metrics.jsonl)."]
    if config is not None:
        lines += [
            "",
            "<details><summary>The training config (the workdir's config.json)</summary>",
            "",
            "```json",
            json.dumps(config, indent=2),
            "```",
            "",
            "</details>",
        ]
    return lines


def _evaluation_section(record: TrainingRecord | None) -> list[str]:
    if record is None or not record.evaluations:
        where = "no training workdir" if record is None else "none in metrics.jsonl"
        return [f"No in-loop evaluation results ({where})."]
    lines = [
        "The last in-loop evaluation results logged in metrics.jsonl, as the evaluators "
        "report them:",
        "",
        "| metric | value | step |",
        "|---|---|---|",
    ]
    for key, (value, step) in sorted(record.evaluations.items()):
        lines.append(f"| {key} | {value:.4f} | {step} |")
    return lines


def _architecture_section(config: ml_collections.ConfigDict, num_params: int) -> list[str]:
    c = config
    grid = c.image_size // c.patch_size
    return [
        "| | |",
        "|---|---|",
        f"| image encoder | GroupViT: {c.image_size} px, {c.patch_size} px patches "
        f"({grid} x {grid}), width {c.width}, {c.num_heads} heads, MLP ratio {c.mlp_ratio:g}; "
        f"stages of {list(c.depths)} blocks with {list(c.num_group_tokens)} group tokens and "
        f"{list(c.num_output_groups)} output groups |",
        f"| text encoder | causal transformer: width {c.text_width}, {c.text_layers} layers, "
        f"{c.text_heads} heads, context {c.context_length} tokens, vocabulary {c.vocab_size} "
        "(CLIP BPE) |",
        f"| projectors | to {c.projection_dim} dimensions (hidden {c.projection_hidden}, "
        "BatchNorm) |",
        f"| parameters | {num_params:,} |",
    ]


def _preprocessing_section(
    config: ml_collections.ConfigDict, preprocessing: Preprocessing, logit_scale: float
) -> list[str]:
    size, fraction = config.image_size, preprocessing.crop_fraction
    side = resize_side(size, fraction)
    filter_name = PIL_FILTERS.get(preprocessing.resample, str(preprocessing.resample))
    if exact_crop(size, fraction):
        square = (
            "For square pictures its crop is ours exactly (the same pixels, to float rounding)."
        )
    else:
        square = (
            f"At {size} px our crop's resized side, {size / fraction:.2f} px, is not a whole "
            "number with an even margin, so for square pictures too its crop covers "
            f"{size / side:.4f} of the short side instead of {fraction} or sits half a pixel off "
            "ours (it is exact where that side is a whole number leaving an even margin, as "
            "224 / 0.875 = 256 is)."
        )
    if logit_scale > 100:
        scores = (
            f"The learned logit scale is {logit_scale:.2f}; our evaluation clamps it at 100, "
            "transformers does not, so its probabilities are sharper than ours (rankings agree)."
        )
    else:
        scores = (
            f"The learned logit scale is {logit_scale:.2f}, below the clamp at 100 of our "
            "evaluation, so transformers' probabilities are ours."
        )
    return [
        f"Images (`preprocessor_config.json`, CLIPImageProcessor): the short side resized "
        f"({filter_name}) to {side} px, the centre {size} x {size} px cut out, scaled to [0, 1] "
        f"and normalised with mean {list(preprocessing.image_mean)} and std "
        f"{list(preprocessing.image_std)}: our evaluation's centre crop (crop fraction "
        f"{fraction}, `mixreorg_jax.data.augment.eval_image`). {square} For pictures that are "
        "not square CLIPImageProcessor rounds the long side and the crop offset down to whole "
        "pixels, so its crop can sit up to one resized pixel off ours along the long side. "
        "Our evaluation also decodes large JPEGs at a reduced scale (`PIL.Image.draft`) before "
        "resizing; transformers decodes them whole. transformers 5 with torchvision installed "
        'resizes with torchvision (pass `backend="pil"` to `AutoProcessor.from_pretrained` for '
        "PIL's resize, which ours is).",
        "",
        "Text (`tokenizer_config.json`, CLIPTokenizer): CLIP's BPE vocabulary and ids, at most "
        f"{config.context_length} tokens with the start and end tokens; pass `truncation=True` "
        "for longer texts (ours keeps the first tokens and the end token, as truncation does). "
        "It pads with the end token, ours with id 0; the text feature is read at the first end "
        "token, which attends to no padding, so padding does not change it. Our tokenizer "
        "cleans a text that is not plain ASCII with `ftfy.fix_text` and `html.unescape` (twice) "
        "before collapsing white space and lower-casing; CLIPTokenizer only normalises to NFC, "
        "collapses white space and lower-cases. "
        "Texts with HTML entities (`&amp;`) or mojibake therefore get other ids; for ours, "
        "clean them first: `html.unescape(html.unescape(ftfy.fix_text(text)))`. (transformers "
        "4's slow CLIPTokenizer, `use_fast=False`, applies `ftfy.fix_text` when ftfy is "
        "installed, which unescapes most entities too.)",
        "",
        scores,
    ]


def model_card(
    config: ml_collections.ConfigDict,
    *,
    checkpoint: str,
    record: TrainingRecord | None,
    preprocessing: Preprocessing,
    num_params: int,
    logit_scale: float,
    command: str,
) -> str:
    """README.md of the export: what the model is, how it was trained and evaluated, how to use
    it with transformers and where that differs from this project, and how it was exported."""
    method = method_name(record.config if record else None)
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: zero-shot-image-classification",
        "tags:",
        "- groupvit",
        *(["- mixreorg"] if method == "MixReorg" else []),
        "- zero-shot-segmentation",
        "---",
        "",
        f"# {method} (mixreorg_jax export)",
        "",
        (
            f"A {method} model trained with mixreorg_jax"
            if record and record.config
            else "A model of GroupViT's architecture from mixreorg_jax"
        )
        + " (JAX/Flax; MixReorg, Cai et al. 2023, trains the architecture of GroupViT, Xu et "
        "al. 2022), converted to `transformers.GroupViTModel`. The conversion is exact: every "
        "tensor is the checkpoint's.",
        "",
        "## Architecture",
        "",
        *_architecture_section(config, num_params),
        "",
        "## Training",
        "",
        *_training_section(record, checkpoint),
        "",
        "## Evaluation",
        "",
        *_evaluation_section(record),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'classify = pipeline("zero-shot-image-classification", model="PATH")',
        'classify(image, candidate_labels=["cat", "dog"], hypothesis_template="a photo of a {}.")',
        "```",
        "",
        "`GroupViTModel.from_pretrained(PATH)` and `AutoProcessor.from_pretrained(PATH)` (a "
        "CLIPProcessor) load the parts; the pipeline warns that GroupViT is not among its "
        "models, but runs it. For zero-shot segmentation with our protocol: "
        "`mixreorg_jax.load(PATH).segment(image, class_names)`.",
        "",
        "## Preprocessing: transformers and mixreorg_jax",
        "",
        *_preprocessing_section(config, preprocessing, logit_scale),
        "",
        "## Export",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)
