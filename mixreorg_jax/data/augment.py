"""Per-example image augmentation (docs/method.md §1), in numpy and PIL: GroupViT's training
augmentation, which is DeiT's, built by timm's `create_transform`.

Train path: RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3), bilinear) -> horizontal flip
(p 0.5) -> RandAugment `rand-m9-mstd0.5-inc1` -> ImageNet normalisation -> RandomErasing (p 0.25,
mode "pixel", one box). Eval path: the centre crop that "resize the short side to
size / crop_fraction, then centre-crop size" takes, without augmentation. Every random draw comes
from the `np.random.Generator` passed in, so an example's augmentation is a function of that
generator's seed (the pipeline derives it from (seed, index)). GroupViT's config also names
colour jitter 0.4, which timm leaves out when RandAugment is on, and so do we.

Both paths first choose a box in the original image, then decode and resize only that box: for
JPEGs the decoder's DCT scaling (`PIL.Image.draft`) decodes at the smallest power-of-two reduction
that still leaves the box at least `size` pixels wide and high, which makes decoding large photos
several times cheaper (`jpeg_draft=False` decodes at full resolution).

RandAugment equals timm's `rand_augment_transform("rand-m9-mstd0.5-inc1", hparams)` (timm 0.4.x
to 1.0.x, `timm/data/auto_augment.py`) with the hparams `create_transform` makes from GroupViT's
config: fill colour `img_mean` = the ImageNet mean in 0-255, rounded, (124, 116, 104), and
resampling bilinear (GroupViT's `interpolation: bilinear`; DeiT's `--train-interpolation` default
is bicubic, which `apply_op`/`rand_augment` take as `resample`). Each of 2 layers draws one of
timm's 15 "increasing" ops uniformly (with replacement) and applies it with probability 0.5 at a
magnitude m ~ N(9, 0.5) clipped to [0, 10]; the op's argument from m (f = m / 10, and +- a sign
drawn with probability 1/2 where marked):
  AutoContrast, Equalize, Invert                          no argument
  Rotate                                                  +- 30 f degrees
  PosterizeIncreasing                                     keep 4 - int(4 f) bits
  SolarizeIncreasing                                      threshold 256 - min(256, int(256 f))
  SolarizeAdd                                             + min(128, int(110 f)) below 128
  Color/Contrast/Brightness/SharpnessIncreasing           factor max(0.1, 1 +- 0.9 f)
  ShearX, ShearY                                          +- 0.3 f
  TranslateXRel, TranslateYRel                            +- 0.45 f of the width / height
Our ops draw in timm's order (the layers' ops, then per layer: apply?, magnitude, sign), so
`tests/test_augment.py` replays one draw through both and compares the images.

RandomErasing equals timm's `RandomErasing(0.25, mode="pixel", max_count=1)` (DeiT's `--reprob
0.25 --remode pixel --recount 1`), applied after normalisation.

PosterizeIncreasing at m = 10 (about 2% of its applications at m9 mstd0.5) keeps 0 bits: the
Pillow that GroupViT and DeiT ran with returned a black image, recent Pillow (13 here) raises
ValueError inside timm; ours returns black.

What remains different from timm: the draws come from one numpy Generator instead of Python's
`random`, numpy's global generator and torch's (same distributions, other streams); the crop
decodes only its box (possibly DCT-scaled, see above) and resizes it with PIL's `box=`, whose
filter also reads the pixels just outside the box where timm's crop-then-resize clamps to the
box, so the crop's border pixels can differ slightly; the crop draws its left offset before its
top (timm: top first; same distribution).
"""

import dataclasses
import io
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_255 = np.array(IMAGENET_MEAN, np.float32) * 255
_INV_STD_255 = 1 / (np.array(IMAGENET_STD, np.float32) * 255)
# timm's RandAugment hparams from GroupViT's config (module docstring): `img_mean`, the fill of
# the geometric ops, is the ImageNet mean in 0-255 rounded; `interpolation` is bilinear.
FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)
RESAMPLE = Image.Resampling.BILINEAR
MAX_MAGNITUDE = 10.0  # timm's magnitude scale (`_LEVEL_DENOM`)


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


# ---------------------------------------------------------------- RandAugment (timm's "increasing")
# Magnitude m in [0, 10] -> argument, as timm maps it (module docstring; docs/method.md §1). The
# fractions are computed as m / 10 * scale, timm's order, so int() truncates at the same places.
def _signed_scale(scale: float):
    def argument(m: float, negate: bool) -> float:
        value = m / MAX_MAGNITUDE * scale
        return -value if negate else value

    return argument


def _enhance_factor(m: float, negate: bool) -> float:
    delta = m / MAX_MAGNITUDE * 0.9
    return max(0.1, 1.0 + (-delta if negate else delta))


def _posterize_bits(m: float, negate: bool) -> int:
    return 4 - int(m / MAX_MAGNITUDE * 4)


def _solarize_threshold(m: float, negate: bool) -> int:
    return 256 - min(256, int(m / MAX_MAGNITUDE * 256))


def _solarize_add_amount(m: float, negate: bool) -> int:
    return min(128, int(m / MAX_MAGNITUDE * 110))


# The ops: (image, argument, fill, resample) -> image.
def _rotate(image, degrees, fill, resample):
    return image.rotate(degrees, resample=resample, fillcolor=fill)


def _affine(coefficients):
    def apply(image, value, fill, resample):
        return image.transform(
            image.size,
            Image.Transform.AFFINE,
            coefficients(value, image.size),
            resample=resample,
            fillcolor=fill,
        )

    return apply


def _enhance(enhancer):
    return lambda image, factor, fill, resample: enhancer(image).enhance(factor)


def _posterize(image, bits, fill, resample):
    # Keep the `bits` high bits of every value. At m = 10 timm asks for 0 bits: the Pillow of
    # GroupViT's and DeiT's time returned black, Pillow 13 refuses; black here (module docstring).
    mask = (0xFF << (8 - bits)) & 0xFF
    return image.point([v & mask for v in range(256)] * len(image.getbands()))


def _solarize_add(image, amount, fill, resample):
    # Values below 128 get `amount` added (saturating at 255); the rest stay.
    levels = np.arange(256)
    table = np.where(levels < 128, np.minimum(levels + amount, 255), levels)
    return image.point(table.tolist() * len(image.getbands()))


class _Op(NamedTuple):
    timm_name: str
    argument: Callable | None  # (magnitude, negate) -> argument; None: the op takes none
    apply: Callable  # (image, argument, fill, resample) -> image
    signed: bool  # timm negates the argument with probability 1/2


# In timm's order (its `_RAND_INCREASING_TRANSFORMS`): a layer's op is an index into this list.
_OPS = {
    "autocontrast": _Op("AutoContrast", None, lambda im, a, f, r: ImageOps.autocontrast(im), False),
    "equalize": _Op("Equalize", None, lambda im, a, f, r: ImageOps.equalize(im), False),
    "invert": _Op("Invert", None, lambda im, a, f, r: ImageOps.invert(im), False),
    "rotate": _Op("Rotate", _signed_scale(30.0), _rotate, True),
    "posterize": _Op("PosterizeIncreasing", _posterize_bits, _posterize, False),
    "solarize": _Op(
        "SolarizeIncreasing",
        _solarize_threshold,
        lambda im, a, f, r: ImageOps.solarize(im, a),
        False,
    ),
    "solarize_add": _Op("SolarizeAdd", _solarize_add_amount, _solarize_add, False),
    "color": _Op("ColorIncreasing", _enhance_factor, _enhance(ImageEnhance.Color), True),
    "contrast": _Op("ContrastIncreasing", _enhance_factor, _enhance(ImageEnhance.Contrast), True),
    "brightness": _Op(
        "BrightnessIncreasing", _enhance_factor, _enhance(ImageEnhance.Brightness), True
    ),
    "sharpness": _Op(
        "SharpnessIncreasing", _enhance_factor, _enhance(ImageEnhance.Sharpness), True
    ),
    "shear_x": _Op("ShearX", _signed_scale(0.3), _affine(lambda s, _: (1, s, 0, 0, 1, 0)), True),
    "shear_y": _Op("ShearY", _signed_scale(0.3), _affine(lambda s, _: (1, 0, 0, s, 1, 0)), True),
    "translate_x": _Op(
        "TranslateXRel",
        _signed_scale(0.45),
        _affine(lambda p, size: (1, 0, p * size[0], 0, 1, 0)),
        True,
    ),
    "translate_y": _Op(
        "TranslateYRel",
        _signed_scale(0.45),
        _affine(lambda p, size: (1, 0, 0, 0, 1, p * size[1])),
        True,
    ),
}
OP_NAMES = tuple(_OPS)
TIMM_NAMES = {name: op.timm_name for name, op in _OPS.items()}
SIGNED_OPS = frozenset(name for name, op in _OPS.items() if op.signed)


def op_argument(name: str, magnitude: float, negate: bool = False):
    """The argument op `name` takes at `magnitude` (in [0, 10]), negated when `negate` for the
    ops timm gives a random sign (`SIGNED_OPS`); None for the ops without one."""
    op = _OPS[name]
    return None if op.argument is None else op.argument(magnitude, negate)


def apply_op(
    image: Image.Image,
    name: str,
    magnitude: float,
    negate: bool = False,
    *,
    fill=FILL,
    resample=RESAMPLE,
) -> Image.Image:
    """Op `name` at a given magnitude in [0, 10] and sign, without randomness (timm's `AugmentOp`
    once it has drawn): geometric ops fill with `fill` and resample with `resample`."""
    return _OPS[name].apply(image, op_argument(name, magnitude, negate), fill, resample)


def _draw_negate(name: str, rng: np.random.Generator) -> bool:
    # timm's random sign: drawn only for the signed ops; negative when the draw exceeds 1/2.
    return name in SIGNED_OPS and rng.random() > 0.5


def sample_magnitude(
    rng: np.random.Generator, magnitude: float, mstd: float, upper: float = MAX_MAGNITUDE
) -> float:
    """One application's magnitude, timm's rule: N(magnitude, mstd) if mstd > 0 (uniform on
    [0, magnitude] if mstd is above 100 or infinite), else `magnitude`; clipped to [0, upper]."""
    m = magnitude
    if mstd > 100:
        m = rng.uniform(0.0, magnitude)
    elif mstd > 0:
        m = rng.normal(magnitude, mstd)
    return float(max(0.0, min(m, upper)))


def _op_drawing_its_sign(name: str):
    def op(image: Image.Image, magnitude: float, rng: np.random.Generator) -> Image.Image:
        return apply_op(image, name, magnitude, _draw_negate(name, rng))

    return op


# name -> op(image, magnitude in [0, 10], rng) -> image, the sign drawn from rng as timm draws it.
RANDAUGMENT_OPS = {name: _op_drawing_its_sign(name) for name in OP_NAMES}


def rand_augment(
    image: Image.Image,
    rng: np.random.Generator,
    *,
    num_ops: int = 2,
    magnitude: float = 9.0,
    mstd: float = 0.5,
    prob: float = 0.5,
    fill=FILL,
    resample=RESAMPLE,
) -> Image.Image:
    """timm's RandAugment (`rand-m{magnitude}-n{num_ops}-mstd{mstd}-inc1`, layer probability
    `prob`), drawing as timm does: the `num_ops` ops first (uniform, with replacement), then for
    each layer whether it applies (no draw when prob >= 1), its magnitude and its sign."""
    for index in rng.integers(len(OP_NAMES), size=num_ops):
        name = OP_NAMES[index]
        if prob < 1.0 and rng.random() > prob:
            continue
        m = sample_magnitude(rng, magnitude, mstd)
        image = apply_op(image, name, m, _draw_negate(name, rng), fill=fill, resample=resample)
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

    timm's `RandomErasing(prob, mode="pixel", max_count=1)` (DeiT's `--reprob 0.25 --remode pixel
    --recount 1`, docs/method.md §1), drawing as it does: apply when a uniform draw is at most
    `prob`; then up to ten tries of an area fraction uniform in `area` and an aspect h/w
    log-uniform in `ratio`, rounded to h, w; the first with h < H and w < W is erased at a uniform
    top, then left, offset, with one independent N(0, 1) value per pixel and channel.
    """
    if prob <= 0 or rng.random() > prob:
        return x
    height, width, channels = x.shape
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*area) * (height * width)
        aspect = math.exp(rng.uniform(*log_ratio))
        h = round(math.sqrt(target_area * aspect))
        w = round(math.sqrt(target_area / aspect))
        if h < height and w < width:
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
