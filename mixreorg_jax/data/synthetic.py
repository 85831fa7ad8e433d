"""The built-in synthetic world: shapes on textured backgrounds, with captions and masks.

Every example is a pure function of (config, split, index): `generate_example` draws everything
from `np.random.default_rng([seed, split_id, index])`, so any example can be regenerated bit for
bit, in any order (float rounding in numpy's kernels could differ on another CPU family), and the
splits never share a random stream.

The world is built so that segmentation has to come from SHAPE:
- Each object's class is one of `num_classes` shapes (circle, square, triangle, star, ...),
  drawn uniformly. Its colour is drawn uniformly from a shared palette, and its texture (flat,
  stripes, dots, gradient) from a fixed distribution, both independently of the class, so colour
  and texture carry no information about the class (tests check the mutual information).
- Backgrounds are blotchy, gradient, striped or plain noise, painted in two colours of the SAME
  palette (objects avoid those two colours so they stay visible), dimmed by
  `background_dimming`, plus pixel noise everywhere. Dimming makes most objects brighter than
  their surroundings, which a tiny model needs: with undimmed backgrounds the sign of every
  object edge is random, so no first-order image statistic depends on the class, and a probe
  (a 4-block, width-64 ViT with 8 px patches, multi-label class presence, batch 32, AdamW 1e-3)
  stayed at the label prior for 600-1,000 steps, even with one large, flat, unrotated object per
  image. With dimming 0.6 it learns: top-1 predicted class present in 0.36-0.40 of test images
  after 900 steps on the default world (prior 0.225; 0.42-0.49 at 1,000-1,400 steps with
  `max_rotation=30`; 0.51 after 600 steps with one large flat object). The dimmed palette still
  overlaps the object colours (dimmed white is grey, dimmed yellow is brown).
- Objects are solid and large (radius 20-34% of the image side by default: 26-44 px across at
  64 px, 3-5 patches of 8 px), randomly rotated, 1-3 per image; a later object may occlude an
  earlier one, but never more than `max_occluded_fraction` of it, so every object named in the
  caption stays clearly visible; the mask is exact (hard edges, so no ignore pixels are needed).
  Objects cover about 30% of the pixels.
- Captions vary in phrasing (several frames, counts and plurals, colour words sometimes, relations
  such as "above" / "to the left of" computed from the objects' positions) and always name every
  object's class. `words` lists the singular shape nouns as written in the caption (the canonical
  class names unless `synonym_prob` > 0); `WORD_TO_CLASS` maps them back to class names.

Measured (default world: 64 px, 8 classes, 1-3 objects; the 2 CPU cores were shared with other
jobs, load average 4-5): generation runs at 830-910 examples/s in one process (1.1 ms of CPU per
example); PNG encoding adds ~0.1 ms. Preparing the default dataset (50,000 + 1,000 + 1,000) took
86 s of CPU in all, 62 s wall with 2 workers (see synthetic_tfds). The program
`python -m mixreorg_jax.experiments.world` re-measures the speed, and what the world allows: the
mIoU of a perfect patch labelling (the ceiling of patch-level segmentation), and how far a
classifier that sees only colour gets (about chance; its docstring has the numbers).
"""

import dataclasses
import functools
import math

import numpy as np

# Shapes in the order classes are assigned: class c (1-based) is SHAPE_NAMES[c - 1]. The first
# eight are the most distinct under rotation at low resolution; the rest are there for harder
# worlds (hexagon is close to circle, semicircle to crescent at 4-5 patches across).
SHAPE_NAMES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "heart",
    "crescent",
    "hexagon",
    "arrow",
    "semicircle",
    "rectangle",
)
# Alternative nouns a caption may use (with probability `synonym_prob`); eval uses the class names.
SYNONYMS = {
    "circle": "disc",
    "square": "box",
    "cross": "plus",
    "ring": "donut",
    "crescent": "moon",
    "rectangle": "bar",
}
WORD_TO_CLASS = {**{name: name for name in SHAPE_NAMES}, **{w: c for c, w in SYNONYMS.items()}}

# One palette shared by objects and backgrounds, so colour overlaps between them.
PALETTE = (
    ("red", (214, 39, 40)),
    ("orange", (245, 130, 20)),
    ("yellow", (240, 220, 40)),
    ("green", (44, 160, 44)),
    ("cyan", (40, 200, 210)),
    ("blue", (31, 80, 200)),
    ("purple", (130, 60, 180)),
    ("pink", (240, 130, 190)),
    ("brown", (130, 80, 40)),
    ("white", (240, 240, 240)),
    ("black", (25, 25, 25)),
    ("gray", (128, 128, 128)),
)
COLOUR_NAMES = tuple(name for name, _ in PALETTE)
_PALETTE_RGB = np.array([rgb for _, rgb in PALETTE], np.float32)

TEXTURES = ("flat", "stripes", "dots", "gradient")
# With `class_texture_prob` > 0, objects may wear their class's signature pattern instead (class c
# wears CLASS_TEXTURES[(c - 1) % 8]): fixed in the image frame, so it does not turn with the shape,
# with a period of `image_size / 8` pixels (two patches of 4 px at 32 px).
CLASS_TEXTURES = (
    "hstripes",
    "vstripes",
    "dstripes",
    "astripes",
    "checks",
    "spots",
    "solid",
    "grid",
)
BACKGROUND_STYLES = ("blotches", "gradient", "stripes", "noise")
_BACKGROUND_WORDS = {
    "blotches": ("blotchy", "mottled", "textured"),
    "gradient": ("gradient", "smooth", "shaded"),
    "stripes": ("striped", "textured", "patterned"),
    "noise": ("noisy", "grainy", "speckled"),
}
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Parameters of the world. Split sizes only matter to the prepared dataset."""

    image_size: int = 64
    num_classes: int = 8
    min_objects: int = 1
    max_objects: int = 3
    # Object radius as a fraction of the image side (shapes span about 2 radii).
    min_scale: float = 0.2
    max_scale: float = 0.34
    # Objects are rotated by an angle drawn uniformly from [-max_rotation, max_rotation] degrees.
    max_rotation: float = 180.0
    # A new object may hide at most this fraction of any earlier object.
    max_occluded_fraction: float = 0.3
    texture_prob: float = 0.5  # probability that an object is striped/dotted/gradient, not flat
    # Probability that an object wears its class's signature pattern (CLASS_TEXTURES), a cue a
    # single patch shows; otherwise its texture is drawn as above, independently of the class.
    class_texture_prob: float = 0.0
    colour_word_prob: float = 0.4  # probability that a caption names an object's colour
    relation_prob: float = 0.4  # probability of "A above B" etc. when two single objects exist
    synonym_prob: float = 0.0  # probability that a caption uses a shape's synonym
    noise_std: float = 14.0  # pixel noise on the 0-255 scale, everywhere
    # Background colours are the palette's scaled by (1 - background_dimming).
    background_dimming: float = 0.6
    seed: int = 0
    train_size: int = 50_000
    validation_size: int = 1_000
    test_size: int = 1_000

    def __post_init__(self):
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [16, 1024], got {self.image_size}")
        if not 1 <= self.num_classes <= len(SHAPE_NAMES):
            raise ValueError(
                f"num_classes must be in [1, {len(SHAPE_NAMES)}], got {self.num_classes}"
            )
        if not 1 <= self.min_objects <= self.max_objects <= 6:
            raise ValueError(
                "need 1 <= min_objects <= max_objects <= 6, got "
                f"{self.min_objects}, {self.max_objects}"
            )
        if not 0.03 <= self.min_scale <= self.max_scale <= 0.45:
            raise ValueError(
                "need 0.03 <= min_scale <= max_scale <= 0.45, got "
                f"{self.min_scale}, {self.max_scale}"
            )
        if not 0 <= self.max_rotation <= 180:
            raise ValueError(f"max_rotation must be in [0, 180] degrees, got {self.max_rotation}")
        if not 0 <= self.background_dimming < 1:
            raise ValueError(f"background_dimming must be in [0, 1), got {self.background_dimming}")
        if not 0 <= self.max_occluded_fraction < 1:
            raise ValueError(
                f"max_occluded_fraction must be in [0, 1), got {self.max_occluded_fraction}"
            )
        for name in (
            "texture_prob",
            "class_texture_prob",
            "colour_word_prob",
            "relation_prob",
            "synonym_prob",
        ):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("train_size", "validation_size", "test_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def split_size(self, split: str) -> int:
        _check_split(split)
        return getattr(self, f"{split}_size")


def class_names(config: WorldConfig) -> list[str]:
    """Label value -> name; 0 is 'background'."""
    return ["background", *SHAPE_NAMES[: config.num_classes]]


CLASS_NAMES = class_names(WorldConfig())


def _check_split(split: str):
    if split not in SPLIT_IDS:
        raise ValueError(f"Unknown split {split!r}; known: {sorted(SPLIT_IDS)}")


# ---------------------------------------------------------------------------------------------
# Shapes: boolean functions of local coordinates (u, v), in units of the object's radius.
# ---------------------------------------------------------------------------------------------
def _regular_polygon(num_sides: int, radius: float, phase: float = -np.pi / 2) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(num_sides) / num_sides
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star_polygon(num_points: int, outer: float, inner: float) -> np.ndarray:
    angles = -np.pi / 2 + np.pi * np.arange(2 * num_points) / num_points
    radii = np.where(np.arange(2 * num_points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_TRIANGLE = _regular_polygon(3, 1.2) + np.array([0.0, 0.1])  # centred on its bounding box
_STAR = _star_polygon(5, 1.15, 0.6)
_HEXAGON = _regular_polygon(6, 1.0)
_ARROW = np.array(
    [
        [-1.0, -0.28],
        [0.15, -0.28],
        [0.15, -0.7],
        [1.05, 0.0],
        [0.15, 0.7],
        [0.15, 0.28],
        [-1.0, 0.28],
    ]
)


def _polygon_edges(vertices: np.ndarray) -> tuple[np.ndarray, ...]:
    """float[V, 2] -> (x0, y0, y1, dx/dy), each float32[V, 1]: the edges the even-odd rule needs."""
    x0, y0 = vertices[:, 0], vertices[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    flat = y1 == y0  # horizontal edges never cross a scanline; any slope will do
    slope = (x1 - x0) / np.where(flat, 1, y1 - y0)
    return tuple(a.astype(np.float32)[:, None] for a in (x0, y0, y1, slope))


def _inside_polygon(u: np.ndarray, v: np.ndarray, edges) -> np.ndarray:
    """Even-odd rule. u, v: float32[...]; edges from `_polygon_edges` -> bool[...]."""
    x0, y0, y1, slope = edges
    pu, pv = u.reshape(1, -1), v.reshape(1, -1)
    crosses = (y0 > pv) != (y1 > pv)
    inside = np.logical_xor.reduce(crosses & (pu < x0 + (pv - y0) * slope), axis=0)
    return inside.reshape(u.shape)


_TRIANGLE_EDGES, _STAR_EDGES, _HEXAGON_EDGES, _ARROW_EDGES = (
    _polygon_edges(p) for p in (_TRIANGLE, _STAR, _HEXAGON, _ARROW)
)


def _heart(u, v):
    # The classic implicit heart (x^2 + y^2 - 1)^3 <= x^2 y^3, with y pointing up, centred.
    x, y = u * 1.2, -v * 1.2 + 0.15
    return (x * x + y * y - 1) ** 3 <= x * x * y**3


_SHAPE_FNS = {
    "circle": lambda u, v: u * u + v * v <= 0.95**2,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.82,
    "triangle": lambda u, v: _inside_polygon(u, v, _TRIANGLE_EDGES),
    "star": lambda u, v: _inside_polygon(u, v, _STAR_EDGES),
    "cross": lambda u, v: (
        ((np.abs(u) <= 0.36) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.36) & (np.abs(u) <= 1.0))
    ),
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.45**2),
    "heart": _heart,
    "crescent": lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.55) ** 2 + v * v >= 0.75**2),
    "hexagon": lambda u, v: _inside_polygon(u, v, _HEXAGON_EDGES),
    "arrow": lambda u, v: _inside_polygon(u, v, _ARROW_EDGES),
    "semicircle": lambda u, v: (u * u + (v + 0.4) ** 2 <= 1.05**2) & (v <= 0.4),
    "rectangle": lambda u, v: (np.abs(u) <= 1.05) & (np.abs(v) <= 0.45),
}
# Every shape lies within this radius (in units of the object's radius) of its centre.
_SHAPE_EXTENT = 1.2


# ---------------------------------------------------------------------------------------------
# Painting.
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _bilinear_upsampling_matrix(size: int, coarse: int) -> np.ndarray:
    """float32[size, coarse]: rows interpolate a coarse grid spanning the image."""
    positions = (np.arange(size) + 0.5) / size * (coarse - 1)
    left = np.clip(np.floor(positions).astype(int), 0, coarse - 2)
    frac = positions - left
    matrix = np.zeros((size, coarse), np.float32)
    matrix[np.arange(size), left] = 1 - frac
    matrix[np.arange(size), left + 1] += frac
    return matrix


@functools.lru_cache(maxsize=16)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y), each float32[size, size]: pixel-centre coordinates."""
    centres = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(centres, centres)


def _jittered(rng, rgb: np.ndarray, amount: float = 18.0) -> np.ndarray:
    # Not clipped: the final image is, and the palette keeps 20 levels from 0 and 255 anyway.
    return rgb + rng.uniform(-amount, amount, 3).astype(np.float32)


def _second_shade(rgb: np.ndarray) -> np.ndarray:
    """A lighter (for dark colours) or darker shade of the same hue, for textures."""
    if rgb.mean() < 100:
        return rgb + (255 - rgb) * 0.4
    return rgb * 0.6


def _paint_background(rng, size: int, colour_ids, dimming: float) -> tuple[np.ndarray, str]:
    """Returns (float32[3, size, size] canvas, style name). Channel-first keeps numpy's loops long."""
    style = BACKGROUND_STYLES[rng.integers(len(BACKGROUND_STYLES))]
    first, second = (_jittered(rng, _PALETTE_RGB[c]) * np.float32(1 - dimming) for c in colour_ids)
    x, y = _pixel_centres(size)
    if style == "blotches":
        coarse = int(rng.integers(3, 7))
        upsample = _bilinear_upsampling_matrix(size, coarse)
        field = upsample @ rng.random((coarse, coarse), dtype=np.float32) @ upsample.T
        weight = ((field - 0.5) * 3 + 0.5).clip(0, 1)
    elif style == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        cos, sin = math.cos(angle) / size, math.sin(angle) / size
        weight = (cos * x + sin * y + (0.5 - (cos + sin) * size / 2)).clip(0, 1)
    elif style == "stripes":
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.08, 0.25) * size
        phase = (math.cos(angle) / period) * x + (math.sin(angle) / period) * y
        # Faint stripes: the second colour is only half mixed in, so they read as texture.
        weight = np.where(phase % 1 < 0.5, np.float32(0.5), np.float32(0))
    else:
        weight = np.full((size, size), rng.uniform(0, 0.5), np.float32)
    canvas = first[:, None, None] + (second - first)[:, None, None] * weight[None]
    return canvas, style


def _two_shades(rgb: np.ndarray, shade: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Pixels [3, N] blending `rgb` into `shade` by weight[N] (0: rgb, 1: shade)."""
    return rgb[:, None] + (shade - rgb)[:, None] * weight[None]


def _object_texture(rng, texture: str, rgb: np.ndarray, u, v, radius: float) -> np.ndarray:
    """Colours of an object's pixels. u, v: float32[N] local coordinates -> float32[3, N]."""
    if texture == "flat":
        return np.broadcast_to(rgb[:, None], (3, u.size))
    shade = _second_shade(rgb)
    angle = rng.uniform(0, math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    along = cos * u + sin * v  # radius units
    if texture == "stripes":
        period = rng.uniform(5, 9) / radius  # pixels -> radius units
        weight = ((along / period) % 1 < 0.5).astype(np.float32)
    elif texture == "dots":
        spacing = rng.uniform(5, 8) / radius
        across = cos * v - sin * u
        du = (along / spacing) % 1 - 0.5
        dv = (across / spacing) % 1 - 0.5
        weight = (du * du + dv * dv <= 0.3**2).astype(np.float32)
    elif texture == "gradient":
        weight = ((along + 1) / 2).clip(0, 1)
    else:
        raise ValueError(f"Unknown texture {texture!r}")
    return _two_shades(rgb, shade, weight)


def _class_texture(rng, texture: str, rgb: np.ndarray, x, y, period: float) -> np.ndarray:
    """Colours of an object's pixels in its class's pattern. x, y: float32[N] image pixel centres."""
    if texture == "solid":
        return np.broadcast_to(rgb[:, None], (3, x.size))
    # A random phase, so the pattern carries no position.
    x, y = x / period + rng.random(), y / period + rng.random()
    stripes = {
        "hstripes": y,
        "vstripes": x,
        "dstripes": (x + y) / math.sqrt(2),
        "astripes": (x - y) / math.sqrt(2),
    }
    if texture in stripes:
        weight = stripes[texture] % 1 < 0.5
    elif texture == "checks":
        weight = (x % 1 < 0.5) ^ (y % 1 < 0.5)
    elif texture == "spots":
        weight = (x % 1 - 0.5) ** 2 + (y % 1 - 0.5) ** 2 <= 0.3**2
    elif texture == "grid":
        weight = (x % 1 < 0.3) | (y % 1 < 0.3)
    else:
        raise ValueError(f"Unknown class texture {texture!r}")
    return _two_shades(rgb, _second_shade(rgb), weight.astype(np.float32))


def _propose_object(rng, config: WorldConfig):
    """Random pose of one object -> (class_id, centre_xy, radius, angle)."""
    size = config.image_size
    class_id = int(rng.integers(1, config.num_classes + 1))
    radius = rng.uniform(config.min_scale, config.max_scale) * size
    # Centres keep at least ~80% of the shape inside the image.
    low, high = 0.7 * radius, size - 0.7 * radius
    centre = (rng.uniform(low, high), rng.uniform(low, high))
    angle = math.radians(rng.uniform(-config.max_rotation, config.max_rotation))
    return class_id, centre, radius, angle


def _rasterise(class_id: int, centre, radius: float, angle: float, size: int):
    """Draws one shape -> ((y0, y1, x0, x1) its box in the image, inside: bool[h, w],
    u, v: float32[h, w] the box's pixels in the shape's frame, in radius units)."""
    extent = _SHAPE_EXTENT * radius
    x0, x1 = max(0, int(centre[0] - extent)), min(size, int(centre[0] + extent) + 1)
    y0, y1 = max(0, int(centre[1] - extent)), min(size, int(centre[1] + extent) + 1)
    dx = np.arange(x0, x1, dtype=np.float32) + (0.5 - centre[0])  # pixel centres, one row
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + (0.5 - centre[1])
    cos, sin = math.cos(angle) / radius, math.sin(angle) / radius
    u = cos * dx + sin * dy
    v = cos * dy - sin * dx
    inside = _SHAPE_FNS[SHAPE_NAMES[class_id - 1]](u, v)
    return (y0, y1, x0, x1), inside, u, v


# ---------------------------------------------------------------------------------------------
# Captions.
# ---------------------------------------------------------------------------------------------
def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(rng, config, name: str, colour_ids: list[int]) -> tuple[str, str]:
    """Names a group of same-class objects -> (phrase, noun as written in singular)."""
    noun = SYNONYMS[name] if name in SYNONYMS and rng.random() < config.synonym_prob else name
    count = len(colour_ids)
    colour = ""
    if len(set(colour_ids)) == 1 and rng.random() < config.colour_word_prob:
        colour = COLOUR_NAMES[colour_ids[0]] + " "
    if count == 1:
        return _with_article(colour + noun), noun
    number = _NUMBER_WORDS[count] if count < len(_NUMBER_WORDS) else str(count)
    if count == 2 and rng.random() < 0.2:
        return f"a pair of {colour}{_plural(noun)}", noun
    return f"{number} {colour}{_plural(noun)}", noun


def _relation(rng, first_xy, second_xy, size: int) -> str:
    """How the first object sits relative to the second, from their centroids."""
    dx, dy = second_xy[0] - first_xy[0], second_xy[1] - first_xy[1]
    if rng.random() < 0.3 or max(abs(dx), abs(dy)) < 0.15 * size:
        return ("next to", "beside", "near")[rng.integers(3)]
    if abs(dy) >= abs(dx):
        return "above" if dy > 0 else "below"
    return "to the left of" if dx > 0 else "to the right of"


_FRAMES = (
    "{x}.",
    "a photo of {x}.",
    "an image of {x}.",
    "a picture of {x}.",
    "a drawing of {x}.",
    "{x} on a {bg} background.",
    "there {is} {x}.",
    "this picture shows {x}.",
    "{x} in the picture.",
    "a close-up of {x}.",
    "a rendering of {x} on a {bg} background.",
)


def _caption(rng, config: WorldConfig, objects: list[dict], background_style: str):
    """-> (caption, words). Names every object, grouped by class in painting order."""
    groups: dict[str, list[dict]] = {}
    for obj in objects:
        groups.setdefault(obj["class_name"], []).append(obj)
    members_in_order = list(groups.values())
    if len(members_in_order) > 1:  # captions need not follow the painting order
        members_in_order = [members_in_order[i] for i in rng.permutation(len(members_in_order))]
    phrases, words = [], []
    for members in members_in_order:
        phrase, noun = _noun_phrase(
            rng, config, members[0]["class_name"], [o["colour_id"] for o in members]
        )
        phrases.append(phrase)
        words.append(noun)  # one group per class, so one word per class
    if (
        len(phrases) == 2
        and all(len(m) == 1 for m in members_in_order)
        and rng.random() < config.relation_prob
    ):
        first, second = (m[0]["centroid"] for m in members_in_order)
        body = f"{phrases[0]} {_relation(rng, first, second, config.image_size)} {phrases[1]}"
    elif len(phrases) == 1:
        body = phrases[0]
    else:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    frame = _FRAMES[rng.integers(len(_FRAMES))]
    # "there is a star and a ring" (agreement with the first phrase, as people write it).
    verb = "are" if len(members_in_order[0]) > 1 else "is"
    background = _BACKGROUND_WORDS[background_style][rng.integers(3)]
    return frame.format(x=body, bg=background, **{"is": verb}), words


# ---------------------------------------------------------------------------------------------
# Examples.
# ---------------------------------------------------------------------------------------------
def generate_example(index: int, split: str, config: WorldConfig = WorldConfig()) -> dict:
    """One example, a pure function of (config, split, index).

    Returns dict(
      image=uint8[S, S, 3],
      mask=uint8[S, S] (0 background, c for class_names(config)[c]; no 255: edges are exact),
      caption=str, words=list[str] (singular shape nouns as written, in caption order of classes),
      objects=list of dict(class_id, class_name, colour_id, texture, centroid (x, y), pixels):
        the visible objects in painting order, for diagnostics).
    """
    _check_split(split)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([config.seed, SPLIT_IDS[split], index])
    size = config.image_size
    first = int(rng.integers(len(PALETTE)))
    background_colours = (first, (first + 1 + int(rng.integers(len(PALETTE) - 1))) % len(PALETTE))
    canvas, background_style = _paint_background(
        rng, size, background_colours, config.background_dimming
    )
    object_colours = [c for c in range(len(PALETTE)) if c not in background_colours]

    instance = np.zeros((size, size), np.int16)  # 1 + index of the placed object a pixel shows
    placed = []  # dict(class_id, colour_id, texture, area)
    visible = np.zeros(config.max_objects + 1, np.int64)  # visible pixels per instance
    num_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
    for _ in range(num_objects):
        for _attempt in range(20):
            class_id, centre, radius, angle = _propose_object(rng, config)
            (y0, y1, x0, x1), inside, u, v = _rasterise(class_id, centre, radius, angle, size)
            area = int(inside.sum())
            if area < 0.25 * np.pi * radius**2:
                continue  # mostly outside the image
            hidden = np.bincount(instance[y0:y1, x0:x1][inside], minlength=visible.size)
            if all(
                visible[i + 1] - hidden[i + 1] >= (1 - config.max_occluded_fraction) * o["area"]
                for i, o in enumerate(placed)
            ):
                break
        else:
            continue  # no room for this object: the caption will not name it
        colour_id = object_colours[rng.integers(len(object_colours))]
        # Drawn only when enabled, so worlds without class textures keep their random streams.
        if config.class_texture_prob and rng.random() < config.class_texture_prob:
            texture = CLASS_TEXTURES[(class_id - 1) % len(CLASS_TEXTURES)]
            rgb = _jittered(rng, _PALETTE_RGB[colour_id])
            ys, xs = np.nonzero(inside)
            canvas[:, y0:y1, x0:x1][:, inside] = _class_texture(
                rng,
                texture,
                rgb,
                (xs + x0 + 0.5).astype(np.float32),
                (ys + y0 + 0.5).astype(np.float32),
                size / 8,
            )
        else:
            textured = rng.random() < config.texture_prob
            texture = TEXTURES[1 + rng.integers(len(TEXTURES) - 1)] if textured else "flat"
            rgb = _jittered(rng, _PALETTE_RGB[colour_id])
            canvas[:, y0:y1, x0:x1][:, inside] = _object_texture(
                rng, texture, rgb, u[inside], v[inside], radius
            )
        instance[y0:y1, x0:x1][inside] = len(placed) + 1
        visible -= hidden
        visible[len(placed) + 1] = area
        placed.append(dict(class_id=class_id, colour_id=colour_id, texture=texture, area=area))

    # Uniform pixel noise: integer draws are several times cheaper than normal ones.
    scale = config.noise_std / 73.9  # std(U{0..255}) = 73.9
    canvas += rng.integers(0, 256, canvas.shape, dtype=np.uint8) * np.float32(scale)
    canvas += 0.5 - 127.5 * scale  # centre the noise; + 0.5 rounds in the cast below
    image = canvas.clip(0, 255).astype(np.uint8).transpose(1, 2, 0).copy()
    class_of_instance = np.array([0] + [o["class_id"] for o in placed], np.uint8)
    mask = class_of_instance[instance]

    x, y = _pixel_centres(size)
    flat_instance = instance.ravel()
    pixels = np.bincount(flat_instance, minlength=len(placed) + 1)
    sum_x = np.bincount(flat_instance, weights=x.ravel(), minlength=len(placed) + 1)
    sum_y = np.bincount(flat_instance, weights=y.ravel(), minlength=len(placed) + 1)
    objects = [
        dict(
            class_id=o["class_id"],
            class_name=SHAPE_NAMES[o["class_id"] - 1],
            colour_id=int(o["colour_id"]),
            texture=o["texture"],
            pixels=int(pixels[i + 1]),
            centroid=(sum_x[i + 1] / pixels[i + 1], sum_y[i + 1] / pixels[i + 1]),
        )
        for i, o in enumerate(placed)
    ]
    if objects:
        caption, words = _caption(rng, config, objects, background_style)
    else:  # every placement failed (possible only for crowded custom configs)
        caption, words = f"an empty {_BACKGROUND_WORDS[background_style][0]} background.", []
    return dict(image=image, mask=mask, caption=caption, words=words, objects=objects)
