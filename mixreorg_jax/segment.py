r"""Segments any picture by a list of class names (zero-shot, the evaluation's protocol).

  python -m mixreorg_jax.segment --checkpoint CKPT --image cat.jpg --classes "cat,dog,grass" \
      --output cat_seg.png [--bg_thresh 0.5]

writes `cat_seg.png` (the picture with the classes' colours blended in) and `cat_seg_mask.png`
(an indexed PNG of the labels: with --bg_thresh, 0 = background and k = the k-th class; without,
k - 1 = the k-th class), and prints which colour is which class. In Python:

    model = mixreorg_jax.load(CKPT)
    labels = model.segment(image, ["cat", "dog", "grass"], bg_thresh=0.5)  # int32[H, W]
"""

import argparse
import os
import sys
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from mixreorg_jax.evaluation import segmentation, visualize
from mixreorg_jax.training import checkpointing


def segment(
    variables: dict,
    model_config: ml_collections.ConfigDict,
    image: np.ndarray,
    class_names: Sequence[str],
    *,
    bg_thresh: float | None = None,
    templates: Sequence[str] = segmentation.DEFAULT_TEMPLATES,
    short_side: int = 448,
    max_long: int = 2048,
    window: int = 448,
    stride: int = 224,
    top_k: int = 5,
    batch: int = 8,
    mesh: jax.sharding.Mesh | None = None,
) -> np.ndarray:
    """Labels of one image for `class_names`.

    Args:
        variables: the model's {'params', 'batch_stats'}; model_config: its config.
        image: uint8[H, W, 3] RGB.
        class_names: what to look for (each put in every template and embedded as text).
        bg_thresh: None: every pixel gets a class; a number: pixels whose best class score is
            below it (or below the window's best group score) are background.
        templates, short_side, ..., batch: the protocol (`evaluation.segmentation.default_config`).
        mesh: devices to use (default: all local devices).

    Returns:
        int32[H, W]: with bg_thresh, 0 = background and k = class_names[k - 1]; without, k =
        class_names[k].
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
    segmenter = segmentation.Segmenter(
        model_config,
        mesh,
        short_side=short_side,
        max_long=max_long,
        window=window,
        stride=stride,
        top_k=top_k,
        batch=batch,
    )
    thresholds = () if bg_thresh is None else (float(bg_thresh),)
    with jax.set_mesh(None):  # The segmenter places its arrays itself.
        variables = segmenter.place(variables)
        class_emb = segmenter.class_embeddings(
            variables, class_names, segmentation.expand_templates(templates)
        )
        [result] = segmenter.segment(
            variables,
            class_emb,
            [(0, dict(image=image))],
            thresholds=thresholds,
            num_label_classes=len(class_names) + len(thresholds),
        )
        return np.asarray(result.predictions[0])


def mask_path(output: str) -> str:
    """Where the indexed mask goes beside the overlay `output`: `NAME_mask.png`."""
    stem, _ = os.path.splitext(output)
    return stem + "_mask.png"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mixreorg_jax.segment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="model checkpoint, training workdir or HF GroupViT folder",
    )
    parser.add_argument("--image", required=True, help="picture to segment (any PIL format)")
    parser.add_argument("--classes", required=True, help="comma-separated class names")
    parser.add_argument("--output", required=True, help="overlay PNG to write")
    parser.add_argument(
        "--bg_thresh",
        type=float,
        default=None,
        help="background threshold (default: no background)",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    for name, default in (
        ("short_side", 448),
        ("max_long", 2048),
        ("window", 448),
        ("stride", 224),
        ("top_k", 5),
        ("batch", 8),
    ):
        parser.add_argument(f"--{name}", type=int, default=default, help=f"default {default}")
    args = parser.parse_args(argv)
    try:
        if not os.path.isfile(args.image):
            raise FileNotFoundError(f"no image at {args.image}")
        with Image.open(args.image) as picture:
            image = np.asarray(picture.convert("RGB"), np.uint8)
        class_names = [c.strip() for c in args.classes.split(",") if c.strip()]
        variables, model_config = checkpointing.load_variables(args.checkpoint)
        labels = segment(
            variables,
            model_config,
            image,
            class_names,
            bg_thresh=args.bg_thresh,
            short_side=args.short_side,
            max_long=args.max_long,
            window=args.window,
            stride=args.stride,
            top_k=args.top_k,
            batch=args.batch,
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    has_background = args.bg_thresh is not None
    palette = visualize.label_palette(has_background)
    names = (["background"] if has_background else []) + class_names
    Image.fromarray(
        visualize.overlay(
            image, labels, palette, alpha=args.alpha, background=0 if has_background else None
        )
    ).save(args.output)
    visualize.save_label_png(mask_path(args.output), labels, palette)
    counts = np.bincount(labels.reshape(-1), minlength=len(names))
    for label, name in enumerate(names):
        r, g, b = palette[label]
        share = counts[label] / labels.size
        print(f"{label:3d} {name:<20} rgb({r:3d},{g:3d},{b:3d})  {share:6.1%}")
    print(f"wrote {args.output} and {mask_path(args.output)}")


if __name__ == "__main__":
    main(sys.argv[1:])
