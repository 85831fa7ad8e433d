"""Mean intersection-over-union as mmsegmentation 0.18 computes it for GroupViT's released evaluation.

Per image, `confusion_matrix` counts (ground truth, prediction) pairs over the pixels that are not
ignored (jitted on device). The matrices are summed over the whole dataset (and over hosts) and
`miou_from_confusion` turns the total into IoUs: per class, intersection = the diagonal, union =
ground-truth area + predicted area - intersection; classes whose union is 0 (absent from both the
ground truth and the predictions) are NaN and left out of the mean (mmseg's `np.nanmean`).
"""

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(
    pred: jax.Array, label: jax.Array, num_classes: int, ignore_index: int = 255
) -> jax.Array:
    """Pixel counts of (ground-truth class, predicted class) pairs of one image (or batch).

    Pixels labelled `ignore_index` are skipped, as are labels outside [0, num_classes) (well-formed
    sets have none; mmseg would count their prediction in the predicted area only). Predictions
    must lie in [0, num_classes).

    Args:
        pred: int[...] predicted classes.
        label: int[...] ground truth, same shape.
        num_classes: static C.

    Returns:
        int[C, C], rows = ground truth, columns = prediction. The dtype is JAX's default integer
        (int32 unless x64 is enabled), exact for up to 2**31 pixels: sum the per-image matrices in
        int64 on the host (e.g. `np.asarray(cm, np.int64)`) for a whole dataset.
    """
    if pred.shape != label.shape:
        raise ValueError(f"pred {pred.shape} and label {label.shape} differ in shape.")
    label = label.reshape(-1).astype(jnp.int32)
    pred = pred.reshape(-1).astype(jnp.int32)
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    pair = jnp.where(valid, label * num_classes + pred, 0)
    counts = jnp.bincount(pair, valid.astype(jnp.int32), length=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def miou_from_confusion(cm) -> tuple[float, np.ndarray]:
    """mIoU and per-class IoU of a dataset-wide confusion matrix.

    Runs on the host in float64 (the totals exceed int32 on large sets).

    Args:
        cm: int[C, C] summed confusion matrix (rows ground truth, columns prediction).

    Returns:
        (miou, per_class_iou): per_class_iou float64[C], NaN for classes with an empty union;
        miou the mean over the other classes (NaN if every class is absent). Fractions, not %.
    """
    cm = np.asarray(cm, np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"Expected a square confusion matrix, got shape {cm.shape}.")
    intersection = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - intersection
    per_class_iou = np.full(len(cm), np.nan)
    np.divide(intersection, union, out=per_class_iou, where=union > 0)
    occurring = union > 0
    miou = float(per_class_iou[occurring].mean()) if occurring.any() else float("nan")
    return miou, per_class_iou
