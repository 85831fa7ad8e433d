"""Segmenting a picture by class names: the CLI's two PNGs and `model.segment` from the handle."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

import mixreorg_jax
from mixreorg_jax import segment
from mixreorg_jax.evaluation import inference, visualize
from mixreorg_jax.formats import model_files
from mixreorg_jax.models import presets

# The tiny model's own input size, what its checkpoint records: 32 px windows at stride 16.
SMALL_PROTOCOL = ["--short_side", "32", "--window", "32", "--stride", "16"]
CLASSES = ("cat", "dog", "grass")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(argv: list[str]) -> None:
    """The program's flags parsed from ARGV on their own FlagValues (absl's global ones belong to
    whichever program runs), then its `run`, in this process."""
    flag_values = flags.FlagValues()
    segment.define_flags(flag_values)
    flag_values(["segment"] + argv)
    segment.run(flag_values)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model checkpoint with random weights (drawn in numpy: initialising the model would
    compile both towers for nothing)."""
    config = presets.get_model_config("tiny")
    rng = np.random.default_rng(0)

    def random_leaf(path, leaf):
        name = jax.tree_util.keystr(path)
        if np.issubdtype(leaf.dtype, np.integer):
            return np.zeros(leaf.shape, leaf.dtype)
        if "'var'" in name or "'scale'" in name:
            return (1 + 0.1 * rng.random(leaf.shape)).astype(leaf.dtype)
        return (rng.standard_normal(leaf.shape) * 0.3).astype(leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(
        random_leaf, model_files.abstract_variables(config)
    )
    path = str(tmp_path_factory.mktemp("model") / "tiny")
    model_files.save_model(path, variables, config)
    return path


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    image[10:30, 20:50] = (200, 40, 40)
    path = str(tmp_path_factory.mktemp("pictures") / "picture.png")
    Image.fromarray(image).save(path)
    return path, image


def test_cli_writes_overlay_and_indexed_mask(checkpoint, picture, tmp_path, capsys):
    path, image = picture
    output = str(tmp_path / "seg.png")
    run_cli(
        [
            "--checkpoint",
            checkpoint,
            "--image",
            path,
            "--classes",
            " cat, dog,grass ",
            "--output",
            output,
            "--bg_thresh",
            "0.5",
        ]
    )
    printed = capsys.readouterr().out
    assert "background" in printed and "grass" in printed
    assert "short_side 32, max_long 2048, window 32, stride 16, top_k 5" in printed

    with Image.open(output) as overlay:
        assert overlay.mode == "RGB" and overlay.size == (70, 45)
        overlay = np.array(overlay)
    mask_file = segment.mask_path(output)
    assert mask_file == str(tmp_path / "seg_mask.png")
    with Image.open(mask_file) as mask_image:
        assert mask_image.mode == "P" and mask_image.size == (70, 45)
        palette = np.array(mask_image.getpalette(), np.uint8).reshape(-1, 3)
        mask = np.array(mask_image)
    np.testing.assert_array_equal(palette[:256], visualize.label_palette(has_background=True))
    assert mask.min() >= 0 and mask.max() <= len(CLASSES)
    # Background pixels keep the picture; the others are blended with their class colour.
    np.testing.assert_array_equal(overlay[mask == 0], image[mask == 0])
    np.testing.assert_array_equal(
        overlay, visualize.overlay(image, mask, visualize.label_palette(True), alpha=0.5)
    )

    # The Python handle gives the same labels, by default and with the sizes given; so do the
    # flags given.
    model = mixreorg_jax.load(checkpoint)
    labels = model.segment(image, list(CLASSES), bg_thresh=0.5)
    np.testing.assert_array_equal(labels, mask)
    labels = model.segment(image, list(CLASSES), bg_thresh=0.5, short_side=32, window=32, stride=16)
    np.testing.assert_array_equal(labels, mask)
    run_cli(
        ["--checkpoint", checkpoint, "--image", path, "--classes", ",".join(CLASSES)]
        + ["--output", str(tmp_path / "flags.png"), "--bg_thresh", "0.5"]
        + SMALL_PROTOCOL
    )
    with Image.open(segment.mask_path(str(tmp_path / "flags.png"))) as mask_image:
        np.testing.assert_array_equal(np.array(mask_image), mask)

    # Without a background threshold every pixel gets one of the classes.
    labels = model.segment(image, list(CLASSES), short_side=32, window=32, stride=16)
    assert labels.shape == (45, 70) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < len(CLASSES)


def test_bad_input_is_a_one_line_error(checkpoint, picture, tmp_path):
    path, _ = picture
    cases = [
        (["--image", str(tmp_path / "missing.jpg"), "--checkpoint", checkpoint], "no image"),
        (["--image", path, "--checkpoint", str(tmp_path / "no_model")], "no model"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(argv + ["--classes", "cat", "--output", str(tmp_path / "o.png")])
        assert str(exit_info.value.code).startswith("error: ") and message in str(
            exit_info.value.code
        )
    with pytest.raises(ValueError, match="class names"):
        inference.segment({}, presets.get_model_config("tiny"), np.zeros((8, 8, 3), np.uint8), [])

    # The real command line ends in one line on stderr.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mixreorg_jax.segment",
            f"--checkpoint={checkpoint}",
            f"--image={tmp_path / 'missing.jpg'}",
            "--classes=cat,dog",
            f"--output={tmp_path / 'o.png'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode != 0
    assert (
        result.stderr.strip().splitlines()[-1] == f"error: no image at {tmp_path / 'missing.jpg'}"
    )
    assert "Traceback" not in result.stderr


def test_label_palette_and_png_round_trip(tmp_path):
    for has_background in (True, False):
        palette = visualize.label_palette(has_background)
        assert palette.shape == (256, 3) and palette.dtype == np.uint8
        assert tuple(palette[255]) == (255, 255, 255)
        assert len({tuple(c) for c in palette[:151]}) == 151  # ADE20K's classes all distinct
        assert (tuple(palette[0]) == (0, 0, 0)) == has_background
    labels = np.random.default_rng(0).integers(0, 151, (5, 7))
    labels[0, 0] = 255
    visualize.save_label_png(str(tmp_path / "l.png"), labels, visualize.label_palette())
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "l.png")), labels)


def test_fit_square_keeps_the_aspect_ratio_on_black():
    image = np.full((20, 40, 3), 200, np.uint8)
    square = visualize.fit_square(image, 32)
    assert square.shape == (32, 32, 3) and square.dtype == np.uint8
    # Scaled by 0.8 to 16 x 32, centred: rows 8-23 the image, the rest black.
    assert (square[8:24] == 200).all() and (square[:8] == 0).all() and (square[24:] == 0).all()
