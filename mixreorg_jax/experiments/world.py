r"""What the synthetic world allows: the mIoU of a perfect patch labelling, and how far colour goes.

  python -m mixreorg_jax.experiments.world [--num_examples=2000] [--image_size=64] \
      [--patch_sizes=4 --patch_sizes=8]

Prints the world generator's speed in this process, the mIoU of the perfect patch labelling for
each patch size (every patch takes its majority true label, upsampled to pixels by repetition
and bilinearly), and the scores of classifiers that see only colour (fitted on `--num_examples`
train images, scored on a quarter as many test images). Every mIoU is the evaluator's
(`mixreorg_jax/ops/miou.py`: classes absent from both the ground truth and the prediction are
left out of the mean).

Measured (default world: 64 px, 8 classes, 1-3 objects; the 2 CPU cores were shared with other
jobs, load average 4-5):
- Ceiling of perfect patch labels (mIoU over background + 8 classes, 2,000 test images),
  upsampled by repetition / bilinearly (one-hot maps, then argmax, as the zero-shot protocol
  treats group maps):
    patch 4 (16 x 16 grid): 0.855 / 0.871;  patch 8 (8 x 8 grid): 0.739 / 0.762;
    with `image_size` 48 / 32 and patch 4 (1,000 images): 0.815 / 0.832 and 0.739 / 0.754.
  (The prototype's 32 px world with 4 px patches: 0.64.) Thin parts (ring, crescent, star) lose
  most; `min_scale` / `max_scale` trade this against crowding.
- Colour alone does not give the class (fitted on 2,000 train images, scored on 500 test):
  on object pixels, the majority train class of a pixel's colour bin (8^3 bins) is right for
  0.136 of them, and the majority class of an object's mean-colour bin for 0.125 of objects,
  against chance 0.125. Over all pixels that rule (background included) gets mIoU 0.157: colour
  and brightness separate objects from background (background IoU 0.94) but not the classes
  (object-class IoUs 0.02-0.09); predicting background everywhere gets 0.079.
"""

import functools
import time

import jax
import numpy as np
from absl import app, flags

from mixreorg_jax import cli
from mixreorg_jax.data import synthetic
from mixreorg_jax.ops import miou

# One compiled program per mask shape instead of a dispatch per jnp op, image after image.
_confusion_matrix = jax.jit(miou.confusion_matrix, static_argnames="num_classes")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The program's flags. Defined only when it runs (tests define them on their own
    FlagValues): other programs imported beside it in tests have an `--image_size` too."""
    flags.DEFINE_integer(
        "num_examples",
        2000,
        "Images generated for the speed and the ceilings; train images of the colour rules.",
        lower_bound=1,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "image_size",
        synthetic.WorldConfig.image_size,
        "The world's image side.",
        flag_values=flag_values,
    )
    flags.DEFINE_multi_integer(
        "patch_sizes",
        [4, 8],
        "Patch sides of the ceilings",
        lower_bound=1,
        flag_values=flag_values,
    )


def _add_confusion(total: np.ndarray, mask: np.ndarray, predicted: np.ndarray) -> None:
    """Adds one image's (ground truth, prediction) pixel counts to `total` (int64[L, L])."""
    total += np.asarray(_confusion_matrix(predicted, mask, num_classes=len(total)), np.int64)


def patch_majority_labels(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """uint8[S, S] -> uint8[S / p, S / p]: each patch's most frequent label (ties: lowest)."""
    size = mask.shape[0]
    if size % patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide image size {size}")
    grid = size // patch_size
    patches = mask.reshape(grid, patch_size, grid, patch_size).transpose(0, 2, 1, 3)
    patches = patches.reshape(grid * grid, patch_size * patch_size).astype(np.int64)
    num_labels = int(mask.max()) + 1
    keys = np.arange(grid * grid)[:, None] * num_labels + patches
    counts = np.bincount(keys.ravel(), minlength=grid * grid * num_labels)
    majority = counts.reshape(grid * grid, num_labels).argmax(1).astype(np.uint8)
    return majority.reshape(grid, grid)


@functools.lru_cache(maxsize=16)
def _bilinear_resize_matrix(out_size: int, in_size: int) -> np.ndarray:
    """float64[out, in]: 1-D bilinear resize with half-pixel centres (align_corners=False)."""
    source = np.maximum((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0)
    left = np.minimum(np.floor(source).astype(int), in_size - 1)
    right = np.minimum(left + 1, in_size - 1)
    frac = source - left
    matrix = np.zeros((out_size, in_size))
    np.add.at(matrix, (np.arange(out_size), left), 1 - frac)
    np.add.at(matrix, (np.arange(out_size), right), frac)
    return matrix


def upsample_patch_labels(labels: np.ndarray, size: int, num_labels: int, mode: str) -> np.ndarray:
    """uint8[g, g] patch labels -> uint8[size, size] pixel labels.

    mode "nearest" repeats each patch's label; "bilinear" resizes the one-hot maps bilinearly and
    takes the argmax, as the zero-shot protocol does with group assignments (smoother borders).
    """
    grid = labels.shape[0]
    if mode == "nearest":
        return np.repeat(np.repeat(labels, size // grid, 0), size // grid, 1)
    if mode != "bilinear":
        raise ValueError(f"Unknown upsampling mode {mode!r}; known: 'nearest', 'bilinear'")
    resize = _bilinear_resize_matrix(size, grid)
    one_hot = np.eye(num_labels)[labels]  # [g, g, L]
    scores = np.einsum("yg,ghl,xh->yxl", resize, one_hot, resize)
    return scores.argmax(-1).astype(np.uint8)


def patch_label_ceiling(
    config: synthetic.WorldConfig,
    patch_size: int,
    num_examples: int = 500,
    split: str = "test",
    mode: str = "bilinear",
) -> float:
    """mIoU of the perfect patch labelling (majority true label per patch, upsampled)."""
    num_labels = config.num_classes + 1
    confusion = np.zeros((num_labels, num_labels), np.int64)
    for index in range(num_examples):
        mask = synthetic.generate_example(index, split, config)["mask"]
        labels = patch_majority_labels(mask, patch_size)
        _add_confusion(
            confusion, mask, upsample_patch_labels(labels, config.image_size, num_labels, mode)
        )
    return miou.miou_from_confusion(confusion)[0]


def colour_only_baseline(
    config: synthetic.WorldConfig, num_train: int = 2000, num_test: int = 500, bins: int = 8
) -> dict[str, float]:
    """Classifiers that see only colour (majority rule per colour bin), fitted on train, scored on test.

    - pixel: each pixel's label = the most frequent train label of its colour bin (bins^3 bins);
      returns its mIoU and that of predicting background everywhere.
    - foreground pixel accuracy: the same, restricted to object pixels and object classes, vs 1/C.
    - object accuracy: an object's class = the most frequent train class of its mean-colour bin.
    """
    num_labels = config.num_classes + 1

    def colour_bins(pixels):
        q = np.minimum(pixels.astype(np.int64) * bins // 256, bins - 1)
        return (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]

    def examples(split, count):
        for index in range(count):
            example = synthetic.generate_example(index, split, config)
            yield example, colour_bins(example["image"])

    pixel_counts = np.zeros((bins**3, num_labels), np.int64)
    object_counts = np.zeros((bins**3, num_labels), np.int64)
    for example, bin_map in examples("train", num_train):
        keys = bin_map.ravel() * num_labels + example["mask"].ravel()
        pixel_counts += np.bincount(keys, minlength=pixel_counts.size).reshape(pixel_counts.shape)
        for bin_id, class_id in _object_mean_colour_bins(example, colour_bins):
            object_counts[bin_id, class_id] += 1
    pixel_rule = pixel_counts.argmax(1)
    foreground_rule = pixel_counts[:, 1:].argmax(1) + 1
    object_rule = object_counts[:, 1:].argmax(1) + 1

    confusion = np.zeros((num_labels, num_labels), np.int64)
    background_confusion = np.zeros_like(confusion)
    foreground_hits = foreground_total = object_hits = object_total = 0
    for example, bin_map in examples("test", num_test):
        mask = example["mask"]
        _add_confusion(confusion, mask, pixel_rule[bin_map])
        _add_confusion(background_confusion, mask, np.zeros_like(mask))
        foreground = mask > 0
        foreground_hits += int((foreground_rule[bin_map][foreground] == mask[foreground]).sum())
        foreground_total += int(foreground.sum())
        for bin_id, class_id in _object_mean_colour_bins(example, colour_bins):
            object_hits += int(object_rule[bin_id] == class_id)
            object_total += 1
    return dict(
        pixel_miou=miou.miou_from_confusion(confusion)[0],
        all_background_miou=miou.miou_from_confusion(background_confusion)[0],
        foreground_pixel_accuracy=foreground_hits / foreground_total,
        object_accuracy=object_hits / object_total,
        chance_accuracy=1 / config.num_classes,
    )


def _object_mean_colour_bins(example, colour_bins):
    """Yields (bin of an object's mean visible colour, class id) for objects alone in their class."""
    mask, image = example["mask"], example["image"]
    class_ids = [obj["class_id"] for obj in example["objects"]]
    for class_id in class_ids:
        if class_ids.count(class_id) == 1:  # same-class objects share mask pixels
            yield int(colour_bins(image[mask == class_id].mean(0))), class_id


def measure(num_examples: int, image_size: int, patch_sizes: list[int]) -> None:
    """Prints the generation speed, the patch-label ceilings and the colour-only scores."""
    config = synthetic.WorldConfig(image_size=image_size)
    for patch_size in patch_sizes:  # Bad settings fail before the long measurements.
        patch_majority_labels(np.zeros((image_size, image_size), np.uint8), patch_size)
    wall, cpu = time.perf_counter(), time.process_time()
    for index in range(num_examples):
        synthetic.generate_example(index, "train", config)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(
        f"generation (one process): {num_examples / wall:.0f} examples/s wall, "
        f"{1e3 * cpu / num_examples:.2f} ms CPU per example"
    )
    for patch_size in patch_sizes:
        for mode in ("nearest", "bilinear"):
            ceiling = patch_label_ceiling(config, patch_size, num_examples, mode=mode)
            print(f"patch {patch_size}, {mode}: perfect-patch-label mIoU {ceiling:.3f}")
    baseline = colour_only_baseline(config, num_examples, max(1, num_examples // 4))
    print("colour only:", {k: round(v, 3) for k, v in baseline.items()})


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {argv[1:]}")
    try:
        measure(flag_values.num_examples, flag_values.image_size, flag_values.patch_sizes)
    except ValueError as e:  # a world setting out of range, a patch size that does not divide
        raise SystemExit(f"error: {cli.one_line(e)}") from None


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
