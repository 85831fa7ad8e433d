"""The paper augmentation (data/augment.py, docs/method.md §1) against timm's own code.

GroupViT's and DeiT's RandAugment is timm's `rand-m9-mstd0.5-inc1` and their RandomErasing is
timm's `RandomErasing(0.25, mode="pixel", max_count=1)`. timm is installed without its
dependencies, so `import timm` fails (no torchvision): its `auto_augment.py` (PIL and numpy only)
and `random_erasing.py` (torch) are loaded from their files.

timm draws from Python's `random`, numpy's global generator and torch. To compare whole policies,
the reference modules get stand-ins for those that replay draws from a numpy Generator, so that
timm and our code, each given a generator with the same seed, make the same draws if (and only if)
they draw in the same order, under the same rules; the images must then agree.
"""

import importlib.util
import inspect
import io
import math
import pathlib
import types

import numpy as np
import pytest
from PIL import Image, ImageOps

from mixreorg_jax.data import augment

BILINEAR = Image.Resampling.BILINEAR
BICUBIC = Image.Resampling.BICUBIC


def load_timm_file(relative: str, module_name: str):
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm reference not installed: pip install --no-deps timm")
    path = pathlib.Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        pytest.skip(f"timm reference has no {path}")
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


class OldPillowImageOps:
    """PIL.ImageOps with posterize to 0 bits as the Pillow of GroupViT's and DeiT's time did it
    (keep no bit: black); Pillow 13 raises instead, which timm's PosterizeIncreasing asks for at
    magnitude 10."""

    def __getattr__(self, name):
        return getattr(ImageOps, name)

    @staticmethod
    def posterize(image, bits):
        if bits != 0:
            return ImageOps.posterize(image, bits)
        mask = ~(2 ** (8 - bits) - 1)
        return image.point([i & mask for i in range(256)] * len(image.getbands()))


@pytest.fixture(scope="module")
def ref():
    """timm's timm/data/auto_augment.py (our own copy of the module, on old Pillow's posterize)."""
    module = load_timm_file("data/auto_augment.py", "timm_auto_augment_reference")
    module.ImageOps = OldPillowImageOps()
    return module


@pytest.fixture(scope="module")
def ref_erasing():
    """timm's timm/data/random_erasing.py (needs torch)."""
    pytest.importorskip("torch")
    return load_timm_file("data/random_erasing.py", "timm_random_erasing_reference")


def groupvit_hparams(interpolation=BILINEAR):
    """The hparams timm's `create_transform` passes to RandAugment for GroupViT's config
    (img_size 224, ImageNet mean, `interpolation: bilinear`)."""
    return dict(
        translate_const=int(224 * 0.45),
        img_mean=tuple(min(255, round(255 * x)) for x in augment.IMAGENET_MEAN),
        interpolation=interpolation,
    )


class ReplayRandom:
    """Python's `random` module, drawing from a numpy Generator."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def random(self):
        return float(self.rng.random())

    def gauss(self, mu, sigma):
        return float(self.rng.normal(mu, sigma))

    def uniform(self, a, b):
        return float(self.rng.uniform(a, b))

    def randint(self, a, b):
        return int(self.rng.integers(a, b + 1))


def replay_numpy(rng: np.random.Generator):
    """The `np` global of auto_augment.py, for its one draw: `np.random.choice(ops, n)`."""

    def choice(a, size, replace=True, p=None):
        assert replace and p is None
        return [a[i] for i in rng.integers(len(a), size=size)]

    return types.SimpleNamespace(random=types.SimpleNamespace(choice=choice))


class FixedSign:
    """Python's `random` for timm's `_randomly_negate` (negative when random() > 0.5)."""

    def __init__(self, negate: bool):
        self.value = 1.0 if negate else 0.0

    def random(self):
        return self.value


def make_images():
    rng = np.random.default_rng(1234)
    noise_square = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    noise_wide = rng.integers(0, 256, (17, 31, 3), dtype=np.uint8)
    # Structured: gradients, a disc, stripes; one at full range, one low-contrast and dark, so
    # autocontrast/equalize/solarize-add have work to do.
    images = [noise_square, noise_wide]
    for (h, w), (lo, hi) in (((28, 40), (0, 255)), ((33, 19), (40, 150))):
        y, x = np.mgrid[0:h, 0:w]
        disc = ((y - h / 2) ** 2 + (x - w / 3) ** 2 < (min(h, w) / 3) ** 2).astype(float)
        stripes = ((x // 3) % 2).astype(float)
        channels = [x / (w - 1), y / (h - 1) * 0.7 + 0.3 * disc, 0.5 * stripes + 0.5 * disc]
        image = lo + (hi - lo) * np.stack(channels, -1)
        images.append(np.round(image).astype(np.uint8))
    return [Image.fromarray(a, "RGB") for a in images]


IMAGES = make_images()
MAGNITUDES = (0.0, 1.0, 2.5, 3.3, 5.0, 6.25, 7.5, 8.7, 9.0, 9.45, 10.0)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size and a.mode == b.mode == "RGB"
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


# ---------------------------------------------------------------- the ops
def test_op_list_is_timms_increasing_set(ref):
    assert [augment.TIMM_NAMES[n] for n in augment.OP_NAMES] == ref._RAND_INCREASING_TRANSFORMS
    assert augment.FILL == groupvit_hparams()["img_mean"] == (124, 116, 104)
    assert augment.RESAMPLE == BILINEAR
    assert set(augment.RANDAUGMENT_OPS) == set(augment.OP_NAMES)


def test_op_arguments_equal_timms(ref, monkeypatch):
    hparams = groupvit_hparams()
    grid = [float(m) for m in np.linspace(0, 10, 401)] + list(MAGNITUDES)
    for name in augment.OP_NAMES:
        level_fn = ref.LEVEL_TO_ARG[augment.TIMM_NAMES[name]]
        signed = name in augment.SIGNED_OPS
        for negate in (False, True) if signed else (False,):
            monkeypatch.setattr(ref, "random", FixedSign(negate))
            for m in grid:
                ours = augment.op_argument(name, m, negate)
                if level_fn is None:
                    assert ours is None, name
                    continue
                (theirs,) = level_fn(m, hparams)
                assert ours == theirs, (name, m, negate, ours, theirs)
                assert type(ours) is type(theirs), (name, m)
    # Signed exactly where timm draws a sign.
    drawn = set()
    for name in augment.OP_NAMES:
        level_fn = ref.LEVEL_TO_ARG[augment.TIMM_NAMES[name]]
        if level_fn is not None:
            monkeypatch.setattr(ref, "random", FixedSign(False))
            plus = level_fn(5.0, hparams)
            monkeypatch.setattr(ref, "random", FixedSign(True))
            if level_fn(5.0, hparams) != plus:
                drawn.add(name)
    assert drawn == augment.SIGNED_OPS


@pytest.mark.parametrize("resample", [BILINEAR, BICUBIC], ids=["bilinear", "bicubic"])
def test_every_op_equals_timms_augment_op(ref, monkeypatch, resample):
    hparams = groupvit_hparams(resample)
    for name in augment.OP_NAMES:
        for negate in (False, True) if name in augment.SIGNED_OPS else (False,):
            monkeypatch.setattr(ref, "random", FixedSign(negate))
            for m in MAGNITUDES:
                theirs = ref.AugmentOp(augment.TIMM_NAMES[name], 1.0, m, hparams)
                for image in IMAGES:
                    ours = augment.apply_op(image, name, m, negate, resample=resample)
                    assert max_diff(ours, theirs(image)) <= 1, (name, m, negate, image.size)


def test_ops_change_the_image_at_magnitude_nine():
    # Guards the comparison above against two no-ops agreeing.
    for name in augment.OP_NAMES:
        for image in IMAGES[2:]:
            out = augment.apply_op(image, name, 9.0, negate=True)
            assert max_diff(out, image) > 1, (name, image.size)


def test_posterize_at_magnitude_ten_keeps_no_bit():
    assert augment.op_argument("posterize", 10.0) == 0
    for image in IMAGES:
        out = augment.apply_op(image, "posterize", 10.0)
        assert not np.asarray(out).any()
        expected = np.asarray(image) & 0xF0  # 4 bits at magnitude 0
        np.testing.assert_array_equal(augment.apply_op(image, "posterize", 0.0), expected)


# ---------------------------------------------------------------- the magnitude
@pytest.mark.parametrize(
    "magnitude, mstd, timm_mstd",
    [
        (9, 0.5, 0.5),
        (9.8, 0.5, 0.5),
        (0.3, 1.0, 1.0),
        (9, math.inf, math.inf),
        (9, 200.0, math.inf),  # the config string's rule: mstd > 100 means uniform
        (6, 0.0, 0.0),
    ],
)
def test_magnitude_sampling_equals_timms(ref, monkeypatch, magnitude, mstd, timm_mstd):
    op = ref.AugmentOp("Rotate", 1.0, magnitude, {**groupvit_hparams(), "magnitude_std": timm_mstd})
    seen = []
    op.level_fn = lambda level, hparams: seen.append(level) or (0.0,)
    op.aug_fn = lambda image, *args, **kwargs: image
    ours, theirs = np.random.default_rng(5), np.random.default_rng(5)
    monkeypatch.setattr(ref, "random", ReplayRandom(theirs))
    for _ in range(300):
        op(None)
        assert augment.sample_magnitude(ours, magnitude, mstd) == seen[-1]
    assert ours.random() == theirs.random()  # as many draws


def test_mstd_above_100_is_uniform_in_timms_config(ref):
    transform = ref.rand_augment_transform("rand-m9-mstd200-inc1", groupvit_hparams())
    assert transform.ops[0].magnitude_std == math.inf


def test_magnitude_distribution_m9_mstd05():
    rng = np.random.default_rng(0)
    samples = np.array([augment.sample_magnitude(rng, 9.0, 0.5) for _ in range(20000)])
    assert samples.min() >= 0 and samples.max() == 10.0
    # P(N(9, 0.5) > 10) = 1 - Phi(2) = 0.0228 of the samples clip to 10.
    assert 0.019 < (samples == 10.0).mean() < 0.027
    assert abs(np.median(samples) - 9.0) < 0.02
    inner = samples[(samples > 8.0) & (samples < 10.0)]
    assert abs(inner.mean() - 9.0) < 0.02
    # Near 0 the clip is at the other end: P(N(0.3, 1) < 0) = Phi(-0.3) = 0.382.
    low = np.array([augment.sample_magnitude(rng, 0.3, 1.0) for _ in range(20000)])
    assert low.min() == 0.0 and 0.37 < (low == 0.0).mean() < 0.395


# ---------------------------------------------------------------- the policy
def test_policy_settings_are_deits(ref):
    options = augment.AugmentOptions()
    transform = ref.rand_augment_transform("rand-m9-mstd0.5-inc1", groupvit_hparams())
    assert transform.num_layers == options.randaugment_num_ops == 2
    assert transform.choice_weights is None  # uniform, with replacement
    for op, name in zip(transform.ops, augment.OP_NAMES, strict=True):
        assert op.name == augment.TIMM_NAMES[name]
        assert op.prob == options.randaugment_prob
        assert op.magnitude == options.randaugment_magnitude
        assert op.magnitude_std == options.randaugment_mstd
        assert op.magnitude_max is None  # clipped to [0, 10]
        assert op.kwargs == dict(fillcolor=augment.FILL, resample=augment.RESAMPLE)


def run_both_policies(ref, monkeypatch, config, image, seed, **ours_kwargs):
    hparams = groupvit_hparams(ours_kwargs.get("resample", BILINEAR))
    transform = ref.rand_augment_transform(config, hparams)
    ours_rng, theirs_rng = np.random.default_rng(seed), np.random.default_rng(seed)
    monkeypatch.setattr(ref, "random", ReplayRandom(theirs_rng))
    monkeypatch.setattr(ref, "np", replay_numpy(theirs_rng))
    theirs = transform(image)
    ours = augment.rand_augment(image, ours_rng, **ours_kwargs)
    assert ours_rng.random() == theirs_rng.random()  # the same number of draws
    return ours, theirs


@pytest.mark.parametrize(
    "config, kwargs",
    [
        ("rand-m9-mstd0.5-inc1", dict()),
        ("rand-m9-mstd0.5-inc1-p1.0", dict(prob=1.0, resample=BICUBIC)),
        ("rand-m5-n3-mstd1.0-inc1", dict(num_ops=3, magnitude=5, mstd=1.0)),
    ],
)
def test_policy_with_a_fixed_draw_equals_timms(ref, monkeypatch, config, kwargs):
    changed = 0
    for seed in range(80):
        image = IMAGES[seed % len(IMAGES)]
        ours, theirs = run_both_policies(ref, monkeypatch, config, image, seed, **kwargs)
        assert max_diff(ours, theirs) <= 1, (config, seed)
        changed += max_diff(ours, image) > 1
    assert changed > 40


def test_train_image_randaugment_and_erasing_equal_timms(ref, ref_erasing, monkeypatch):
    """The pipeline's path after the crop (RandAugment -> normalise -> RandomErasing), with the
    default options, against timm's two transforms replaying one stream of draws."""
    import torch

    source = Image.fromarray(np.asarray(IMAGES[2].resize((48, 32))))
    encoded = io.BytesIO()
    source.save(encoded, format="PNG")
    options = augment.AugmentOptions(random_resized_crop=False, flip=False)
    crop = augment.decode_box(
        encoded.getvalue(), lambda w, h: augment.center_crop_box(w, h, 0.875), 24
    )
    transform = ref.rand_augment_transform("rand-m9-mstd0.5-inc1", groupvit_hparams())
    erasing = ref_erasing.RandomErasing(0.25, mode="pixel", max_count=1, device="cpu")
    for seed in range(60):
        theirs_rng = np.random.default_rng(seed)
        replay = ReplayRandom(theirs_rng)
        monkeypatch.setattr(ref, "random", replay)
        monkeypatch.setattr(ref, "np", replay_numpy(theirs_rng))
        monkeypatch.setattr(ref_erasing, "random", replay)
        monkeypatch.setattr(ref_erasing, "_get_pixels", replay_pixels(theirs_rng))
        x = torch.from_numpy(augment.normalize(transform(crop)).transpose(2, 0, 1).copy())
        theirs = erasing(x).numpy().transpose(1, 2, 0)
        ours_rng = np.random.default_rng(seed)
        ours = augment.train_image(encoded.getvalue(), ours_rng, size=24, options=options)
        np.testing.assert_allclose(ours, theirs, atol=1.01 / (255 * min(augment.IMAGENET_STD)))
        assert ours_rng.random() == theirs_rng.random()


# ---------------------------------------------------------------- random erasing
def replay_pixels(rng: np.random.Generator):
    """timm's `_get_pixels` for mode "pixel": [C, h, w] normal values, drawn as ours draws them."""
    import torch

    def get_pixels(per_pixel, rand_color, patch_size, dtype, device):
        assert per_pixel and not rand_color
        channels, h, w = patch_size
        values = rng.standard_normal((h, w, channels), np.float32)
        return torch.from_numpy(values.transpose(2, 0, 1).copy())

    return get_pixels


@pytest.mark.parametrize("prob", [0.25, 1.0])
def test_random_erasing_with_a_fixed_draw_equals_timms(ref_erasing, monkeypatch, prob):
    import torch

    erasing = ref_erasing.RandomErasing(prob, mode="pixel", max_count=1, device="cpu")
    shapes = [(32, 32, 3), (17, 40, 3), (224, 160, 3), (6, 5, 3), (2, 9, 3)]
    erased = 0
    for seed in range(150):
        shape = shapes[seed % len(shapes)]
        x = np.random.default_rng(10_000 + seed).standard_normal(shape).astype(np.float32)
        ours_rng, theirs_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        monkeypatch.setattr(ref_erasing, "random", ReplayRandom(theirs_rng))
        monkeypatch.setattr(ref_erasing, "_get_pixels", replay_pixels(theirs_rng))
        theirs = erasing(torch.from_numpy(x.transpose(2, 0, 1).copy())).numpy()
        ours = augment.random_erasing(x, ours_rng, prob=prob)
        np.testing.assert_array_equal(ours, theirs.transpose(1, 2, 0))
        assert ours_rng.random() == theirs_rng.random()
        erased += not np.array_equal(ours, x)
    assert erased > 20


def test_random_erasing_parameters_are_deits(ref_erasing):
    deit = ref_erasing.RandomErasing(0.25, mode="pixel", max_count=1, device="cpu")
    defaults = inspect.signature(augment.random_erasing).parameters
    assert augment.AugmentOptions().random_erasing == deit.probability == 0.25
    assert defaults["area"].default == (deit.min_area, deit.max_area) == (0.02, 1 / 3)
    assert np.allclose(np.log(defaults["ratio"].default), deit.log_aspect_ratio)
    assert deit.per_pixel and deit.min_count == deit.max_count == 1


def test_random_erasing_statistics():
    rng = np.random.default_rng(0)
    height, width = 40, 56
    boxes, values = [], []
    for _ in range(4000):
        x = augment.random_erasing(np.zeros((height, width, 3), np.float32), rng, prob=0.25)
        mask = (x != 0).any(-1)
        if not mask.any():
            continue
        rows, cols = np.nonzero(mask)
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert mask.sum() == h * w  # one filled rectangle
        boxes.append((h, w))
        values.append(x[mask])
    # Probability 0.25: 1000 +- 27 of 4000.
    assert 900 < len(boxes) < 1100
    h, w = np.array(boxes, float).T
    area = h * w / (height * width)
    # Area fraction uniform in [0.02, 1/3] before rounding h and w to pixels.
    assert area.min() > 0.02 * 0.7 and area.max() < 1 / 3 * 1.3
    assert abs(np.median(area) - (0.02 + 1 / 3) / 2) < 0.03
    # Aspect h/w log-uniform in [0.3, 1/0.3]: symmetric about 1 in log.
    log_aspect = np.log(h / w)
    assert log_aspect.min() > math.log(0.3) - 0.4 and log_aspect.max() < -math.log(0.3) + 0.4
    assert abs(np.median(log_aspect)) < 0.1
    assert (log_aspect < math.log(0.5)).mean() > 0.1 and (log_aspect > math.log(2)).mean() > 0.1
    # Per-pixel, per-channel N(0, 1).
    pixels = np.concatenate(values)
    assert abs(pixels.mean()) < 0.01 and abs(pixels.std() - 1) < 0.01
    assert np.abs(np.corrcoef(pixels.T) - np.eye(3)).max() < 0.02
    x = np.zeros((8, 8, 3), np.float32)
    assert augment.random_erasing(x, np.random.default_rng(0), prob=0.0) is x
