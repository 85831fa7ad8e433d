"""The segmentation evaluator's settings: every field with the released protocol's values, and
the checks that make a partial eval config complete and consistent (docs/method.md §2).

    config = default_config("voc")                   # what configs/eval/voc.py returns
    settings = resolve(eval_config, model_config, train_config)
    dataset, threshold_dataset = open_splits(settings)
    segmenter = make_segmenter(settings, model_config, mesh)
"""

import os

import jax
import ml_collections
from ml_collections import config_dict

from mixreorg_jax.data import segmentation_sets
from mixreorg_jax.evaluation import inference, loop

# Thresholds tried by bg_thresh='auto'; denser at the low end, where models trained with mixing
# peak (docs/method.md §5).
DEFAULT_BG_SWEEP = (
    0.02,
    0.05,
    0.075,
    0.1,
    0.125,
    0.15,
    0.2,
    0.25,
    0.3,
    0.35,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    0.95,
)
# The settings the inference engine takes as they are (its batch is rounded to the devices).
ENGINE_FIELDS = ("short_side", "max_long", "window", "stride", "top_k")


def default_config(dataset: str) -> ml_collections.ConfigDict:
    """Every field of a segmentation eval config, with the released protocol's values for `dataset`.

    Fields:
      dataset: a `segmentation_sets.DATASET_NAMES` entry. data_dir: its root ('' in the training
          loop with dataset 'synthetic': the train config's synthetic world).
      split: the split reported. max_images: evaluate only the first N (0: all).
      templates: prompt templates, averaged per class ('imagenet80' names CLIP's 80).
      bg_thresh: float (sets with background), None (sets without), or 'auto': the best of
          `bg_sweep` on `bg_thresh_split`.
      short_side, max_long, window, stride: resize and sliding windows in pixels; 0 takes them
          from the model (window = its image_size, short_side = window, stride = window // 2).
      top_k: classes kept per crop. batch: crops per model call (rounded up to a multiple of
          the local device count).
      save_predictions: pictures and predicted masks of the first N images go to `output_dir`.
      summary_images: the training loop's image summary: the predicted masks of this process's
          first N images over the images, each fitted into window x window (0: none).
      enabled: False leaves the evaluation out of the training loop.
      every_steps: the training loop's schedule (0: last step only).
    """
    if dataset not in segmentation_sets.DATASET_NAMES:
        raise ValueError(
            f"Unknown segmentation dataset {dataset!r}; known: "
            f"{', '.join(segmentation_sets.DATASET_NAMES)}"
        )
    synthetic = dataset == "synthetic"
    bg_thresh = "auto" if synthetic else segmentation_sets.DATASET_DEFAULTS[dataset]["bg_thresh"]
    c = ml_collections.ConfigDict()
    c.type = "segmentation"
    c.enabled = True
    c.every_steps = 0
    c.dataset = dataset
    c.data_dir = ""
    c.split = "test" if synthetic else "val"
    c.max_images = 0
    c.templates = inference.DEFAULT_TEMPLATES
    # Any type: a float, None or 'auto' (all settable from the command line).
    c.bg_thresh = config_dict.FieldReference(bg_thresh, field_type=object)
    c.bg_thresh_split = "val"
    c.bg_sweep = DEFAULT_BG_SWEEP
    c.short_side = 0 if synthetic else 448
    c.max_long = 2048
    c.window = 0 if synthetic else 448
    c.stride = 0 if synthetic else 224
    c.top_k = 5
    c.batch = 8
    c.save_predictions = 0
    c.output_dir = ""
    c.summary_images = 4
    return c


def parse_bg_thresh(value) -> float | str | None:
    """float, None or 'auto' from a config value ('none' and '' count as None)."""
    if value is None or isinstance(value, str) and value.lower() in ("none", ""):
        return None
    if isinstance(value, str) and value.lower() == "auto":
        return "auto"
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"bg_thresh must be a number, None or 'auto', got {value!r}") from None


def resolve(
    eval_config: ml_collections.ConfigDict,
    model_config: ml_collections.ConfigDict,
    train_config: ml_collections.ConfigDict | None = None,
) -> ml_collections.ConfigDict:
    """`default_config(eval_config.dataset)` updated with `eval_config`; the sizes left at 0 taken
    from the model, and a synthetic `data_dir` left empty from the train config's world.

    Raises ValueError naming the field for a missing dataset, an unknown field, a size below 1,
    a negative summary_images, save_predictions without output_dir, or no data_dir.
    """
    if "dataset" not in eval_config:
        raise ValueError(
            "segmentation evaluator: `dataset` is required; known: "
            f"{', '.join(segmentation_sets.DATASET_NAMES)}"
        )
    settings = loop.with_overrides(
        default_config(eval_config["dataset"]), eval_config, "segmentation evaluator"
    )
    if not settings.data_dir and settings.dataset == "synthetic" and train_config is not None:
        # Deferred: importing it registers the synthetic world's TFDS builder.
        from mixreorg_jax.data import synthetic_tfds

        # The world the run trains on, with its overrides (prepared already by then).
        settings.data_dir = synthetic_tfds.prepare_synthetic_world(train_config.data)
    if not settings.data_dir:
        raise ValueError(f"segmentation evaluator ({settings.dataset}): data_dir is not set")
    settings.data_dir = os.path.expanduser(settings.data_dir)
    settings.window = settings.window or model_config.image_size
    settings.short_side = settings.short_side or settings.window
    settings.stride = settings.stride or max(settings.window // 2, 1)
    for key in ENGINE_FIELDS + ("batch",):
        if settings[key] < 1:
            raise ValueError(f"segmentation evaluator: {key} must be positive, got {settings[key]}")
    if settings.summary_images < 0:
        raise ValueError("segmentation evaluator: summary_images must be >= 0")
    if settings.save_predictions and not settings.output_dir:
        raise ValueError("segmentation evaluator: save_predictions needs output_dir")
    return settings


def _split_name(split: str) -> str:
    return "validation" if split == "val" else split


def open_splits(settings: ml_collections.ConfigDict) -> tuple:
    """(the reported split, the split that bg_thresh='auto' chooses on, else None) as
    `segmentation_sets` datasets, once `bg_thresh` is known to fit the dataset: a number or
    'auto' with a background class, None without; 'auto' never on the reported split."""
    bg_thresh = parse_bg_thresh(settings.bg_thresh)
    dataset = segmentation_sets.get_segmentation_dataset(
        settings.dataset, settings.data_dir, settings.split
    )
    if dataset.has_background and bg_thresh is None:
        raise ValueError(
            f"{settings.dataset} has a background class: bg_thresh must be a number or "
            "'auto', not None"
        )
    if not dataset.has_background and bg_thresh is not None:
        raise ValueError(
            f"{settings.dataset} has no background class: bg_thresh must be None, got {bg_thresh!r}"
        )
    if bg_thresh != "auto":
        return dataset, None
    if _split_name(settings.bg_thresh_split) == _split_name(settings.split):
        raise ValueError(
            f"bg_thresh='auto' would choose the threshold on the reported split "
            f"{settings.split!r}; set bg_thresh_split to another split"
        )
    if not settings.bg_sweep:
        raise ValueError("bg_thresh='auto' needs thresholds in bg_sweep")
    threshold_dataset = segmentation_sets.get_segmentation_dataset(
        settings.dataset, settings.data_dir, settings.bg_thresh_split
    )
    if list(threshold_dataset.class_names) != list(dataset.class_names):
        raise ValueError(
            f"splits {settings.split!r} and {settings.bg_thresh_split!r} have different classes"
        )
    return dataset, threshold_dataset


def make_segmenter(
    settings: ml_collections.ConfigDict,
    model_config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh | None,
) -> inference.Segmenter:
    """The inference engine with the protocol of `resolve`d settings on `mesh`; raises ValueError
    first when a call of `batch` crops would not fit in memory (`inference.check_memory`)."""
    engine_settings = {k: settings[k] for k in ENGINE_FIELDS}
    inference.check_memory(
        model_config,
        short_side=settings.short_side,
        max_long=settings.max_long,
        window=settings.window,
        batch=settings.batch,
        mesh=mesh,
    )
    return inference.Segmenter(model_config, mesh, batch=settings.batch, **engine_settings)


def protocol(settings: ml_collections.ConfigDict, segmenter: inference.Segmenter) -> dict:
    """The settings that results.json records, with what the engine made of them."""
    auto = parse_bg_thresh(settings.bg_thresh) == "auto"
    return dict(
        templates=list(inference.expand_templates(settings.templates)),
        bg_thresh=settings.bg_thresh,
        bg_thresh_split=settings.bg_thresh_split if auto else None,
        **{k: settings[k] for k in ENGINE_FIELDS},
        batch=segmenter.batch,
        max_images=settings.max_images,
        local_devices=segmenter.mesh.devices.size,
        processes=jax.process_count(),
    )
