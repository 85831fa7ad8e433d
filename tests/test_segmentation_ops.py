"""Segmentation post-processing and mIoU against NumPy / PyTorch references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mixreorg_jax import losses
from mixreorg_jax.ops import miou
from mixreorg_jax.ops import segmentation as seg


def _softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _torch_resize(x, out_hw):
    """PyTorch's bilinear, align_corners=False, on [..., h, w] float arrays."""
    t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    lead = t.shape[:-2]
    t = t.reshape((-1, 1) + t.shape[-2:])
    out = torch.nn.functional.interpolate(
        t, size=tuple(out_hw), mode="bilinear", align_corners=False
    )
    return out.reshape(lead + tuple(out_hw)).numpy()


_resize = jax.jit(seg.resize_bilinear, static_argnums=(1, 2))


@pytest.mark.parametrize(
    "in_hw,out_hw", [((4, 4), (64, 64)), ((37, 23), (9, 17)), ((6, 9), (6, 9))]
)
def test_resize_bilinear_matches_torch(in_hw, out_hw):
    """Upsampling, downsampling (no antialiasing) and identity, on CHW and HWC layouts."""
    x = np.random.default_rng(0).normal(size=(2, 3) + in_hw).astype(np.float32)
    np.testing.assert_allclose(_resize(x, out_hw, (-2, -1)), _torch_resize(x, out_hw), atol=2e-6)
    hwc = np.moveaxis(x[0], 0, -1)  # [h, w, 3]
    np.testing.assert_allclose(
        _resize(hwc, out_hw, (0, 1)), np.moveaxis(_torch_resize(x[0], out_hw), 0, -1), atol=2e-6
    )


def test_chain_assignments_and_group_masks():
    rng = np.random.default_rng(1)
    stage1 = _softmax(rng.normal(size=(2, 16, 6)) * 3).astype(np.float32)
    stage2 = _softmax(rng.normal(size=(2, 6, 4)) * 3).astype(np.float32)
    chained = seg.chain_assignments([jnp.asarray(stage1), jnp.asarray(stage2)])
    np.testing.assert_allclose(chained, stage1 @ stage2, rtol=1e-6)
    with pytest.raises(ValueError, match="groups"):
        seg.chain_assignments([jnp.asarray(stage1), jnp.asarray(stage2[:, :5])])

    onehot = jax.jit(seg.group_masks, static_argnums=(1, 2))(chained, (4, 4), (20, 28))
    maps = np.transpose(stage1 @ stage2, (0, 2, 1)).reshape(2, 4, 4, 4)
    expected_groups = _torch_resize(maps, (20, 28)).argmax(axis=1)  # [B, H, W]
    assert onehot.shape == (2, 4, 20, 28)
    np.testing.assert_array_equal(onehot.sum(axis=1), 1.0)
    np.testing.assert_array_equal(np.asarray(onehot).argmax(axis=1), expected_groups)


def _reference_group_class_scores(segments, image, classes, scale, top_k):
    """The released encode_decode, one crop at a time, in NumPy (the scale exponentiated and
    clamped at 100 as the released model does)."""
    normalize = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
    scale = min(scale, 100.0)
    out = []
    for b in range(len(segments)):
        logits = normalize(segments[b]) @ normalize(classes).T * scale  # [G, C]
        probs = _softmax(logits)
        image_probs = _softmax(normalize(image[b]) @ normalize(classes).T * scale)  # [C]
        keep = np.argsort(-image_probs)[: min(top_k, len(classes))]
        masked = np.full_like(logits, -np.inf)
        masked[:, keep] = logits[:, keep]
        out.append(_softmax(masked) * probs)
    return np.stack(out)


_group_class_scores = jax.jit(seg.group_class_scores, static_argnames="top_k")


@pytest.mark.parametrize("num_classes,scale", [(12, 14.3), (3, 250.0)])
def test_group_class_scores_matches_reference(num_classes, scale):
    rng = np.random.default_rng(2)
    segments = rng.normal(size=(3, 8, 16)).astype(np.float32)
    image = rng.normal(size=(3, 16)).astype(np.float32)
    classes = rng.normal(size=(num_classes, 16)).astype(np.float32)
    # The callers clamp the learned scale with `losses.logit_scale`; the ops take it as it is.
    scores = _group_class_scores(segments, image, classes, losses.logit_scale(np.log(scale)))
    expected = _reference_group_class_scores(segments, image, classes, scale, 5)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-7)

    # Top-k filtering: every class outside the crop's top 5 by pooled-image score is exactly 0.
    image_logits = (image / np.linalg.norm(image, axis=-1, keepdims=True)) @ (
        classes / np.linalg.norm(classes, axis=-1, keepdims=True)
    ).T
    for b in range(3):
        dropped = np.argsort(-image_logits[b])[5:]
        assert (np.asarray(scores)[b][:, dropped] == 0).all()


def test_top_k_keeps_the_crops_best_classes_and_clamps_scale():
    # Class c's embedding is the unit vector e_c; the pooled image points mostly at classes 0 and 1.
    classes = np.eye(6, dtype=np.float32)
    image = np.array([[3.0, 2.0, 0.1, 0.0, 0.0, 0.0]], np.float32)
    segments = np.array(
        [
            [
                [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # a group that looks like class 5
                [1.0, 0.2, 0.0, 0.0, 0.0, 0.0],
            ]
        ],
        np.float32,
    )
    scores = np.asarray(_group_class_scores(segments, image, classes, 10.0, top_k=2))
    assert (scores[..., 2:] == 0).all()  # class 5 is dropped: the crop does not rank it top 2
    assert scores[0, 1, 0] > scores[0, 1, 1] > 0
    np.testing.assert_allclose(
        _group_class_scores(segments, image, classes, losses.logit_scale(np.log(100.0))),
        _group_class_scores(segments, image, classes, losses.logit_scale(np.log(1e4))),
        rtol=1e-6,
    )


def _reference_pixel_scores(onehot, scores, bg_thresh):
    class_maps = np.einsum("bghw,bgc->bchw", onehot, scores)
    if bg_thresh is None:
        return class_maps
    out = []
    for b in range(len(scores)):
        thresh = min(bg_thresh, scores[b].max())
        background = (class_maps[b].max(axis=0) < thresh).astype(np.float32)
        out.append(np.concatenate([background[None], class_maps[b]]))
    return np.stack(out)


@pytest.mark.parametrize("bg_thresh", [None, 0.95, 0.35, 0.0])
def test_pixel_class_scores_matches_reference(bg_thresh):
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 5, (2, 6, 7))
    onehot = np.moveaxis(np.eye(5, dtype=np.float32)[groups], -1, 1)
    scores = (_softmax(rng.normal(size=(2, 5, 4)) * 2) * rng.uniform(0.2, 1, (2, 5, 1))).astype(
        np.float32
    )
    out = jax.jit(functools.partial(seg.pixel_class_scores, bg_thresh=bg_thresh))(onehot, scores)
    np.testing.assert_array_equal(out, _reference_pixel_scores(onehot, scores, bg_thresh))
    assert out.shape == (2, 4 + (bg_thresh is not None), 6, 7)


def test_background_rule():
    # Two groups: group 0 scores at most 0.5, group 1 at most 0.3 (the matrix's max is 0.5).
    scores = np.array([[[0.5, 0.1], [0.2, 0.3]]], np.float32)
    onehot = np.zeros((1, 2, 1, 2), np.float32)
    onehot[0, 0, 0, 0] = onehot[0, 1, 0, 1] = 1  # pixel 0 in group 0, pixel 1 in group 1
    # 0.95 > matrix max: the threshold becomes 0.5, so the best group stays foreground.
    np.testing.assert_array_equal(
        seg.pixel_class_scores(onehot, scores, bg_thresh=0.95)[0, 0], [[0.0, 1.0]]
    )
    # 0.35 > 0.3: pixel 1 is background; 0.25 < 0.3: it is not.
    np.testing.assert_array_equal(
        seg.pixel_class_scores(onehot, scores, bg_thresh=0.35)[0, 0], [[0.0, 1.0]]
    )
    np.testing.assert_array_equal(
        seg.pixel_class_scores(onehot, scores, bg_thresh=0.25)[0, 0], [[0.0, 0.0]]
    )
    np.testing.assert_array_equal(
        seg.pixel_class_scores(onehot, scores, bg_thresh=0.25)[0, 1:],
        np.array([[[0.5, 0.2]], [[0.1, 0.3]]], np.float32),
    )


def test_window_boxes_follow_mmseg_slide_inference():
    assert seg.window_boxes((448, 448)) == [(0, 448, 0, 448)]
    assert seg.window_boxes((448, 597)) == [(0, 448, 0, 448), (0, 448, 149, 597)]
    assert [b[2:] for b in seg.window_boxes((448, 1000))] == [
        (0, 448),
        (224, 672),
        (448, 896),
        (552, 1000),
    ]
    assert seg.window_boxes((300, 500)) == [(0, 300, 0, 448), (0, 300, 52, 500)]
    assert seg.window_boxes((672, 448)) == [(0, 448, 0, 448), (224, 672, 0, 448)]


def _crop_scores(crops, xp):
    """A stand-in model: [n, h, w, 3] -> [n, 4, h, w], depending on the whole crop (its mean)."""
    per_pixel = xp.stack(
        [crops[..., 0], crops[..., 1] * 2, crops[..., 2] - crops[..., 0], -crops[..., 1]], axis=1
    )
    crop_means = xp.mean(crops, axis=(1, 2, 3))
    return per_pixel + crop_means[:, None, None, None] * xp.arange(4.0)[None, :, None, None]


_crop_fn = jax.jit(functools.partial(_crop_scores, xp=jnp))


def _reference_slide(image, window, stride):
    height, width = image.shape[:2]
    summed = np.zeros((4, height, width))
    count = np.zeros((height, width))
    for y1, y2, x1, x2 in seg.window_boxes((height, width), window, stride):
        summed[:, y1:y2, x1:x2] += _crop_scores(image[None, y1:y2, x1:x2], np)[0]
        count[y1:y2, x1:x2] += 1
    assert (count > 0).all()
    return summed / count


@pytest.mark.parametrize("hw", [(12, 21), (5, 19)])
def test_sliding_window_inference(hw):
    image = np.random.default_rng(4).normal(size=hw + (3,)).astype(np.float32)
    expected = _reference_slide(image, 8, 4)
    for windows_per_call in (None, 3):
        out = seg.sliding_window_inference(
            jnp.asarray(image), _crop_fn, window=8, stride=4, windows_per_call=windows_per_call
        )
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    jitted = jax.jit(lambda x: seg.sliding_window_inference(x, _crop_fn, window=8, stride=4))
    np.testing.assert_allclose(jitted(image), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hw", [(8, 8), (6, 8), (8, 5)])
def test_sliding_window_equals_single_window_when_the_image_fits(hw):
    image = jnp.asarray(np.random.default_rng(5).normal(size=hw + (3,)), jnp.float32)
    np.testing.assert_array_equal(
        seg.sliding_window_inference(image, _crop_fn, window=8, stride=4), _crop_fn(image[None])[0]
    )


def test_windows_per_call_fixes_the_crop_batch():
    shapes = []

    def recording_crop_fn(crops):
        shapes.append(crops.shape)
        return _crop_fn(crops)

    seg.sliding_window_inference(
        jnp.zeros((8, 21, 3)), recording_crop_fn, window=8, stride=4, windows_per_call=3
    )
    assert shapes == [(3, 8, 8, 3)] * 2  # 5 windows, padded to 6


def test_resize_short_side():
    assert seg.rescaled_size((375, 500)) == (448, 597)
    assert seg.rescaled_size((500, 375)) == (597, 448)
    assert seg.rescaled_size((100, 1000)) == (205, 2048)  # the long side cap wins
    assert seg.rescaled_size((448, 448)) == (448, 448)
    image = np.random.default_rng(6).integers(0, 256, (9, 13, 3)).astype(np.uint8)
    resized = seg.resize_short_side(jnp.asarray(image), short=16, max_long=64)
    assert resized.dtype == jnp.uint8 and resized.shape == (16, 23, 3)
    expected = np.moveaxis(
        _torch_resize(np.moveaxis(image, -1, 0).astype(np.float32), (16, 23)), 0, -1
    )
    assert np.abs(np.asarray(resized, np.float32) - expected).max() <= 0.5 + 1e-3
    resized_float = seg.resize_short_side(jnp.asarray(image, jnp.float32), short=16, max_long=64)
    np.testing.assert_allclose(resized_float, expected, atol=1e-4)


def test_segment_image_end_to_end():
    image = np.random.default_rng(7).integers(0, 256, (12, 20, 3)).astype(np.uint8)
    prediction = seg.segment_image(
        jnp.asarray(image), _crop_fn, short=16, max_long=64, window=16, stride=8, windows_per_call=2
    )
    # Reference: PyTorch resize, rounded to uint8, ImageNet normalisation, NumPy sliding window,
    # PyTorch resize back, argmax.
    resized = np.moveaxis(
        _torch_resize(np.moveaxis(image, -1, 0).astype(np.float32), (16, 27)), 0, -1
    )
    resized = np.clip(np.round(resized), 0, 255)
    normalised = (
        (resized - np.array(seg.IMAGENET_MEAN_255)) / np.array(seg.IMAGENET_STD_255)
    ).astype(np.float32)
    scores = _torch_resize(_reference_slide(normalised, 16, 8), (12, 20))
    assert prediction.dtype == jnp.int32 and prediction.shape == (12, 20)
    np.testing.assert_array_equal(prediction, scores.argmax(axis=0))


def _reference_miou(preds, labels, num_classes):
    intersection = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for pred, label in zip(preds, labels):
        valid = label != 255
        for c in range(num_classes):
            intersection[c] += np.sum((pred == c) & (label == c) & valid)
            union[c] += np.sum(((pred == c) | (label == c)) & valid)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = intersection / union
    return np.nanmean(iou), iou


def test_miou_matches_reference():
    rng = np.random.default_rng(8)
    num_classes = 7
    preds, labels = [], []
    for _ in range(4):
        label = rng.integers(0, 4, (9, 11))  # classes 4-6 never in the ground truth
        label[rng.random(label.shape) < 0.2] = 255
        pred = rng.integers(0, 6, (9, 11))  # class 6 never predicted either
        preds.append(pred)
        labels.append(label)
    confusion = jax.jit(miou.confusion_matrix, static_argnums=2)
    total = sum(np.asarray(confusion(p, t, num_classes), np.int64) for p, t in zip(preds, labels))
    assert total.sum() == sum(int((t != 255).sum()) for t in labels)
    value, per_class = miou.miou_from_confusion(total)
    expected_value, expected_per_class = _reference_miou(preds, labels, num_classes)
    np.testing.assert_allclose(per_class, expected_per_class, rtol=1e-12)
    assert np.isnan(per_class[6]) and per_class[4] == 0.0
    assert value == pytest.approx(expected_value, rel=1e-12)


def test_perfect_prediction_gives_miou_exactly_one():
    rng = np.random.default_rng(9)
    label = rng.integers(0, 5, (16, 16))
    label[:3] = 255
    pred = np.where(label == 255, 4, label)  # anything under the ignored pixels
    value, per_class = miou.miou_from_confusion(miou.confusion_matrix(pred, label, 21))
    assert value == 1.0
    assert np.isnan(per_class[5:]).all()
    value, _ = miou.miou_from_confusion(np.zeros((3, 3), np.int64))
    assert np.isnan(value)


def _reference_oracle(onehot, label, num_classes):
    groups = onehot.argmax(axis=0)
    out = np.zeros(label.shape, int)
    for g in np.unique(groups):
        votes = label[(groups == g) & (label != 255)]
        counts = np.bincount(votes, minlength=num_classes)
        out[groups == g] = counts.argmax()
    return out


def test_group_oracle_prediction():
    rng = np.random.default_rng(10)
    groups = rng.integers(0, 6, (2, 10, 12))
    groups[:, :2] = 5  # group 5 also covers a fully ignored region below
    onehot = np.moveaxis(np.eye(6, dtype=np.float32)[groups], -1, 1)
    label = rng.integers(0, 4, (2, 10, 12))
    label[rng.random(label.shape) < 0.3] = 255
    oracle_fn = jax.jit(seg.group_oracle_prediction, static_argnums=2)
    out = oracle_fn(onehot, label, 4)
    for b in range(2):
        np.testing.assert_array_equal(out[b], _reference_oracle(onehot[b], label[b], 4))

    # Groups that are the ground-truth regions give a perfect prediction (groups 4, 5 unused).
    perfect = np.moveaxis(np.eye(6, dtype=np.float32)[np.where(label == 255, 0, label)], -1, 1)
    oracle = oracle_fn(perfect, label, 4)
    value, _ = miou.miou_from_confusion(miou.confusion_matrix(oracle, label, 4))
    assert value == 1.0
