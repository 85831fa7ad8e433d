r"""Segments any picture by a list of class names (zero-shot, the evaluation's protocol).

  python -m mixreorg_jax.segment --checkpoint=CKPT --image=cat.jpg --classes=cat,dog,grass \
      --output=cat_seg.png [--bg_thresh=0.5]

writes `cat_seg.png` (the picture with the classes' colours blended in) and `cat_seg_mask.png`
(an indexed PNG of the labels: with --bg_thresh, 0 = background and k = the k-th class; without,
k - 1 = the k-th class), and prints the protocol and which colour is which class.
`--checkpoint`: a model checkpoint, a training workdir or a Hugging Face GroupViT folder.

The protocol's sizes (--short_side, --max_long, --window, --stride, --top_k) default to the ones
the checkpoint records (`formats.model_files.read_inference`; for a checkpoint that records none,
`default_inference`: GroupViT's 448-px protocol for a 224-px, patch-16 model, else windows of the
model's training resolution). A protocol whose crops would not fit in memory is refused with one
line before the model runs (`evaluation.inference.check_memory`). In Python:

    model = mixreorg_jax.load(CKPT)                                          # model.protocol
    labels = model.segment(image, ["cat", "dog", "grass"], bg_thresh=0.5)  # int32[H, W]
"""

import os

import numpy as np
from absl import app, flags
from PIL import Image

from mixreorg_jax import api, cli
from mixreorg_jax.evaluation import inference, visualize

# The protocol's flags (`formats.model_files.INFERENCE_FIELDS`); 0 takes the checkpoint's.
_PROTOCOL = {
    "short_side": "Short side of the resized picture in pixels (unless max_long caps it).",
    "max_long": "Longest long side of the resized picture in pixels.",
    "window": "Sliding window in pixels.",
    "stride": "Sliding window stride in pixels.",
    "top_k": "Classes kept per window.",
}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
    """The program's flags. Defined only when run as a program (or on a caller's own FlagValues),
    so that importing this module does not clash with other programs' flags."""
    define = dict(flag_values=flag_values)
    flags.DEFINE_string(
        "checkpoint", None, "Model checkpoint, training workdir or HF GroupViT folder.", **define
    )
    flags.DEFINE_string("image", None, "Picture to segment (any PIL format).", **define)
    flags.DEFINE_string("classes", None, "Comma-separated class names.", **define)
    flags.DEFINE_string("output", None, "Overlay PNG to write (the mask goes beside it).", **define)
    flags.DEFINE_float(
        "bg_thresh", None, "Background threshold (default: no background).", **define
    )
    flags.DEFINE_float("alpha", 0.5, "Overlay opacity.", **define)
    for name, help_text in _PROTOCOL.items():
        flags.DEFINE_integer(name, 0, f"{help_text} 0: the checkpoint's.", **define)
    flags.DEFINE_integer("batch", 8, "Windows per model call.", **define)
    flags.mark_flags_as_required(["checkpoint", "image", "classes", "output"], **define)


def mask_path(output: str) -> str:
    """Where the indexed mask goes beside the overlay `output`: `NAME_mask.png`."""
    stem, _ = os.path.splitext(output)
    return stem + "_mask.png"


def run(values: flags.FlagValues) -> None:
    """Segments `--image` with the parsed flag `values`; writes the overlay and the mask, prints
    the protocol and the legend. Expected failures (no image, no model, bad classes, crops too
    large for the memory) end in one line `error: ...`."""
    try:
        if not os.path.isfile(values.image):
            raise FileNotFoundError(f"no image at {values.image}")
        with Image.open(values.image) as picture:
            image = np.asarray(picture.convert("RGB"), np.uint8)
        class_names = [c.strip() for c in values.classes.split(",") if c.strip()]
        model = api.load(values.checkpoint)
        protocol = dict(model.protocol)
        protocol.update(
            {name: getattr(values, name) for name in _PROTOCOL if getattr(values, name)}
        )
        # Checked here too so that the message names the flags.
        sizes = {name: protocol[name] for name in ("short_side", "max_long", "window")}
        inference.check_memory(model.config, batch=values.batch, flag_prefix="--", **sizes)
        print(", ".join(f"{name} {value}" for name, value in protocol.items()))
        labels = model.segment(
            image, class_names, bg_thresh=values.bg_thresh, batch=values.batch, **protocol
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {cli.one_line(e)}") from None
    has_background = values.bg_thresh is not None
    palette = visualize.label_palette(has_background)
    names = (["background"] if has_background else []) + class_names
    Image.fromarray(
        visualize.overlay(
            image, labels, palette, alpha=values.alpha, background=0 if has_background else None
        )
    ).save(values.output)
    visualize.save_label_png(mask_path(values.output), labels, palette)
    counts = np.bincount(labels.reshape(-1), minlength=len(names))
    for label, name in enumerate(names):
        r, g, b = palette[label]
        share = counts[label] / labels.size
        print(f"{label:3d} {name:<20} rgb({r:3d},{g:3d},{b:3d})  {share:6.1%}")
    print(f"wrote {values.output} and {mask_path(values.output)}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_orbax_logs()
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
