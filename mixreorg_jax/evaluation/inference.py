"""The one inference engine: pictures and class names in, labels out (docs/method.md §2), and
the embeddings that zero-shot classification and retrieval compare.

GroupViT's released zero-shot protocol, the same code behind `python -m mixreorg_jax.segment`,
`mixreorg_jax.load(path).segment(...)`, the eval binary and the in-loop evaluators:

    embedder = Embedder(model_config, mesh, batch=64)              # images and texts
    variables = embedder.place(variables)
    image_emb = embedder.image_embeddings(variables, images)       # float[n, D], L2-normalised
    text_emb = embedder.text_embeddings(variables, ["a dog on a sofa", ...])

    labels = segment(variables, model_config, image, ["cat", "dog"], bg_thresh=0.5)  # one picture
    check_memory(model_config, short_side=448, max_long=2048, window=448, batch=8)  # or ValueError

    segmenter = Segmenter(model_config, mesh, short_side=448, max_long=2048, window=448,
                          stride=224, top_k=5, batch=8)     # a dataset; also an Embedder
    variables = segmenter.place(variables)
    class_emb = segmenter.class_embeddings(variables, class_names, expand_templates(templates))
    for result in segmenter.segment(variables, class_emb, examples, thresholds=(0.95,),
                                    num_label_classes=len(class_names) + 1):
        result.predictions, result.confusions  # an `ImageResult` per (index, example)

Per image: resize (short side 448), normalise, cut 448 x 448 windows at stride 224; the windows
of consecutive images are packed into calls of `batch` crops, split over the local devices; the
model (`encode_crops`) and the `ops.segmentation` post-processing (`crop_outputs`) turn each crop
into class scores; the window scores are averaged, resized to the image and arg-maxed, and the
image's confusion matrices computed (`finish_image`).

Beside the model's prediction, every image gets three trivial references from the same crops:
  all_background: every pixel background (sets with a background class only).
  top_class: every pixel the image's top class: the class with the highest pooled-image
      probability, averaged over the image's windows.
  group_oracle: each final group of each window labelled with its majority ground-truth class
      (the ground truth resized to the window's resolution with nearest neighbours), then
      windows merged and resized like the model's scores: how good the grouping alone is.

Before a model is placed, `check_memory` compares `window_batch_bytes`, an upper bound on what one
call of crops needs, with the memory available (`available_memory`), and refuses a protocol that
would not fit with one line naming the setting to lower.
"""

import dataclasses
import functools
import math
import os
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mixreorg_jax import losses
from mixreorg_jax.data import prompts, segmentation_sets
from mixreorg_jax.data.tokenizer import get_tokenizer
from mixreorg_jax.formats import model_files
from mixreorg_jax.models import groupvit
from mixreorg_jax.ops import miou as miou_ops
from mixreorg_jax.ops import segmentation as seg_ops
from mixreorg_jax.training import sharding

# The segmentation template of the released evaluation; `templates=('imagenet80',)` averages the
# 80 ImageNet templates instead.
DEFAULT_TEMPLATES = ("a photo of a {}.",)
TEMPLATE_SETS = {"imagenet80": prompts.IMAGENET_TEMPLATES}
IGNORE_LABEL = segmentation_sets.IGNORE_LABEL
# Texts per call of the text encoder.
_TEXT_CHUNK = 64
# The GiB one call of crops may use, in place of what the machine reports (`available_memory`).
MEMORY_LIMIT_ENV = "MIXREORG_MEMORY_LIMIT_GIB"


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


def inference_config(model_config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
    """The model config as a hashable jit argument, its training-only fields set to fixed values
    (they do not change inference), so that checkpoints differing only there share compilations."""
    config = ml_collections.ConfigDict(model_config.to_dict())
    for field, value in (("drop_path_rate", 0.0), ("remat", False), ("logit_scale_init", 0.0)):
        if field in config:
            config[field] = value
    return ml_collections.FrozenConfigDict(config)


# ------------------------------------------------------------------------- one batch of crops
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


@functools.partial(jax.jit, static_argnames=("model_config",))
def embed_images(variables, images, *, model_config):
    """float[n, h, w, 3] normalised images -> their pooled, projected, L2-normalised embeddings
    [n, D] (docs/method.md §1)."""
    return groupvit.GroupViT(model_config).apply(
        variables, images, method=groupvit.GroupViT.encode_image
    )["embedding"]


@functools.partial(jax.jit, static_argnames=("model_config",))
def embed_texts(variables, tokens, *, model_config):
    """int[n, L] tokens -> their projected, L2-normalised text embeddings [n, D]."""
    return groupvit.GroupViT(model_config).apply(
        variables, tokens, method=groupvit.GroupViT.encode_text
    )["embedding"]


@functools.partial(jax.jit, static_argnames=("crop_hw", "patch_size", "num_label_classes", "top_k"))
def crop_outputs(
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
    """Everything the evaluation needs from a batch of encoded crops.

    Args:
        encoded: `encode_crops` of the crops, zero-padded on the bottom and right to a multiple
            of the patch size.
        log_scale: the learned log logit scale (`losses.logit_scale` makes it the scale).
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
    scale = losses.logit_scale(log_scale)
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


def zero_confusions(
    num_thresholds: int, num_label_classes: int, has_background: bool
) -> dict[str, np.ndarray]:
    """int64 zeros shaped as `finish_image`'s confusions: where a dataset's sums start."""
    k = num_label_classes
    zeros = {"prediction": np.zeros((max(num_thresholds, 1), k, k), np.int64)}
    baselines = (("all_background",) if has_background else ()) + ("top_class", "group_oracle")
    zeros.update({name: np.zeros((k, k), np.int64) for name in baselines})
    return zeros


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


# ------------------------------------------------------------------------- memory
def crop_size(short_side: int, max_long: int, window: int) -> tuple[int, int]:
    """The largest crop (h, w) a protocol cuts: a resized picture is at most `short_side` on its
    short side and `max_long` on its long side (docs/method.md §2, step 5), and a window is never
    larger than the picture."""
    return min(window, short_side), min(window, max_long)


def window_batch_bytes(model_config: ml_collections.ConfigDict, crop_hw, crops: int) -> int:
    """An upper bound on the memory one model call of `crops` crops of `crop_hw` pixels needs.

    The first stage is the largest (docs/method.md §1): T = ceil(h / p) * ceil(w / p) patch tokens
    plus its G group tokens; without a backward pass one block's buffers are alive at a time. In
    float32 (4 bytes), per crop:
      attention: the logits and the softmax's intermediates (scaled, max-shifted, exponentiated,
          normalised), each [heads, T, T], as if unfused: 5 * heads * T^2;
      activations: the residual stream, its norm, q, k, v, the attention output and the MLP's
          hidden layer before and after its GELU: (6 + 2 * mlp_ratio) * T * width;
      the post-processing's group masks at pixel resolution and their resize: 2 * G * h * w.
    bytes = 4 * crops * (5 * heads * T^2 + (6 + 2 * mlp_ratio) * T * width + 2 * G * h * w)

    The parameters, loaded already, are not counted. The bound holds for what the demo model's
    runs measured on the CPU (peak resident memory above the 32-px run's: 3.4 GB for 8 crops of
    256 px, estimated 5.6; 5.1 GB for 1 crop of 448 px, estimated 6.4; 7.7 GB for 2, estimated
    12.8); XLA's GPU kernels fuse the softmax and need less.
    """
    h, w = crop_hw
    patch = model_config.patch_size
    groups = model_config.num_group_tokens[0]
    tokens = math.ceil(h / patch) * math.ceil(w / patch) + groups
    per_crop = (
        5 * model_config.num_heads * tokens**2
        + (6 + 2 * model_config.mlp_ratio) * tokens * model_config.width
        + 2 * max(model_config.num_output_groups) * h * w
    )
    return int(4 * crops * per_crop)


def host_available_memory() -> int:
    """Bytes of host memory available: /proc/meminfo's MemAvailable (else the free pages), capped
    by the cgroup's limit where there is one (containers)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit, used = f.read().strip(), int(g.read())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def available_memory(devices: Sequence[jax.Device]) -> tuple[int, str, bool]:
    """(bytes, what they are, whether they are per device) one call of crops over `devices` may
    use: `MEMORY_LIMIT_ENV` GiB if set, else the least free memory of the devices where the backend
    reports it (GPU, TPU), else the host memory available (CPU, shared by its devices)."""
    limit = os.environ.get(MEMORY_LIMIT_ENV)
    if limit:
        return int(float(limit) * 2**30), f"GiB set by {MEMORY_LIMIT_ENV}", False
    stats = [device.memory_stats() or {} for device in devices]
    if all("bytes_limit" in s for s in stats):
        free = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
        return free, f"GiB free per {devices[0].platform.upper()}", True
    return host_available_memory(), "GiB of host memory available", False


def _call_batch(batch: int, devices: int) -> int:
    """Crops per model call: `batch` rounded up to a multiple of the devices."""
    return max(devices, math.ceil(batch / devices) * devices)


def check_memory(
    model_config: ml_collections.ConfigDict,
    *,
    short_side: int,
    max_long: int,
    window: int,
    batch: int,
    mesh: jax.sharding.Mesh | None = None,
    flag_prefix: str = "",
) -> None:
    """Raises ValueError, one line naming the setting to lower, when one call of `batch` crops of
    the protocol's largest crop (`crop_size`) would need more than `available_memory`.

    Args:
        mesh: the devices the calls are split over (default: all local devices).
        flag_prefix: what the message puts before the settings' names ('--' for flags).
    """
    devices = list(local_mesh(mesh).devices.flat)
    available, what, per_device = available_memory(devices)
    crops = _call_batch(batch, len(devices))
    crops = crops // len(devices) if per_device else crops
    crop_hw = crop_size(short_side, max_long, window)
    needed = window_batch_bytes(model_config, crop_hw, crops)
    if needed <= available:
        return
    patch = model_config.patch_size
    tokens = math.ceil(crop_hw[0] / patch) * math.ceil(crop_hw[1] / patch)
    size = f"{crop_hw[0]}" if crop_hw[0] == crop_hw[1] else f"{crop_hw[0]}x{crop_hw[1]}"
    # Crops per call that fit: per device times the devices where the memory is per device.
    fitting = available // window_batch_bytes(model_config, crop_hw, 1)
    fitting *= len(devices) if per_device else 1
    batch_advice = f" or {flag_prefix}batch ({fitting} crops fit)" if fitting > 0 else ""
    raise ValueError(
        f"a {size}-px window is {tokens} tokens for this model (patch {patch}): "
        f"~{needed / 2**30:.1f} GiB per batch of {crops} crops, more than the "
        f"{available / 2**30:.1f} {what}; lower {flag_prefix}window/{flag_prefix}short_side "
        f"(the model was trained at {model_config.image_size} px){batch_advice}"
    )


# ------------------------------------------------------------------------- images -> labels
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


class Embedder:
    """A model on this process's devices: texts and images in, L2-normalised embeddings out.

    Inputs go to the model in calls of a fixed size split over the devices (`batch` images,
    rounded up to a multiple of the device count; `_TEXT_CHUNK` texts), the last call
    zero-padded and the padding dropped, so each input shape compiles once.
    """

    def __init__(
        self, model_config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None, *, batch: int
    ):
        self.model_config = inference_config(model_config)
        self.mesh = local_mesh(mesh)
        self.batch = _call_batch(batch, self.mesh.devices.size)
        self._tokenizer = get_tokenizer(model_config.context_length)

    def place(self, variables: dict) -> dict:
        """The model's variables replicated on this process's devices."""
        variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
        variables = jax.tree.map(_host_copy_if_global, variables)
        return jax.device_put(variables, sharding.replicated(self.mesh))

    def _in_calls(self, fn, variables: dict, inputs: np.ndarray, size: int) -> jax.Array:
        """fn(variables, inputs) [n, D] in calls of `size` rows (a multiple of the devices)."""
        padded = np.concatenate(
            [inputs, np.zeros((-len(inputs) % size, *inputs.shape[1:]), inputs.dtype)]
        )
        batch_sharding = sharding.batch_sharding(self.mesh)
        outputs = [
            fn(
                variables,
                jax.device_put(padded[i : i + size], batch_sharding),
                model_config=self.model_config,
            )
            for i in range(0, len(padded), size)
        ]
        if not outputs:
            return jnp.zeros((0, self.model_config.projection_dim))
        return jnp.concatenate(outputs)[: len(inputs)]

    def image_embeddings(self, variables: dict, images: np.ndarray) -> jax.Array:
        """float[n, D] embeddings of float[n, h, w, 3] normalised images (`embed_images`)."""
        return self._in_calls(embed_images, variables, np.asarray(images, np.float32), self.batch)

    def text_embeddings(self, variables: dict, texts: Sequence[str]) -> jax.Array:
        """float[n, D] embeddings of `texts` (`embed_texts`), tokenised for the model."""
        devices = self.mesh.devices.size
        chunk = math.ceil(_TEXT_CHUNK / devices) * devices
        return self._in_calls(embed_texts, variables, self._tokenizer(list(texts)), chunk)

    def class_embeddings(
        self, variables: dict, class_names: Sequence[str], templates: Sequence[str]
    ) -> jax.Array:
        """float[C, D], replicated: each class's text embeddings averaged over the templates,
        then L2-normalised (docs/method.md §2, step 2)."""
        texts = [template.format(name) for name in class_names for template in templates]
        embeddings = self.text_embeddings(variables, texts)
        mean = jnp.mean(embeddings.reshape(len(class_names), len(templates), -1), axis=1)
        return jax.device_put(groupvit.l2_normalize(mean), sharding.replicated(self.mesh))


class Segmenter(Embedder):
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
        super().__init__(model_config, mesh, batch=batch)
        self.short_side, self.max_long = short_side, max_long
        self.window, self.stride, self.top_k = window, stride, top_k
        self._num_groups = model_config.num_output_groups[-1]

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


# ------------------------------------------------------------------------- one picture
def segment(
    variables: dict,
    model_config: ml_collections.ConfigDict,
    image: np.ndarray,
    class_names: Sequence[str],
    *,
    bg_thresh: float | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    short_side: int = 0,
    max_long: int = 0,
    window: int = 0,
    stride: int = 0,
    top_k: int = 0,
    batch: int = 8,
    mesh: jax.sharding.Mesh | None = None,
) -> np.ndarray:
    """Labels of one picture for `class_names`.

    Args:
        variables: the model's {'params', 'batch_stats'}; model_config: its config.
        image: uint8[H, W, 3] RGB (or [H, W] grey).
        class_names: what to look for (each put in every template and embedded as text).
        bg_thresh: None: every pixel gets a class; a number: pixels whose best class score is
            below it (or below the window's best group score) are background.
        templates, short_side, ..., batch: the protocol (as the evaluator's settings,
            `evaluation.segmentation_settings.default_config`); a size or top_k left at 0 is the
            model's, `formats.model_files.default_inference(model_config)`.
        mesh: devices to use (default: all local devices).

    Returns:
        int32[H, W]: with bg_thresh, 0 = background and k = class_names[k - 1]; without, k =
        class_names[k].

    Raises:
        ValueError: bad classes or image, or a protocol whose crops would not fit in memory
        (`check_memory`).
    """
    class_names = [str(c).strip() for c in class_names]
    if not class_names or not all(class_names):
        raise ValueError(f"need a list of non-empty class names, got {class_names!r}")
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3] RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0-255), got {image.dtype}")
    given = dict(
        short_side=short_side, max_long=max_long, window=window, stride=stride, top_k=top_k
    )
    protocol = model_files.default_inference(model_config)
    protocol.update({name: value for name, value in given.items() if value})
    sizes = {name: protocol[name] for name in ("short_side", "max_long", "window")}
    check_memory(model_config, batch=batch, mesh=mesh, **sizes)
    segmenter = Segmenter(model_config, mesh, batch=batch, **protocol)
    thresholds = () if bg_thresh is None else (float(bg_thresh),)
    with jax.set_mesh(None):  # The segmenter places its arrays itself.
        variables = segmenter.place(variables)
        class_emb = segmenter.class_embeddings(variables, class_names, expand_templates(templates))
        [result] = segmenter.segment(
            variables,
            class_emb,
            [(0, dict(image=image))],
            thresholds=thresholds,
            num_label_classes=len(class_names) + len(thresholds),
        )
        return np.asarray(result.predictions[0])
