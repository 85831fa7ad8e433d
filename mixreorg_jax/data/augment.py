"""Per-example image augmentation (timm/DeiT style, docs/method.md §1), in numpy and PIL.

Train path: RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3), bilinear) -> horizontal flip
(p 0.5) -> RandAugment (2 ops, magnitude 9, magnitude std 0.5) -> ImageNet normalisation ->
RandomErasing (p 0.25, per-pixel normal noise). Eval path: the centre crop that "resize the short
side to size / crop_fraction, then centre-crop size" takes, without augmentation. Every random
draw comes from the `np.random.Generator` passed in, so an example's augmentation is a function of
that generator's seed (the pipeline derives it from (seed, index)).

Both paths first choose a box in the original image, then decode and resize only that box: for
JPEGs the decoder's DCT scaling (`PIL.Image.draft`) decodes at the smallest power-of-two reduction
that still leaves the box at least `size` pixels wide and high, which makes decoding large photos
several times cheaper (`jpeg_draft=False` decodes at full resolution).

RandAugment (ours, after timm's "increasing" ops, `rand-m9-mstd0.5-inc1` as GroupViT's config):
each of `num_ops` layers draws one of 14 ops uniformly (with replacement) and applies it with
probability `prob` at magnitude m ~ N(magnitude, mstd) clipped to [0, 10]; the severity of every
op grows with m: rotate up to +-30 degrees, shear up to +-0.3, translate up to +-45% of the side,
colour/contrast/brightness/sharpness factor 1 +- 0.9 m/10, solarize threshold 256 (1 - m/10),
posterize to 8 - 4 m/10 bits (AutoAugment's 4-8 bit range rather than timm's 0-4, which blanks
the image near m = 10). Geometric ops fill with the ImageNet mean colour (0 after normalisation).
"""

import dataclasses
import io
import math
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_255 = np.array(IMAGENET_MEAN, np.float32) * 255
_INV_STD_255 = 1 / (np.array(IMAGENET_STD, np.float32) * 255)
_FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)

MAX_MAGNITUDE = 10.0


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """The augmentation switches and parameters (the `config.data.augment` fields)."""

    random_resized_crop: bool = True  # False: the eval centre crop
    crop_scale: tuple[float, float] = (0.08, 1.0)  # fraction of the image area
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # width / height
    flip: bool = True
    randaugment: bool = True
    randaugment_num_ops: int = 2
    randaugment_magnitude: float = 9.0
    randaugment_mstd: float = 0.5
    randaugment_prob: float = 0.5  # each layer's op is applied with this probability
    random_erasing: float = 0.25  # probability; 0 turns it off
    eval_crop_fraction: float = 0.875  # 224 / 256
    jpeg_draft: bool = True

    @classmethod
    def from_config(cls, config: Mapping | None) -> "AugmentOptions":
        """From a dict or ConfigDict; missing fields keep their defaults, unknown ones fail."""
        values = dict(config or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown augment option(s) {unknown}; known: {sorted(known)}")
        for name in ("crop_scale", "crop_ratio"):
            if name in values:
                values[name] = tuple(float(v) for v in values[name])
        return cls(**values)


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float],
):
    """(left, top, w, h) of a random crop: area fraction in `scale`, aspect w/h in `ratio`.

    Ten tries at a random area and log-uniform aspect; if none fits, the largest centred crop
    whose aspect is within `ratio` (torchvision's and timm's rule).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, w, h
    aspect = width / height
    if aspect < min(ratio):
        w, h = width, round(width / min(ratio))
    elif aspect > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, crop_fraction: float):
    """(left, top, w, h) of the square that resize(short side -> size / fraction) then
    centre-crop(size) keeps."""
    side = min(width, height) * crop_fraction
    return (width - side) / 2, (height - side) / 2, side, side


def decode_box(image_bytes: bytes, box_fn, size: int, jpeg_draft: bool = True) -> Image.Image:
    """Decodes the box `box_fn(width, height)` of an encoded image, resized to size x size RGB.

    The box is chosen from the header's size before decoding, so JPEGs can be decoded at a reduced
    scale that still keeps the box at least `size` pixels on each side.
    """
    image = Image.open(io.BytesIO(image_bytes))
    width, height = image.size
    left, top, w, h = box_fn(width, height)
    if jpeg_draft and image.format == "JPEG":
        image.draft("RGB", (math.ceil(width * size / w), math.ceil(height * size / h)))
    sx, sy = image.width / width, image.height / height
    if image.mode != "RGB":
        image = image.convert("RGB")
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box)


# ---------------------------------------------------------------- RandAugment ops
def _signed(value: float, rng: np.random.Generator) -> float:
    return value if rng.random() < 0.5 else -value


def _affine(image: Image.Image, coefficients) -> Image.Image:
    return image.transform(
        image.size,
        Image.Transform.AFFINE,
        coefficients,
        resample=Image.Resampling.BILINEAR,
        fillcolor=_FILL,
    )


def _enhance(enhancer):
    def op(image, m, rng):
        return enhancer(image).enhance(1 + _signed(0.9 * m / MAX_MAGNITUDE, rng))

    return op


# name -> op(image, magnitude in [0, 10], rng) -> image
RANDAUGMENT_OPS = {
    "identity": lambda image, m, rng: image,
    "autocontrast": lambda image, m, rng: ImageOps.autocontrast(image),
    "equalize": lambda image, m, rng: ImageOps.equalize(image),
    "rotate": lambda image, m, rng: image.rotate(
        _signed(30 * m / MAX_MAGNITUDE, rng), resample=Image.Resampling.BILINEAR, fillcolor=_FILL
    ),
    "solarize": lambda image, m, rng: ImageOps.solarize(
        image, threshold=256 - int(256 * m / MAX_MAGNITUDE)
    ),
    "posterize": lambda image, m, rng: ImageOps.posterize(image, 8 - int(4 * m / MAX_MAGNITUDE)),
    "color": _enhance(ImageEnhance.Color),
    "contrast": _enhance(ImageEnhance.Contrast),
    "brightness": _enhance(ImageEnhance.Brightness),
    "sharpness": _enhance(ImageEnhance.Sharpness),
    "shear_x": lambda image, m, rng: _affine(
        image, (1, _signed(0.3 * m / MAX_MAGNITUDE, rng), 0, 0, 1, 0)
    ),
    "shear_y": lambda image, m, rng: _affine(
        image, (1, 0, 0, _signed(0.3 * m / MAX_MAGNITUDE, rng), 1, 0)
    ),
    "translate_x": lambda image, m, rng: _affine(
        image, (1, 0, _signed(0.45 * m / MAX_MAGNITUDE, rng) * image.width, 0, 1, 0)
    ),
    "translate_y": lambda image, m, rng: _affine(
        image, (1, 0, 0, 0, 1, _signed(0.45 * m / MAX_MAGNITUDE, rng) * image.height)
    ),
}
_OP_NAMES = tuple(RANDAUGMENT_OPS)


def rand_augment(
    image: Image.Image,
    rng: np.random.Generator,
    *,
    num_ops: int = 2,
    magnitude: float = 9.0,
    mstd: float = 0.5,
    prob: float = 0.5,
) -> Image.Image:
    """`num_ops` layers, each a uniformly drawn op applied with probability `prob`."""
    for _ in range(num_ops):
        name = _OP_NAMES[rng.integers(len(_OP_NAMES))]
        if rng.random() >= prob:
            continue
        m = magnitude if mstd <= 0 else rng.normal(magnitude, mstd)
        image = RANDAUGMENT_OPS[name](image, float(np.clip(m, 0.0, MAX_MAGNITUDE)), rng)
    return image


# ---------------------------------------------------------------- after normalisation
def normalize(image: Image.Image) -> np.ndarray:
    """uint8 RGB -> float32 [H, W, 3] with ImageNet mean/std (0-1 scale)."""
    return (np.asarray(image, np.float32) - _MEAN_255) * _INV_STD_255


def random_erasing(
    x: np.ndarray,
    rng: np.random.Generator,
    *,
    prob: float,
    area: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """With probability `prob`, one rectangle of a normalised [H, W, C] image set to N(0, 1) noise.

    Area fraction uniform in `area`, aspect h/w log-uniform in `ratio`, up to ten tries to fit
    (timm's RandomErasing, mode "pixel", one box).
    """
    if prob <= 0 or rng.random() >= prob:
        return x
    height, width, channels = x.shape
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = height * width * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        h = round(math.sqrt(target_area * aspect))
        w = round(math.sqrt(target_area / aspect))
        if 0 < h < height and 0 < w < width:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            x = x.copy()
            x[top : top + h, left : left + w] = rng.standard_normal((h, w, channels), np.float32)
            return x
    return x


# ---------------------------------------------------------------- the two paths
def train_image(
    image_bytes: bytes,
    rng: np.random.Generator,
    *,
    size: int,
    options: AugmentOptions = AugmentOptions(),
) -> np.ndarray:
    """Encoded image -> augmented, normalised float32 [size, size, 3]."""
    if options.random_resized_crop:

        def box_fn(w, h):
            return random_resized_crop_box(w, h, rng, options.crop_scale, options.crop_ratio)
    else:

        def box_fn(w, h):
            return center_crop_box(w, h, options.eval_crop_fraction)

    image = decode_box(image_bytes, box_fn, size, options.jpeg_draft)
    if options.flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if options.randaugment and options.randaugment_num_ops > 0:
        image = rand_augment(
            image,
            rng,
            num_ops=options.randaugment_num_ops,
            magnitude=options.randaugment_magnitude,
            mstd=options.randaugment_mstd,
            prob=options.randaugment_prob,
        )
    return random_erasing(normalize(image), rng, prob=options.random_erasing)


def eval_image(
    image_bytes: bytes, *, size: int, crop_fraction: float = 0.875, jpeg_draft: bool = True
) -> np.ndarray:
    """Encoded image -> centre crop, normalised float32 [size, size, 3]; no randomness."""
    image = decode_box(
        image_bytes, lambda w, h: center_crop_box(w, h, crop_fraction), size, jpeg_draft
    )
    return normalize(image)
