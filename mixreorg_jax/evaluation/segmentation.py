"""Zero-shot semantic segmentation with GroupViT's released protocol (method.md section 2).

In the training loop (`config.evals.seg = dict(type='segmentation', dataset='synthetic',
every_steps=500)`) and in the eval binary (`python -m mixreorg_jax.evaluate`) alike:

    evaluator = Evaluator(eval_config, model=groupvit.GroupViT(model_config), mesh=mesh)
    evaluator.run(state)          # {'miou': ..., 'miou_top_class': ..., ...}, fractions
    evaluator.evaluate(variables) # everything the binary writes to results.json

Per image: resize (short side 448), normalise, cut 448 x 448 windows at stride 224; the windows
of consecutive images are packed into calls of `batch` crops, split over the local devices; the
model and the `ops.segmentation` post-processing turn each crop into class scores; the window
scores are averaged, resized to the image and arg-maxed, and the image's confusion matrix is
added to the dataset's. Each process evaluates every `process_count`-th image on its own devices;
the matrices are summed over processes at the end.

Beside the model's mIoU, every evaluation reports three trivial references computed from the
same crops:
  all_background: every pixel background (sets with a background class only).
  top_class: every pixel the image's top class: the class with the highest pooled-image
      probability, averaged over the image's windows.
  group_oracle: each final group of each window labelled with its majority ground-truth class
      (the ground truth resized to the window's resolution with nearest neighbours), then
      windows merged and resized like the model's scores: how good the grouping alone is.

`bg_thresh='auto'` sweeps `bg_sweep` on `bg_thresh_split` and evaluates `split` with the
threshold of the best mIoU there; choosing it on the reported split itself is refused.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import config_dict

from mixreorg_jax import evaluation
from mixreorg_jax.data import prompts, segmentation_sets, synthetic_tfds
from mixreorg_jax.data.tokenizer import get_tokenizer
from mixreorg_jax.evaluation import visualize
from mixreorg_jax.models import groupvit
from mixreorg_jax.ops import miou as miou_ops
from mixreorg_jax.ops import segmentation as seg_ops
from mixreorg_jax.training import sharding

# The segmentation template of the released evaluation; `templates=('imagenet80',)` averages the
# 80 ImageNet templates instead.
DEFAULT_TEMPLATES = ("a photo of a {}.",)
TEMPLATE_SETS = {"imagenet80": prompts.IMAGENET_TEMPLATES}
# Thresholds tried by bg_thresh='auto'; denser at the low end, where models trained with mixing
# peak (method.md section 5).
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
IGNORE_LABEL = segmentation_sets.IGNORE_LABEL
# Threads decoding images ahead of the model.
_READ_AHEAD = 8
# Texts per call of the text encoder.
_TEXT_CHUNK = 64


def default_config(dataset: str) -> ml_collections.ConfigDict:
    """Every field of a segmentation eval config, with the released protocol's values for `dataset`.

    Fields:
      dataset: a `segmentation_sets.DATASET_NAMES` entry. data_dir: its root ('' in the training
          loop with dataset 'synthetic': the train config's `data.synthetic_dir`).
      split: the split reported. max_images: evaluate only the first N (0: all).
      templates: prompt templates, averaged per class ('imagenet80' names CLIP's 80).
      bg_thresh: float (sets with background), None (sets without), or 'auto': the best of
          `bg_sweep` on `bg_thresh_split`.
      short_side, max_long, window, stride: resize and sliding windows in pixels; 0 takes them
          from the model (window = its image_size, short_side = window, stride = window // 2).
      top_k: classes kept per crop. batch: crops per model call (rounded up to a multiple of
          the local device count).
      save_predictions: pictures and predicted masks of the first N images go to `output_dir`.
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
    c.every_steps = 0
    c.dataset = dataset
    c.data_dir = ""
    c.split = "test" if synthetic else "val"
    c.max_images = 0
    c.templates = DEFAULT_TEMPLATES
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
    return c


def _split_name(split: str) -> str:
    return "validation" if split == "val" else split


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


def expand_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """Template strings; a named set ('imagenet80') stands for its templates."""
    if isinstance(templates, str):
        templates = (templates,)
    expanded = []
    for template in templates:
        if template in TEMPLATE_SETS:
            expanded.extend(TEMPLATE_SETS[template])
        elif "{}" in template:
            expanded.append(template)
        else:
            raise ValueError(
                f"template {template!r} has no '{{}}' for the class name and is not "
                f"one of the named sets {sorted(TEMPLATE_SETS)}"
            )
    if not expanded:
        raise ValueError("no prompt templates given")
    return tuple(expanded)


# ------------------------------------------------------------------------- per-crop computation
def _encode_crops(module: groupvit.GroupViT, crops):
    out = module.encode_image(crops)
    return out["embedding"], module.project_segments(out["segments"]), out["soft_assignments"]


# The model and the post-processing are compiled apart: the model, by far the slower to compile,
# then compiles once per crop shape, whatever the classes, thresholds or dataset.
@functools.partial(jax.jit, static_argnames=("model_config",))
def encode_crops(variables, crops, *, model_config):
    """float[n, h, w, 3] crops (h, w multiples of the patch size) -> (image embeddings [n, D],
    segment embeddings [n, G, D], soft assignments per grouping stage)."""
    return groupvit.GroupViT(model_config).apply(variables, crops, method=_encode_crops)


@functools.partial(jax.jit, static_argnames=("crop_hw", "patch_size", "num_label_classes", "top_k"))
def crop_outputs(
    encoded,
    logit_scale,
    class_emb,
    label_crops,
    thresholds,
    *,
    crop_hw,
    patch_size,
    num_label_classes,
    top_k,
):
    """Everything the evaluation needs from a batch of encoded crops.

    Args:
        encoded: `encode_crops` of the crops, zero-padded on the bottom and right to a multiple
            of the patch size.
        logit_scale: the learned log-scale (exponentiated and clamped at 100 here).
        class_emb: float[C, D] class embeddings (background excluded).
        label_crops: int[n, h, w] ground truth at the windows' resolution (255: ignored).
        thresholds: float[T] background thresholds; T = 0 for sets without background.
        crop_hw: static (h, w) of the crops before padding.
        num_label_classes: K, the dataset's label classes (C + 1 with background).
        top_k: classes kept per crop.

    Returns dict:
        scores: float[n, T + C, h, w]: channel t < T is the background channel of `thresholds[t]`
            (`pixel_class_scores`), the last C channels the class scores.
        oracle: float[n, K, h, w] one-hot group-oracle labels.
        image_probs: float[n, C] pooled-image class probabilities.
        groups: int32[n, h, w] final group of each pixel.
    """
    image_emb, segment_emb, soft_assignments = encoded
    height, width = crop_hw
    padded_hw = (height + -height % patch_size, width + -width % patch_size)
    onehot = seg_ops.group_masks(
        seg_ops.chain_assignments(soft_assignments),
        (padded_hw[0] // patch_size, padded_hw[1] // patch_size),
        padded_hw,
    )[:, :, :height, :width]
    scale = jnp.minimum(jnp.exp(logit_scale), seg_ops.MAX_LOGIT_SCALE)
    scores = seg_ops.group_class_scores(segment_emb, image_emb, class_emb, scale, top_k=top_k)
    channels = [
        seg_ops.pixel_class_scores(onehot, scores, bg_thresh=thresholds[t])[:, :1]
        for t in range(thresholds.shape[0])
    ]
    channels.append(seg_ops.pixel_class_scores(onehot, scores))
    image_probs = jax.nn.softmax(
        scale * groupvit.l2_normalize(image_emb) @ groupvit.l2_normalize(class_emb).T, axis=-1
    )
    oracle = seg_ops.group_oracle_prediction(onehot, label_crops, num_label_classes, IGNORE_LABEL)
    return dict(
        scores=jnp.concatenate(channels, axis=1),
        oracle=jax.nn.one_hot(oracle, num_label_classes, axis=1, dtype=jnp.float32),
        image_probs=image_probs,
        groups=jnp.argmax(onehot, axis=1).astype(jnp.int32),
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "image_hw",
        "resized_hw",
        "window",
        "stride",
        "num_thresholds",
        "num_label_classes",
        "has_background",
    ),
)
def finish_image(
    scores,
    oracle,
    image_probs,
    label,
    *,
    image_hw,
    resized_hw,
    window,
    stride,
    num_thresholds,
    num_label_classes,
    has_background,
):
    """One image's predictions and confusion matrices from its windows' `crop_outputs`.

    Returns:
        predictions: int32[max(T, 1), H, W], one per threshold (labels of the dataset's classes).
        confusions: dict of int32 [K, K] matrices: 'prediction' ([max(T, 1), K, K]), 'top_class',
            'group_oracle' and, with background, 'all_background'.
    """
    merge = functools.partial(
        seg_ops.merge_windows, image_hw=resized_hw, window=window, stride=stride
    )
    merged = merge(scores)
    classes = merged[num_thresholds:]
    if num_thresholds:
        predictions = jnp.stack(
            [
                seg_ops.scores_to_labels(jnp.concatenate([merged[t : t + 1], classes]), image_hw)
                for t in range(num_thresholds)
            ]
        )
    else:
        predictions = seg_ops.scores_to_labels(classes, image_hw)[None]
    oracle_prediction = seg_ops.scores_to_labels(merge(oracle), image_hw)
    offset = 1 if has_background else 0
    top_class = jnp.argmax(jnp.mean(image_probs, axis=0)) + offset
    label = label.astype(jnp.int32)
    confusion = functools.partial(
        miou_ops.confusion_matrix,
        label=label,
        num_classes=num_label_classes,
        ignore_index=IGNORE_LABEL,
    )
    confusions = dict(
        prediction=jax.vmap(lambda p: confusion(p))(predictions),
        top_class=confusion(jnp.full_like(label, top_class)),
        group_oracle=confusion(oracle_prediction),
    )
    if has_background:
        confusions["all_background"] = confusion(jnp.zeros_like(label))
    return predictions, confusions


def nearest_resize(label: np.ndarray, out_hw: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map [H, W] (pixel centres, like PIL's NEAREST)."""
    rows = np.minimum(
        ((np.arange(out_hw[0]) + 0.5) * label.shape[0] / out_hw[0]).astype(int), label.shape[0] - 1
    )
    cols = np.minimum(
        ((np.arange(out_hw[1]) + 0.5) * label.shape[1] / out_hw[1]).astype(int), label.shape[1] - 1
    )
    return label[rows[:, None], cols[None, :]]


def paste_window_groups(
    groups: np.ndarray, resized_hw, image_hw, window: int, stride: int, num_groups: int
) -> np.ndarray:
    """int[H, W] group ids of an image: window k's group g is id k * num_groups + g (groups are
    per window), later windows drawn over earlier ones, resized to the image (nearest)."""
    canvas = np.zeros(resized_hw, np.int32)
    for k, (y1, y2, x1, x2) in enumerate(seg_ops.window_boxes(resized_hw, window, stride)):
        canvas[y1:y2, x1:x2] = groups[k] + k * num_groups
    return nearest_resize(canvas, image_hw)


def inference_config(model_config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
    """The model config as a hashable jit argument, its training-only fields set to fixed values
    (they do not change inference), so that checkpoints differing only there share compilations."""
    config = ml_collections.ConfigDict(model_config.to_dict())
    for field, value in (("drop_path_rate", 0.0), ("remat", False), ("logit_scale_init", 0.0)):
        if field in config:
            config[field] = value
    return ml_collections.FrozenConfigDict(config)


# ------------------------------------------------------------------------- images -> results
@dataclasses.dataclass
class ImageResult:
    """One segmented image. Arrays are device arrays unless noted."""

    index: int  # in the dataset
    example: dict  # the dataset's example (numpy image, label, id)
    predictions: jax.Array  # int32[max(T, 1), H, W]
    confusions: dict  # as `finish_image`
    groups: np.ndarray | None  # int[H, W] (`paste_window_groups`), when asked for
    call_group: int  # images whose windows shared model calls share this number


@dataclasses.dataclass(frozen=True)
class _PreparedImage:
    index: int
    example: dict
    crops: jax.Array  # float[n, h, w, 3]
    label_crops: jax.Array  # int32[n, h, w]
    resized_hw: tuple[int, int]


def local_mesh(mesh: jax.sharding.Mesh | None) -> jax.sharding.Mesh:
    """A (data, fsdp) mesh over this process's devices of `mesh` (all local devices if None)."""
    if mesh is None:
        devices = jax.local_devices()
    else:
        devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        if len(devices) == mesh.devices.size:
            return mesh
    return jax.sharding.Mesh(
        np.array(devices).reshape(-1, 1),
        sharding.BATCH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )


def _host_copy_if_global(x):
    # Arrays spread over other processes (fsdp across hosts) are gathered whole on every host.
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return multihost_utils.process_allgather(x, tiled=True)
    return x


class Segmenter:
    """A model and the protocol's settings on this process's devices: images in, labels out."""

    def __init__(
        self,
        model_config: ml_collections.ConfigDict,
        mesh: jax.sharding.Mesh | None,
        *,
        short_side: int,
        max_long: int,
        window: int,
        stride: int,
        top_k: int,
        batch: int,
    ):
        self.model_config = inference_config(model_config)
        self.mesh = local_mesh(mesh)
        self.short_side, self.max_long = short_side, max_long
        self.window, self.stride, self.top_k = window, stride, top_k
        devices = self.mesh.devices.size
        self.batch = max(devices, math.ceil(batch / devices) * devices)
        self._tokenizer = get_tokenizer(model_config.context_length)
        self._num_groups = model_config.num_output_groups[-1]

    def place(self, variables: dict) -> dict:
        """The model's variables replicated on this process's devices."""
        variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
        variables = jax.tree.map(_host_copy_if_global, variables)
        return jax.device_put(variables, sharding.replicated(self.mesh))

    def class_embeddings(
        self, variables: dict, class_names: Sequence[str], templates: Sequence[str]
    ) -> jax.Array:
        """float[C, D]: each class's projected text embeddings averaged over the templates, then
        L2-normalised (method.md section 2, step 2)."""
        texts = [template.format(name) for name in class_names for template in templates]
        tokens = self._tokenizer(texts)
        # One chunk size for every class list (one compilation), split over the devices.
        devices = self.mesh.devices.size
        chunk = math.ceil(_TEXT_CHUNK / devices) * devices
        tokens = np.concatenate(
            [tokens, np.zeros((-len(tokens) % chunk,) + tokens.shape[1:], tokens.dtype)]
        )
        batch_sharding = sharding.batch_sharding(self.mesh)
        embeddings = jnp.concatenate(
            [
                _encode_text(
                    variables,
                    jax.device_put(tokens[i : i + chunk], batch_sharding),
                    model_config=self.model_config,
                )
                for i in range(0, len(tokens), chunk)
            ]
        )[: len(texts)]
        mean = jnp.mean(embeddings.reshape(len(class_names), len(templates), -1), axis=1)
        return jax.device_put(groupvit.l2_normalize(mean), sharding.replicated(self.mesh))

    def _prepare(self, index: int, example: dict) -> _PreparedImage:
        image = np.asarray(example["image"])
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"example {example.get('id', index)!r}: expected a uint8 [H, W, 3] "
                f"image, got {image.dtype}{image.shape}"
            )
        resized = seg_ops.normalize_image(
            seg_ops.resize_short_side(jnp.asarray(image), self.short_side, self.max_long)
        )
        resized_hw = tuple(resized.shape[:2])
        label = example.get("label")
        if label is None:
            label = np.full(image.shape[:2], IGNORE_LABEL, np.uint8)
        label = nearest_resize(np.asarray(label), resized_hw).astype(np.int32)[..., None]
        cut = functools.partial(seg_ops.cut_windows, window=self.window, stride=self.stride)
        return _PreparedImage(
            index, example, cut(resized), cut(jnp.asarray(label))[..., 0], resized_hw
        )

    def _run_pack(
        self,
        variables,
        class_emb,
        pack: list[_PreparedImage],
        static: dict,
        keep_groups,
        call_group: int,
    ) -> Iterator[ImageResult]:
        crops = jnp.concatenate([p.crops for p in pack])
        label_crops = jnp.concatenate([p.label_crops for p in pack])
        padding = -len(crops) % self.batch
        label_crops = jnp.pad(
            label_crops, ((0, padding), (0, 0), (0, 0)), constant_values=IGNORE_LABEL
        )
        batch_sharding = sharding.batch_sharding(self.mesh)
        crop_hw = tuple(crops.shape[1:3])
        patch = self.model_config.patch_size
        # A window is narrower than a patch multiple only when the image is (extreme aspect
        # ratios): the model sees it zero-padded, and the group maps are cut back.
        crops = jnp.pad(
            crops, ((0, padding), (0, -crop_hw[0] % patch), (0, -crop_hw[1] % patch), (0, 0))
        )
        thresholds = jax.device_put(
            jnp.asarray(static["thresholds"], jnp.float32).reshape(-1),
            sharding.replicated(self.mesh),
        )
        calls = []
        for i in range(0, len(crops), self.batch):
            encoded = encode_crops(
                variables,
                jax.device_put(crops[i : i + self.batch], batch_sharding),
                model_config=self.model_config,
            )
            calls.append(
                crop_outputs(
                    encoded,
                    variables["params"]["logit_scale"],
                    class_emb,
                    jax.device_put(label_crops[i : i + self.batch], batch_sharding),
                    thresholds,
                    crop_hw=crop_hw,
                    patch_size=patch,
                    num_label_classes=static["num_label_classes"],
                    top_k=self.top_k,
                )
            )
        # Merging runs on one device: the same numbers whatever the number of devices.
        device = self.mesh.devices.flat[0]
        outputs = {
            k: jax.device_put(jnp.concatenate([c[k] for c in calls]), device) for k in calls[0]
        }
        start = 0
        for prepared in pack:
            count = len(prepared.crops)
            window_out = {k: v[start : start + count] for k, v in outputs.items()}
            start += count
            image_hw = tuple(prepared.example["image"].shape[:2])
            label = prepared.example.get("label")
            if label is None:
                label = np.full(image_hw, IGNORE_LABEL, np.uint8)
            predictions, confusions = finish_image(
                window_out["scores"],
                window_out["oracle"],
                window_out["image_probs"],
                jnp.asarray(label),
                image_hw=image_hw,
                resized_hw=prepared.resized_hw,
                window=self.window,
                stride=self.stride,
                num_thresholds=len(static["thresholds"]),
                num_label_classes=static["num_label_classes"],
                has_background=bool(static["thresholds"]),
            )
            groups = None
            if keep_groups(prepared.index):
                groups = paste_window_groups(
                    np.asarray(window_out["groups"]),
                    prepared.resized_hw,
                    image_hw,
                    self.window,
                    self.stride,
                    self._num_groups,
                )
            yield ImageResult(
                prepared.index, prepared.example, predictions, confusions, groups, call_group
            )

    def segment(
        self,
        variables: dict,
        class_emb: jax.Array,
        examples: Iterable[tuple[int, dict]],
        *,
        thresholds: Sequence[float],
        num_label_classes: int,
        keep_groups=lambda index: False,
    ) -> Iterator[ImageResult]:
        """Segments (index, example) pairs, in order.

        Args:
            variables: from `place`. class_emb: from `class_embeddings`.
            examples: dataset examples (a missing 'label' counts as all ignored).
            thresholds: () without background, else the background thresholds to apply at once
                (the evaluation uses one; the 'auto' sweep many).
            num_label_classes: the label classes K (len(class_emb) + 1 with background).
            keep_groups: index -> whether to return that image's group map.
        """
        if num_label_classes != len(class_emb) + (1 if thresholds else 0):
            raise ValueError(
                f"{num_label_classes} label classes do not match "
                f"{len(class_emb)} class embeddings with "
                f"{'a' if thresholds else 'no'} background channel"
            )
        static = dict(
            thresholds=tuple(float(t) for t in thresholds), num_label_classes=num_label_classes
        )
        # Consecutive images' windows share model calls until a call is full; a window of
        # another size (an image smaller than the window) starts new calls.
        pack, call_group = [], 0
        for index, example in examples:
            prepared = self._prepare(index, example)
            if pack and prepared.crops.shape[1:] != pack[0].crops.shape[1:]:
                yield from self._run_pack(
                    variables, class_emb, pack, static, keep_groups, call_group
                )
                pack, call_group = [], call_group + 1
            pack.append(prepared)
            if sum(len(p.crops) for p in pack) >= self.batch:
                yield from self._run_pack(
                    variables, class_emb, pack, static, keep_groups, call_group
                )
                pack, call_group = [], call_group + 1
        if pack:
            yield from self._run_pack(variables, class_emb, pack, static, keep_groups, call_group)


@functools.partial(jax.jit, static_argnames=("model_config",))
def _encode_text(variables, tokens, *, model_config):
    return groupvit.GroupViT(model_config).apply(
        variables, tokens, method=groupvit.GroupViT.encode_text
    )["embedding"]


def _read_ahead(dataset, indices: Sequence[int]) -> Iterator[tuple[int, dict]]:
    """(index, dataset[index]) in order, decoded by threads a few images ahead."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        pending = collections.deque()
        for index in indices:
            pending.append((index, pool.submit(dataset.__getitem__, index)))
            if len(pending) >= _READ_AHEAD:
                i, future = pending.popleft()
                yield i, future.result()
        while pending:
            i, future = pending.popleft()
            yield i, future.result()


def sum_over_processes(counts: np.ndarray) -> np.ndarray:
    """int64 counts summed over all processes (exact: sent as two int32 halves)."""
    counts = np.asarray(counts, np.int64)
    if jax.process_count() == 1:
        return counts
    high, low = np.divmod(counts, 1 << 30)
    gathered = np.asarray(
        multihost_utils.process_allgather(np.stack([high, low]).astype(np.int32)), np.int64
    )
    return (gathered[:, 0] * (1 << 30) + gathered[:, 1]).sum(axis=0)


# ------------------------------------------------------------------------- the evaluator
def _iou_dict(class_names, per_class_iou) -> dict[str, float | None]:
    return {
        name: None if math.isnan(v) else float(v) for name, v in zip(class_names, per_class_iou)
    }


class Evaluator:
    """Zero-shot mIoU of one dataset split; the same code in the training loop and the binary."""

    def __init__(
        self,
        eval_config: ml_collections.ConfigDict,
        *,
        model: groupvit.GroupViT,
        mesh: jax.sharding.Mesh | None = None,
        config: ml_collections.ConfigDict | None = None,
    ):
        """Args: eval_config: fields of `default_config` (`dataset` required; the rest default);
        model: the GroupViT module (only its config is used); mesh: devices to use (this
        process's part of it); config: the train config (for `data.synthetic_dir`), if any."""
        self.settings = self._resolve(eval_config, model.config, config)
        s = self.settings
        self.schedule = evaluation.Schedule(s.every_steps)
        self.bg_thresh = parse_bg_thresh(s.bg_thresh)
        self.templates = expand_templates(s.templates)
        self.dataset = segmentation_sets.get_segmentation_dataset(s.dataset, s.data_dir, s.split)
        self.class_names = list(self.dataset.class_names)
        self.has_background = bool(self.dataset.has_background)
        if self.has_background and self.bg_thresh is None:
            raise ValueError(
                f"{s.dataset} has a background class: bg_thresh must be a number or "
                "'auto', not None"
            )
        if not self.has_background and self.bg_thresh is not None:
            raise ValueError(
                f"{s.dataset} has no background class: bg_thresh must be None, got "
                f"{self.bg_thresh!r}"
            )
        self.threshold_dataset = None
        if self.bg_thresh == "auto":
            if _split_name(s.bg_thresh_split) == _split_name(s.split):
                raise ValueError(
                    f"bg_thresh='auto' would choose the threshold on the reported "
                    f"split {s.split!r}; set bg_thresh_split to another split"
                )
            if not s.bg_sweep:
                raise ValueError("bg_thresh='auto' needs thresholds in bg_sweep")
            self.threshold_dataset = segmentation_sets.get_segmentation_dataset(
                s.dataset, s.data_dir, s.bg_thresh_split
            )
            if list(self.threshold_dataset.class_names) != self.class_names:
                raise ValueError(
                    f"splits {s.split!r} and {s.bg_thresh_split!r} have different classes"
                )
        self.segmenter = Segmenter(
            model.config,
            mesh,
            short_side=s.short_side,
            max_long=s.max_long,
            window=s.window,
            stride=s.stride,
            top_k=s.top_k,
            batch=s.batch,
        )
        self.text_class_names = self.class_names[1:] if self.has_background else self.class_names

    @staticmethod
    def _resolve(eval_config, model_config, train_config) -> ml_collections.ConfigDict:
        if "dataset" not in eval_config:
            raise ValueError(
                "segmentation evaluator: `dataset` is required; known: "
                f"{', '.join(segmentation_sets.DATASET_NAMES)}"
            )
        settings = default_config(eval_config["dataset"])
        for key, value in eval_config.items():
            if key not in settings:
                raise ValueError(
                    f"segmentation evaluator: unknown field {key!r}; known: "
                    f"{', '.join(sorted(settings))}"
                )
            try:
                settings[key] = tuple(value) if isinstance(value, list) else value
            except TypeError as e:
                raise ValueError(f"segmentation evaluator: field {key!r}: {e}") from None
        if not settings.data_dir and settings.dataset == "synthetic" and train_config is not None:
            # The world the run trains on, with its overrides (prepared already by then).
            settings.data_dir = synthetic_tfds.prepare_synthetic_world(train_config.data)
        if not settings.data_dir:
            raise ValueError(f"segmentation evaluator ({settings.dataset}): data_dir is not set")
        settings.data_dir = os.path.expanduser(settings.data_dir)
        settings.window = settings.window or model_config.image_size
        settings.short_side = settings.short_side or settings.window
        settings.stride = settings.stride or max(settings.window // 2, 1)
        for key in ("window", "stride", "short_side", "max_long", "top_k", "batch"):
            if settings[key] < 1:
                raise ValueError(
                    f"segmentation evaluator: {key} must be positive, got {settings[key]}"
                )
        if settings.save_predictions and not settings.output_dir:
            raise ValueError("segmentation evaluator: save_predictions needs output_dir")
        return settings

    def due(self, step: int, total_steps: int) -> bool:
        return self.schedule.due(step, total_steps)

    def run(self, state: dict) -> dict[str, float]:
        """Scalars for the training loop's metrics (fractions)."""
        results = self.evaluate(
            {"params": state["params"]["model"], "batch_stats": state["batch_stats"]}
        )
        scalars = {"miou": results["miou"]}
        scalars.update({f"miou_{name}": r["miou"] for name, r in results["baselines"].items()})
        if self.bg_thresh == "auto":
            scalars["bg_thresh"] = results["bg_thresh"]
        return scalars

    def _indices(self, dataset) -> list[int]:
        count = len(dataset)
        if self.settings.max_images:
            count = min(count, self.settings.max_images)
        return list(range(jax.process_index(), count, jax.process_count()))

    def _confusions(
        self, dataset, variables, class_emb, thresholds, *, save: bool
    ) -> tuple[dict[str, np.ndarray], int, float | None]:
        """Dataset-wide confusion matrices (summed over processes), the number of images, and
        this process's images/s after the first model calls (None if there was one)."""
        save_count = self.settings.save_predictions if save else 0
        keep = lambda index: index < save_count
        totals: dict[str, np.ndarray] = {}
        in_flight = collections.deque()

        def add(confusions):
            for name, cm in jax.device_get(confusions).items():
                totals[name] = totals.get(name, 0) + np.asarray(cm, np.int64)

        num_images, steady_images, steady_start = 0, 0, None
        results = self.segmenter.segment(
            variables,
            class_emb,
            _read_ahead(dataset, self._indices(dataset)),
            thresholds=thresholds,
            num_label_classes=len(self.class_names),
            keep_groups=keep,
        )
        for result in results:
            num_images += 1
            # Throughput without compilation: from the end of the first model calls' images
            # (whose next calls are not launched before this loop asks for them).
            if result.call_group == 0:
                jax.block_until_ready(result.predictions)
                steady_start = time.perf_counter()
            else:
                steady_images += 1
            # Fetched two images late, so the host never waits on work it just launched.
            in_flight.append(result.confusions)
            if len(in_flight) > 2:
                add(in_flight.popleft())
            if keep(result.index):
                self._save_pictures(result)
        while in_flight:
            add(in_flight.popleft())
        num_classes = len(self.class_names)
        if not totals:  # This process had no images (more processes than images).
            totals = {
                name: np.zeros(shape, np.int64)
                for name, shape in (
                    ("prediction", (max(len(thresholds), 1), num_classes, num_classes)),
                    ("top_class", (num_classes,) * 2),
                    ("group_oracle", (num_classes,) * 2),
                )
            }
            if self.has_background:
                totals["all_background"] = np.zeros((num_classes,) * 2, np.int64)
        totals = {name: sum_over_processes(cm) for name, cm in sorted(totals.items())}
        steady_rate = (
            steady_images / (time.perf_counter() - steady_start)
            if (steady_images and jax.process_count() == 1)
            else None
        )
        return totals, int(sum_over_processes(np.array([num_images]))[0]), steady_rate

    def _save_pictures(self, result: ImageResult) -> None:
        output_dir = self.settings.output_dir
        example = result.example
        name = str(example.get("id", result.index)).replace(os.sep, "_")
        prediction = np.asarray(result.predictions[0])
        palette = visualize.label_palette(self.has_background)
        visualize.save_label_png(
            os.path.join(output_dir, "predictions", f"{name}.png"), prediction, palette
        )
        visualize.save_comparison(
            os.path.join(output_dir, "pictures", f"{name}.png"),
            example["image"],
            prediction,
            example["label"],
            self.class_names,
            palette,
        )
        visualize.save_grouping(
            os.path.join(output_dir, "pictures", f"{name}_groups.png"),
            example["image"],
            result.groups,
        )

    def evaluate(self, variables: dict) -> dict[str, Any]:
        """Evaluates model variables {'params', 'batch_stats'}; every process gets the results.

        Returns (fractions; IoUs of classes absent from ground truth and predictions are None):
            dataset, split, num_images, miou, per_class_iou {class: IoU}, bg_thresh (the one
            used), baselines {all_background, top_class, group_oracle: {miou, per_class_iou}},
            confusion_matrix (rows ground truth), protocol (the settings), seconds and
            images_per_second (everything, compilation included),
            images_per_second_after_compilation (from the end of the first model calls' images
            on; None with one call or several processes), and for bg_thresh='auto' bg_thresh_sweep {threshold: mIoU} on
            `bg_thresh_split`.
        """
        # The evaluator places every array itself: the caller's mesh context (the training
        # loop's) would clash with the arrays kept on one device for merging.
        with jax.set_mesh(None):
            return self._evaluate(variables)

    def _evaluate(self, variables: dict) -> dict[str, Any]:
        start = time.perf_counter()
        s = self.settings
        variables = self.segmenter.place(variables)
        class_emb = self.segmenter.class_embeddings(
            variables, self.text_class_names, self.templates
        )
        results: dict[str, Any] = {"dataset": s.dataset, "split": s.split}
        if self.bg_thresh == "auto":
            sweep = tuple(float(t) for t in s.bg_sweep)
            totals, _, _ = self._confusions(
                self.threshold_dataset, variables, class_emb, sweep, save=False
            )
            mious = [miou_ops.miou_from_confusion(cm)[0] for cm in totals["prediction"]]
            if all(math.isnan(m) for m in mious):
                raise ValueError(f"no labelled pixels in {s.dataset}:{s.bg_thresh_split}")
            thresholds = (sweep[int(np.nanargmax(mious))],)
            results["bg_thresh_sweep"] = {str(t): m for t, m in zip(sweep, mious)}
        elif self.bg_thresh is None:
            thresholds = ()
        else:
            thresholds = (self.bg_thresh,)
        totals, num_images, steady_rate = self._confusions(
            self.dataset, variables, class_emb, thresholds, save=True
        )
        miou, per_class = miou_ops.miou_from_confusion(totals["prediction"][0])
        results.update(
            num_images=num_images,
            miou=miou,
            per_class_iou=_iou_dict(self.class_names, per_class),
            bg_thresh=thresholds[0] if thresholds else None,
        )
        baselines = {}
        for name in ("all_background", "top_class", "group_oracle"):
            if name in totals:
                base_miou, base_per_class = miou_ops.miou_from_confusion(totals[name])
                baselines[name] = dict(
                    miou=base_miou, per_class_iou=_iou_dict(self.class_names, base_per_class)
                )
        seconds = time.perf_counter() - start
        results.update(
            baselines=baselines,
            confusion_matrix=totals["prediction"][0].tolist(),
            class_names=self.class_names,
            protocol=dict(
                templates=list(self.templates),
                bg_thresh=s.bg_thresh,
                bg_thresh_split=s.bg_thresh_split if self.bg_thresh == "auto" else None,
                short_side=s.short_side,
                max_long=s.max_long,
                window=s.window,
                stride=s.stride,
                top_k=s.top_k,
                batch=self.segmenter.batch,
                max_images=s.max_images,
                local_devices=self.segmenter.mesh.devices.size,
                processes=jax.process_count(),
            ),
            seconds=seconds,
            images_per_second=num_images / seconds,
            images_per_second_after_compilation=steady_rate,
        )
        return results
