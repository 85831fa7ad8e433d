"""Zero-shot segmentation post-processing of GroupViT's released evaluation (docs/method.md §2).

The model part (encoders, projectors) is supplied by the caller; everything here is a pure `jnp`
function of arrays with static shapes. Per 448 x 448 window (a "crop"):

    chained = chain_assignments(soft_maps)                        # [B, N, G]
    onehot = group_masks(chained, grid_hw, crop_hw)                # [B, G, H, W]
    scores = group_class_scores(segments, pooled, classes, scale)  # [B, G, C]
    crop_scores = pixel_class_scores(onehot, scores, bg_thresh=t)  # [B, C(+1), H, W]

and per image, `segment_image` resizes the short side to 448, normalises, slides the crop function
over the image at stride 224, resizes the averaged scores back to the original size and takes the
argmax, as mmsegmentation 0.18's `slide_inference` + `simple_test` do for the released configs.
"""

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# ImageNet statistics on the 0-255 scale, applied after the resize as mmseg's `Normalize` does.
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)

_HIGHEST = jax.lax.Precision.HIGHEST


def resize_bilinear(
    x: jax.Array, out_hw: Sequence[int], spatial_axes: tuple[int, int] = (-2, -1)
) -> jax.Array:
    """Bilinear resize with PyTorch's `F.interpolate(mode='bilinear', align_corners=False)` semantics.

    Half-pixel sample centres, edges clamped, no antialiasing when shrinking (as PyTorch, mmcv and
    OpenCV's INTER_LINEAR do; `jax.image.resize`'s default antialiasing would not match).

    Args:
        x: float array; the two `spatial_axes` are resized, all others kept.
        out_hw: static (H, W).
        spatial_axes: the (height, width) axes of `x`.

    Returns:
        `x` with its spatial axes resized to `out_hw`, same dtype.
    """
    shape = list(x.shape)
    shape[spatial_axes[0]], shape[spatial_axes[1]] = int(out_hw[0]), int(out_hw[1])
    if tuple(shape) == x.shape:
        return x  # Identity in PyTorch too: the sample positions fall exactly on the input pixels.
    return jax.image.resize(x, tuple(shape), method="linear", antialias=False, precision=_HIGHEST)


def chain_assignments(soft_assignments: Sequence[jax.Array]) -> jax.Array:
    """Token -> final-group map: the grouping stages' soft assignments multiplied in order.

    Args:
        soft_assignments: [B, N_1, G_1], [B, G_1, G_2], ...: stage i's softmax over its groups for
            each of its input tokens (N_{i+1} = G_i; the first stage's inputs are the patches).

    Returns:
        float[B, N_1, G_last]; e.g. [B, HW, 64] @ [B, 64, 8] -> [B, HW, 8].
    """
    if not soft_assignments:
        raise ValueError("chain_assignments needs at least one assignment map.")
    chained = soft_assignments[0]
    for stage, assignment in enumerate(soft_assignments[1:], start=1):
        if assignment.shape[1] != chained.shape[2]:
            raise ValueError(
                f"Stage {stage} assigns {assignment.shape[1]} tokens but the previous "
                f"stage produced {chained.shape[2]} groups."
            )
        chained = jnp.einsum("bng,bgk->bnk", chained, assignment, precision=_HIGHEST)
    return chained


def group_masks(chained: jax.Array, grid_hw: Sequence[int], out_hw: Sequence[int]) -> jax.Array:
    """One-hot group map of a crop: bilinear upsampling of the chained map, then argmax over groups.

    Args:
        chained: float[B, N, G] token -> group weights, N = grid_h * grid_w in row-major order.
        grid_hw: static (grid_h, grid_w) patch grid of the crop.
        out_hw: static (H, W) crop size in pixels.

    Returns:
        float32[B, G, H, W], exactly one 1 per pixel along G (ties go to the lowest group index).
    """
    b, n, g = chained.shape
    grid_h, grid_w = grid_hw
    if n != grid_h * grid_w:
        raise ValueError(f"{n} tokens do not form a {grid_h}x{grid_w} grid.")
    # float32 whatever the model's dtype: bf16 rounding would move the argmax between groups.
    maps = jnp.transpose(chained, (0, 2, 1)).reshape(b, g, grid_h, grid_w).astype(jnp.float32)
    maps = resize_bilinear(maps, out_hw)
    return jax.nn.one_hot(jnp.argmax(maps, axis=1), g, axis=1, dtype=jnp.float32)


def _l2_normalize(x: jax.Array) -> jax.Array:
    # F.normalize's eps: only all-zero vectors are affected.
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def group_class_scores(
    segment_emb: jax.Array,
    image_emb: jax.Array,
    class_emb: jax.Array,
    logit_scale: jax.Array | float,
    *,
    top_k: int = 5,
) -> jax.Array:
    """Group x class scores of one crop each, as the released `GroupViTSegInference.encode_decode`.

    The released sequence, for each crop:
      1. G = <segment_g, class_c> * logit_scale; P = softmax_c(G).
      2. A = softmax_c(<pooled image, class_c> * logit_scale); its top min(top_k, C) classes are
         kept, the others set to -inf in G.
      3. scores = softmax_c(masked G) * P, so a group's scores are 0 for every class outside the
         crop's top k, and sum to at most 1.

    Args:
        segment_emb: float[B, G, D] projected segment tokens (the final groups).
        image_emb: float[B, D] projected pooled image embedding of the same crop.
        class_emb: float[C, D] class (text) embeddings, background excluded.
        logit_scale: the scale, already exponentiated and clamped as the released evaluation
            does (`losses.logit_scale` of the learned log-scale).
        top_k: classes kept per crop (5 in the released evaluation).
    All three embeddings are L2-normalised here (idempotent for inputs that already are).

    Returns:
        float[B, G, C].
    """
    num_classes = class_emb.shape[0]
    scale = jnp.asarray(logit_scale, segment_emb.dtype)
    class_emb = _l2_normalize(class_emb)
    group_logits = (
        jnp.einsum("bgd,cd->bgc", _l2_normalize(segment_emb), class_emb, precision=_HIGHEST) * scale
    )
    group_probs = jax.nn.softmax(group_logits, axis=-1)
    image_probs = jax.nn.softmax(
        jnp.einsum("bd,cd->bc", _l2_normalize(image_emb), class_emb, precision=_HIGHEST) * scale,
        axis=-1,
    )
    _, top_classes = jax.lax.top_k(image_probs, min(top_k, num_classes))  # [B, k]
    keep = jnp.any(top_classes[:, :, None] == jnp.arange(num_classes), axis=1)  # [B, C]
    masked_logits = jnp.where(keep[:, None, :], group_logits, -jnp.inf)
    return jax.nn.softmax(masked_logits, axis=-1) * group_probs


def pixel_class_scores(
    onehot_group_map: jax.Array, scores: jax.Array, *, bg_thresh: float | None = None
) -> jax.Array:
    """Per-pixel class scores of a crop: the one-hot group map times the group-class matrix.

    With `bg_thresh`, a background channel is prepended (index 0, the label of background): 1 where
    the pixel's best class score is below min(bg_thresh, max of the crop's whole [G, C] matrix),
    else 0. Taking the min means the crop's best-scoring group is never background.

    Args:
        onehot_group_map: float[B, G, H, W] (from `group_masks`).
        scores: float[B, G, C] (from `group_class_scores`).
        bg_thresh: None for sets without background; 0.95 VOC / COCO-Object, 0.35 Context.

    Returns:
        float[B, C, H, W], or float[B, 1 + C, H, W] with background first.
    """
    class_maps = jnp.einsum("bghw,bgc->bchw", onehot_group_map, scores, precision=_HIGHEST)
    if bg_thresh is None:
        return class_maps
    thresh = jnp.minimum(bg_thresh, jnp.max(scores, axis=(1, 2)))  # [B]
    background = jnp.max(class_maps, axis=1) < thresh[:, None, None]  # [B, H, W]
    return jnp.concatenate([background[:, None].astype(class_maps.dtype), class_maps], axis=1)


def window_boxes(
    image_hw: Sequence[int], window: int = 448, stride: int = 224
) -> list[tuple[int, int, int, int]]:
    """Sliding-window boxes (y1, y2, x1, x2) of mmseg's `slide_inference`, row-major.

    Windows start every `stride` pixels; the last one in each direction is shifted back to end at
    the border. An image smaller than the window along an axis gets a single window of the image's
    own size there (mmseg crops, it does not pad), so all windows of an image have one size.
    """
    if window < 1 or stride < 1:
        raise ValueError(f"window ({window}) and stride ({stride}) must be positive.")

    def spans(size):
        count = max(size - window + stride - 1, 0) // stride + 1
        ends = [min(i * stride + window, size) for i in range(count)]
        return [(max(end - window, 0), end) for end in ends]

    return [(y1, y2, x1, x2) for y1, y2 in spans(image_hw[0]) for x1, x2 in spans(image_hw[1])]


def _window_pixels(image_hw, window, stride):
    """Row and column indices int[n, h], int[n, w] of every window's pixels."""
    boxes = np.array(window_boxes(image_hw, window, stride))
    rows = boxes[:, 0, None] + np.arange(boxes[0, 1] - boxes[0, 0])
    cols = boxes[:, 2, None] + np.arange(boxes[0, 3] - boxes[0, 2])
    return rows, cols


# Cutting and merging are jitted on their own (one small compile per image size), so that the
# model between them compiles once for a fixed crop batch, and eager callers do not pay for many
# small per-op compiles. A single gather cuts all windows and a single scatter-add merges them.
@functools.partial(jax.jit, static_argnames=("window", "stride", "multiple"))
def cut_windows(
    image: jax.Array, *, window: int = 448, stride: int = 224, multiple: int = 1
) -> jax.Array:
    """All sliding windows of an image, float[n', h, w, C], zero crops appended so n' % multiple == 0.

    `image` is [H, W, C]; the windows are `window_boxes(image.shape[:2], window, stride)`.
    """
    rows, cols = _window_pixels(image.shape[:2], window, stride)
    crops = image[rows[:, :, None], cols[:, None, :]]
    padding = -len(crops) % multiple
    return jnp.concatenate([crops, jnp.zeros((padding,) + crops.shape[1:], crops.dtype)])


@functools.partial(jax.jit, static_argnames=("image_hw", "window", "stride"))
def merge_windows(
    window_scores: jax.Array, *, image_hw: tuple[int, int], window: int = 448, stride: int = 224
) -> jax.Array:
    """Window scores [n', C', h, w] (padding windows last, dropped) -> [C', H, W] overlap average."""
    rows, cols = _window_pixels(image_hw, window, stride)
    if window_scores.shape[2:] != (rows.shape[1], cols.shape[1]):
        raise ValueError(
            f"Window scores {window_scores.shape} do not match the "
            f"{rows.shape[1]}x{cols.shape[1]} windows; expected [n, C', h, w]."
        )
    window_scores = jnp.moveaxis(window_scores[: len(rows)], 1, 0)  # [C', n, h, w]
    summed = jnp.zeros((window_scores.shape[0],) + tuple(image_hw), window_scores.dtype)
    summed = summed.at[:, rows[:, :, None], cols[:, None, :]].add(window_scores)
    counts = np.zeros(image_hw, np.float32)
    np.add.at(counts, (rows[:, :, None], cols[:, None, :]), 1)
    return summed / counts.astype(summed.dtype)


def sliding_window_inference(
    image: jax.Array,
    crop_fn: Callable[[jax.Array], jax.Array],
    *,
    window: int = 448,
    stride: int = 224,
    windows_per_call: int | None = None,
) -> jax.Array:
    """Window scores summed over the image and divided by the overlap count (mmseg's slide mode).

    Args:
        image: float[H, W, 3], already resized and normalised.
        crop_fn: maps crops float[n, h, w, 3] to class scores float[n, C', h, w]; (h, w) is
            (window, window) unless the image is smaller than a window (then the image's own size
            along that axis, see `window_boxes`).
        window, stride: static window size and stride in pixels.
        windows_per_call: if set, `crop_fn` always gets exactly this many crops (the last call is
            padded with zero crops whose scores are dropped), so a jitted `crop_fn` compiles once for
            all images of any size. If None, all windows go in one call.

    Returns:
        float[C', H, W]. Also traceable inside `jax.jit` (crop_fn is then traced with it).
    """
    image_hw = tuple(image.shape[:2])
    crops = cut_windows(image, window=window, stride=stride, multiple=windows_per_call or 1)
    if windows_per_call is None:
        window_scores = crop_fn(crops)
    else:
        window_scores = jnp.concatenate(
            [
                crop_fn(crops[i : i + windows_per_call])
                for i in range(0, len(crops), windows_per_call)
            ]
        )
    return merge_windows(window_scores, image_hw=image_hw, window=window, stride=stride)


def rescaled_size(
    image_hw: Sequence[int], short: int = 448, max_long: int = 2048
) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: scale = min(short / short side, max_long / long side), rounded."""
    height, width = image_hw
    scale = min(short / min(height, width), max_long / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


@functools.partial(jax.jit, static_argnames=("short", "max_long"))
def resize_short_side(image: jax.Array, short: int = 448, max_long: int = 2048) -> jax.Array:
    """Keep-ratio bilinear resize of an image [H, W, 3] to `rescaled_size` (no antialiasing).

    A uint8 image stays uint8 (rounded), as the released pipeline resizes the decoded uint8 image
    before normalising it (OpenCV's fixed-point INTER_LINEAR can differ from this by 1 level).
    """
    out_hw = rescaled_size(image.shape[:2], short, max_long)
    resized = resize_bilinear(image.astype(jnp.float32), out_hw, spatial_axes=(0, 1))
    if image.dtype == jnp.uint8:
        return jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)
    return resized


@jax.jit
def normalize_image(image: jax.Array) -> jax.Array:
    """uint8 (or 0-255 float) [..., 3] RGB -> float32 with ImageNet mean/std."""
    mean = jnp.asarray(IMAGENET_MEAN_255, jnp.float32)
    std = jnp.asarray(IMAGENET_STD_255, jnp.float32)
    return (image.astype(jnp.float32) - mean) / std


@functools.partial(jax.jit, static_argnames=("out_hw",))
def scores_to_labels(scores: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """float[C', h, w] -> int32[H, W]: bilinear resize to the original size, then argmax.

    (mmseg takes a softmax over channels before the argmax; it does not change the argmax.)
    """
    return jnp.argmax(resize_bilinear(scores, out_hw), axis=0).astype(jnp.int32)


def segment_image(
    image: jax.Array,
    crop_fn: Callable[[jax.Array], jax.Array],
    *,
    short: int = 448,
    max_long: int = 2048,
    window: int = 448,
    stride: int = 224,
    windows_per_call: int | None = None,
) -> jax.Array:
    """Label prediction for one image with the released protocol (docs/method.md §2, step 5).

    Resize (short side 448, long side at most 2048), normalise, slide `crop_fn`, resize the
    averaged scores bilinearly to the original size, argmax. No flip.

    Args:
        image: uint8[H, W, 3] RGB, as the dataset readers return it.
        crop_fn, window, stride, windows_per_call: as in `sliding_window_inference`.
        short, max_long: as in `resize_short_side`.

    Returns:
        int32[H, W] channel indices of `crop_fn`'s scores (class labels when the channels follow
        the dataset's `class_names`, background first where it has one).
    """
    resized = normalize_image(resize_short_side(image, short, max_long))
    scores = sliding_window_inference(
        resized, crop_fn, window=window, stride=stride, windows_per_call=windows_per_call
    )
    return scores_to_labels(scores, tuple(image.shape[:2]))


def group_oracle_prediction(
    onehot_group_map: jax.Array, label: jax.Array, num_classes: int, ignore_index: int = 255
) -> jax.Array:
    """Upper bound of a grouping: every group labelled with its majority ground-truth class.

    Pixels labelled `ignore_index` (or outside [0, num_classes)) do not vote. A group with no
    voting pixel gets class 0; its pixels are all ignored by mIoU anyway. Vote ties go to the
    lowest class index.

    Args:
        onehot_group_map: float[B, G, H, W] one-hot group map.
        label: int[B, H, W] ground truth.
        num_classes: static number of classes C.

    Returns:
        int32[B, H, W] predicted class of each pixel.
    """
    batch, num_groups = onehot_group_map.shape[:2]
    group_of_pixel = jnp.argmax(onehot_group_map, axis=1).reshape(batch, -1)  # [B, HW]
    label = label.reshape(batch, -1).astype(jnp.int32)
    votes = (label >= 0) & (label < num_classes) & (label != ignore_index)
    flat_index = group_of_pixel * num_classes + jnp.where(votes, label, 0)
    counts = jax.vmap(lambda i, w: jnp.bincount(i, w, length=num_groups * num_classes))(
        flat_index, votes.astype(jnp.int32)
    )
    majority = jnp.argmax(counts.reshape(batch, num_groups, num_classes), axis=-1)  # [B, G]
    prediction = jnp.take_along_axis(majority, group_of_pixel, axis=1)
    return prediction.reshape(onehot_group_map.shape[:1] + onehot_group_map.shape[2:]).astype(
        jnp.int32
    )
