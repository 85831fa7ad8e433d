"""Pictures of segmentations: label PNGs, overlays (also as image summaries), prediction vs.
ground truth, and the groups.

Label maps are saved as indexed (palette) PNGs, whose pixel values are the labels themselves, so
any reader recovers them exactly (`numpy.array(PIL.Image.open(path))`) while viewers show colours.
Colours come from `label_palette`: background (label 0 of sets that have one) black, every class
its own colour, 255 (ignore) white. Figures are drawn with matplotlib's object API (no pyplot
state, no display needed).
"""

import colorsys
import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

IGNORE_LABEL = 255
_IGNORE_RGB = (255, 255, 255)


def _bit_colour_map(n: int) -> np.ndarray:
    """PASCAL VOC's colour scheme: the bits of index i spread over the high bits of R, G and B.

    uint8[n, 3]; entry 0 is black, and neighbouring indices get clearly different colours.
    """
    index = np.arange(n)
    colours = np.zeros((n, 3), np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            colours[:, channel] |= ((index >> (3 * (7 - shift) + channel)) & 1) << shift
    return colours.astype(np.uint8)


def label_palette(has_background: bool = True) -> np.ndarray:
    """uint8[256, 3] colours of label values: class k of a set without background gets the colour
    that label k + 1 has in a set with background, so no class is ever black."""
    colours = _bit_colour_map(257)
    palette = colours[:256] if has_background else colours[1:257]
    palette = palette.copy()
    palette[IGNORE_LABEL] = _IGNORE_RGB
    return palette


def colourise(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """int[H, W] labels in [0, 256) -> uint8[H, W, 3]."""
    return palette[np.asarray(labels, np.int64)]


def save_label_png(path: str, labels: np.ndarray, palette: np.ndarray) -> None:
    """Writes int[H, W] labels in [0, 256) as an indexed PNG with `palette` (uint8[256, 3])."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError(f"labels must be [H, W] in [0, 255], got shape {labels.shape}")
    image = Image.fromarray(labels.astype(np.uint8), mode="L").convert("P")
    image.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())
    _makedirs_for(path)
    image.save(path)


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    palette: np.ndarray,
    *,
    alpha: float = 0.5,
    background: int | None = 0,
) -> np.ndarray:
    """uint8[H, W, 3]: `image` blended with the label colours, `background` pixels left as is."""
    image = np.asarray(image, np.float32)
    coloured = colourise(labels, palette).astype(np.float32)
    blended = (1 - alpha) * image + alpha * coloured
    if background is not None:
        blended = np.where((np.asarray(labels) == background)[..., None], image, blended)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8[size, size, 3]: an RGB image scaled to fit (aspect kept, bilinear), centred on black."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    square = np.zeros((size, size, 3), np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    resized = Image.fromarray(np.asarray(image, np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    square[top : top + h, left : left + w] = np.asarray(resized)
    return square


def summary_overlay(
    image: np.ndarray, labels: np.ndarray, has_background: bool, size: int
) -> np.ndarray:
    """uint8[size, size, 3] for an image summary: `labels` over `image` (`overlay`; background
    pixels, where the set has them, left as they are), fitted into a square (`fit_square`)."""
    palette, labels = label_palette(has_background), np.asarray(labels)
    blended = overlay(image, labels, palette, background=0 if has_background else None)
    return fit_square(blended, size)


def group_colours(num_ids: int) -> np.ndarray:
    """uint8[num_ids, 3]: distinct saturated colours (hues spaced by the golden ratio)."""
    hues = (np.arange(num_ids) * 0.618033988749895) % 1.0
    return np.array(
        [[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.7, 0.95)] for h in hues], np.uint8
    ).reshape(num_ids, 3)


def _legend_handles(class_names, palette, labels_shown):
    present = sorted(
        {int(v) for labels in labels_shown for v in np.unique(labels)} - {IGNORE_LABEL}
    )
    return [
        Patch(
            facecolor=palette[v] / 255.0,
            edgecolor="black",
            linewidth=0.5,
            label=class_names[v] if v < len(class_names) else str(v),
        )
        for v in present
    ]


def _panel_figure(panels: list[tuple[str, np.ndarray]], legend=None) -> Figure:
    height, width = panels[0][1].shape[:2]
    panel_inches = 3.0
    legend_inches = 1.8 if legend else 0.0
    fig = Figure(
        figsize=(
            len(panels) * panel_inches * max(width / height, 0.5) + legend_inches,
            panel_inches + 0.4,
        )
    )
    axes = fig.subplots(1, len(panels))
    for ax, (title, picture) in zip(np.atleast_1d(axes), panels):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.subplots_adjust(
        left=0.01,
        bottom=0.01,
        top=0.9,
        wspace=0.04,
        right=1 - legend_inches / fig.get_figwidth() - 0.01,
    )
    if legend:
        fig.legend(handles=legend, loc="center right", fontsize=7, frameon=False)
    return fig


def _save(fig: Figure, path: str) -> None:
    _makedirs_for(path)
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.05)


def save_comparison(
    path: str,
    image: np.ndarray,
    prediction: np.ndarray,
    label: np.ndarray,
    class_names,
    palette: np.ndarray,
) -> None:
    """PNG of the image, the predicted mask and the ground truth side by side, with a legend of
    the classes that occur in either mask (white: ignored pixels)."""
    legend = _legend_handles(class_names, palette, (prediction, label))
    fig = _panel_figure(
        [
            ("image", image),
            ("prediction", colourise(prediction, palette)),
            ("ground truth", colourise(label, palette)),
        ],
        legend,
    )
    _save(fig, path)


def save_grouping(path: str, image: np.ndarray, groups: np.ndarray) -> None:
    """PNG of the image, its final groups (each group id its own colour) and the two blended.

    groups: int[H, W] group ids (see `evaluation.inference.paste_window_groups`).
    """
    ids, dense = np.unique(groups, return_inverse=True)
    coloured = group_colours(len(ids))[dense.reshape(groups.shape)]
    blend = np.round(0.5 * np.asarray(image, np.float32) + 0.5 * coloured).astype(np.uint8)
    fig = _panel_figure(
        [("image", image), (f"groups ({len(ids)})", coloured), ("groups over image", blend)]
    )
    _save(fig, path)


def save_pictures(
    output_dir: str,
    example: dict,
    prediction,
    groups: np.ndarray,
    class_names,
    has_background: bool,
) -> None:
    """An evaluated example's (dict(image, label, id)) files under `output_dir`, given its
    predicted labels [H, W] (an array or a device array): predictions/ID.png (the predicted
    labels, an indexed PNG), pictures/ID.png (`save_comparison`), pictures/ID_groups.png
    (`save_grouping`)."""
    name = str(example["id"]).replace(os.sep, "_")
    image, label, prediction = example["image"], example["label"], np.asarray(prediction)
    palette = label_palette(has_background)
    save_label_png(os.path.join(output_dir, "predictions", f"{name}.png"), prediction, palette)
    pictures = os.path.join(output_dir, "pictures")
    save_comparison(
        os.path.join(pictures, f"{name}.png"), image, prediction, label, class_names, palette
    )
    save_grouping(os.path.join(pictures, f"{name}_groups.png"), image, groups)


def _makedirs_for(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
