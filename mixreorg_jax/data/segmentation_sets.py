"""Readers for the zero-shot segmentation evaluation sets, from their standard on-disk layouts.

The layouts are mmsegmentation's (the ones GroupViT's released evaluation reads), under one data
root, e.g. GroupViT's `local_data/`:

    VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/val.txt}
    VOCdevkit/VOC2010/{JPEGImages, SegmentationClassContext, ImageSets/SegmentationContext/val.txt}
        (mmseg's tools/convert_datasets/pascal_context.py: 0 = background, 1..59 the classes)
    coco/{images/val2017/*.jpg, annotations/val2017/*_instanceTrainIds.png}
        (GroupViT's convert_dataset/convert_coco_object.py: 0 = background, 1..80 COCO's things)
    ADEChallengeData2016/{images/validation/*.jpg, annotations/validation/*.png}

`data_dir` may be that root or the set's own folder (e.g. `.../VOCdevkit/VOC2012`). Sets with a split
file keep its order; the others are sorted by file name, as mmseg's `CustomDataset` lists them.

Every set follows the agreed example format: dict(image=uint8[H, W, 3] RGB, label=uint8[H, W],
id=str), with 255 = ignore and, where the set has one, 0 = background. Sets without background
(`context59`, `ade20k`) use mmseg's `reduce_zero_label`: file label 0 -> 255, k -> k - 1.

Class names are those of the released evaluation (they are what the text encoder reads). Its
protocol defaults per set are in `DATASET_DEFAULTS`; the synthetic world has no fixed background
threshold (it is chosen on its validation split, docs/method.md section 5), so it has no entry there.
"""

import dataclasses
import os
from typing import Any

import numpy as np
from PIL import Image

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "table",
    "dog",
    "horse",
    "motorbike",
    "person",
    "plant",
    "sheep",
    "sofa",
    "train",
    "monitor",
)

# The 59 PASCAL Context classes in the converted masks' label order (1..59), alphabetical by their
# original names, with the released evaluation's renames (airplane, plant, table, monitor).
CONTEXT59_CLASSES = (
    "airplane",
    "bag",
    "bed",
    "bedclothes",
    "bench",
    "bicycle",
    "bird",
    "boat",
    "book",
    "bottle",
    "building",
    "bus",
    "cabinet",
    "car",
    "cat",
    "ceiling",
    "chair",
    "cloth",
    "computer",
    "cow",
    "cup",
    "curtain",
    "dog",
    "door",
    "fence",
    "floor",
    "flower",
    "food",
    "grass",
    "ground",
    "horse",
    "keyboard",
    "light",
    "motorbike",
    "mountain",
    "mouse",
    "person",
    "plate",
    "platform",
    "plant",
    "road",
    "rock",
    "sheep",
    "shelves",
    "sidewalk",
    "sign",
    "sky",
    "snow",
    "sofa",
    "table",
    "track",
    "train",
    "tree",
    "truck",
    "monitor",
    "wall",
    "water",
    "window",
    "wood",
)

COCO_OBJECT_CLASSES = (
    "background",
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)

# mmseg's ADE20K names (its 'bed ' without the stray space, which CLIP's tokenizer drops anyway).
ADE20K_CLASSES = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)

# The released evaluation's background thresholds (segmentation/configs/_base_/datasets/*.py);
# None: the set has no background. Resize and sliding-window settings are the same for all
# (`mixreorg_jax.ops.segmentation.segment_image` defaults).
DATASET_DEFAULTS = {
    "voc": dict(bg_thresh=0.95),
    "context60": dict(bg_thresh=0.35),
    "context59": dict(bg_thresh=None),
    "coco_object": dict(bg_thresh=0.95),
    "ade20k": dict(bg_thresh=None),
}

IGNORE_LABEL = 255


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where one set lives under the data root and how its files are named."""

    root: str  # the set's folder relative to the data root
    image_dir: str  # relative to root; may contain {split}
    label_dir: str
    label_suffix: str  # label file = image stem + label_suffix
    split_file: str | None  # relative to root; None: every *.jpg of image_dir, sorted
    split_dirs: dict[str, str] | None = None  # split name -> folder name, for {split}


_VOC = _Layout(
    "VOCdevkit/VOC2012",
    "JPEGImages",
    "SegmentationClass",
    ".png",
    "ImageSets/Segmentation/{split}.txt",
)
_CONTEXT = _Layout(
    "VOCdevkit/VOC2010",
    "JPEGImages",
    "SegmentationClassContext",
    ".png",
    "ImageSets/SegmentationContext/{split}.txt",
)
_COCO_OBJECT = _Layout(
    "coco",
    "images/{split}",
    "annotations/{split}",
    "_instanceTrainIds.png",
    None,
    {"train": "train2017", "val": "val2017"},
)
_ADE20K = _Layout(
    "ADEChallengeData2016",
    "images/{split}",
    "annotations/{split}",
    ".png",
    None,
    {"train": "training", "val": "validation"},
)


class SegmentationSet:
    """A folder of images and index-label PNGs; grain RandomAccessDataSource protocol.

    Attributes:
        class_names: list[str], index = label value (0 = 'background' when `has_background`).
        has_background: whether label 0 is background.
        ids: list[str] of the examples' ids (file stems), in order.
    """

    def __init__(
        self,
        name: str,
        ids: list[str],
        image_paths: list[str],
        label_paths: list[str],
        class_names: tuple[str, ...],
        has_background: bool,
        reduce_zero_label: bool,
    ):
        self.name = name
        self.ids = list(ids)
        self._image_paths = list(image_paths)
        self._label_paths = list(label_paths)
        self.class_names = list(class_names)
        self.has_background = has_background
        self._reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} examples.")
        with Image.open(self._image_paths[index]) as image_file:
            image = np.asarray(image_file.convert("RGB"), np.uint8)
        label = read_label_png(self._label_paths[index])
        if self._reduce_zero_label:
            label = reduce_zero_label(label)
        if label.shape != image.shape[:2]:
            raise ValueError(
                f"{self.name} example {self.ids[index]!r}: image {image.shape[:2]} and "
                f"label {label.shape} differ in size ({self._image_paths[index]})."
            )
        return dict(image=image, label=label, id=self.ids[index])

    def __repr__(self) -> str:
        return (
            f"SegmentationSet({self.name!r}, {len(self)} examples, {len(self.class_names)} "
            f"classes, has_background={self.has_background})"
        )


def read_label_png(path: str) -> np.ndarray:
    """uint8[H, W] label indices of a palette ('P') or grayscale ('L') PNG."""
    with Image.open(path) as label_file:
        if label_file.mode not in ("P", "L"):
            raise ValueError(
                f"{path}: expected an index (palette or 8-bit grayscale) PNG, got mode "
                f"{label_file.mode!r}; colour-coded masks must be converted first."
            )
        return np.array(label_file, np.uint8)  # A palette PNG reads as its indices.


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's `reduce_zero_label`: 0 (unlabelled / background) -> 255, k -> k - 1, 255 kept."""
    return np.where((label == 0) | (label == IGNORE_LABEL), IGNORE_LABEL, label - 1).astype(
        np.uint8
    )


def _set_root(data_dir: str, layout: _Layout, split_dir: str) -> str:
    """The set's folder: `data_dir/<layout.root>`, or `data_dir` itself if it is that folder."""
    for candidate in (os.path.join(data_dir, layout.root), data_dir):
        if os.path.isdir(os.path.join(candidate, layout.image_dir.format(split=split_dir))):
            return candidate
    expected = os.path.join(data_dir, layout.root, layout.image_dir.format(split=split_dir))
    raise FileNotFoundError(
        f"Image folder not found: expected {expected} (data_dir may also be "
        f"the {layout.root} folder itself)."
    )


def _folder_set(
    name: str,
    data_dir: str,
    split: str,
    layout: _Layout,
    class_names: tuple[str, ...],
    has_background: bool,
    reduce_zero: bool,
) -> SegmentationSet:
    if layout.split_dirs is not None:
        if split not in layout.split_dirs:
            raise ValueError(
                f"{name}: unknown split {split!r}; known: {sorted(layout.split_dirs)}."
            )
        split_dir = layout.split_dirs[split]
    else:
        split_dir = split
    root = _set_root(data_dir, layout, split_dir)
    image_dir = os.path.join(root, layout.image_dir.format(split=split_dir))
    label_dir = os.path.join(root, layout.label_dir.format(split=split_dir))
    if not os.path.isdir(label_dir):
        raise FileNotFoundError(f"{name}: label folder not found: expected {label_dir}.")
    if layout.split_file is not None:
        split_path = os.path.join(root, layout.split_file.format(split=split))
        if not os.path.isfile(split_path):
            raise FileNotFoundError(f"{name}: split file not found: expected {split_path}.")
        with open(split_path) as f:
            ids = [line.strip() for line in f if line.strip()]
    else:
        ids = sorted(os.path.splitext(f)[0] for f in os.listdir(image_dir) if f.endswith(".jpg"))
    if not ids:
        raise FileNotFoundError(f"{name}: no examples listed for split {split!r} in {root}.")
    image_paths = [os.path.join(image_dir, i + ".jpg") for i in ids]
    label_paths = [os.path.join(label_dir, i + layout.label_suffix) for i in ids]
    for kind, paths in (("image", image_paths), ("label", label_paths)):
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{name}: {len(missing)} of {len(paths)} {kind} files are "
                f"missing, e.g. {missing[0]}."
            )
    return SegmentationSet(
        name, ids, image_paths, label_paths, class_names, has_background, reduce_zero
    )


def pascal_voc(data_dir: str, split: str = "val") -> SegmentationSet:
    """PASCAL VOC 2012: 20 classes + background (label 0); 255 marks object borders (ignored)."""
    return _folder_set("voc", data_dir, split, _VOC, VOC_CLASSES, True, False)


def pascal_context(
    data_dir: str, split: str = "val", with_background: bool = True
) -> SegmentationSet:
    """PASCAL Context from mmseg's converted masks.

    with_background=True ('context60', the released evaluation): background + 59 classes, labels
    as in the files. False ('context59', mmseg's PascalContextDataset59): 59 classes, background
    pixels ignored.
    """
    if with_background:
        return _folder_set(
            "context60", data_dir, split, _CONTEXT, ("background",) + CONTEXT59_CLASSES, True, False
        )
    return _folder_set("context59", data_dir, split, _CONTEXT, CONTEXT59_CLASSES, False, True)


def coco_object(data_dir: str, split: str = "val") -> SegmentationSet:
    """COCO-Object: background (incl. stuff and unlabelled pixels) + COCO's 80 thing classes."""
    return _folder_set(
        "coco_object", data_dir, split, _COCO_OBJECT, COCO_OBJECT_CLASSES, True, False
    )


def ade20k(data_dir: str, split: str = "val") -> SegmentationSet:
    """ADE20K (SceneParsing, 150 classes, no background): 'other' pixels (file label 0) ignored."""
    return _folder_set("ade20k", data_dir, split, _ADE20K, ADE20K_CLASSES, False, True)


def _synthetic(data_dir: str, split: str):
    """The synthetic world's eval split; 'val' (this factory's default) names its 'validation'."""
    # Imported here so that the real-set readers need nothing of the synthetic world's builder.
    from mixreorg_jax.data.synthetic_tfds import SyntheticSegmentation

    return SyntheticSegmentation(data_dir, "validation" if split == "val" else split)


_FACTORIES = {
    "voc": pascal_voc,
    "context60": lambda data_dir, split: pascal_context(data_dir, split, with_background=True),
    "context59": lambda data_dir, split: pascal_context(data_dir, split, with_background=False),
    "coco_object": coco_object,
    "ade20k": ade20k,
    "synthetic": _synthetic,
}
DATASET_NAMES = tuple(_FACTORIES)


def get_segmentation_dataset(name: str, data_dir: str, split: str = "val"):
    """The evaluation set `name` (one of `DATASET_NAMES`) read from `data_dir`."""
    if name not in _FACTORIES:
        raise ValueError(
            f"Unknown segmentation dataset {name!r}; known: {', '.join(DATASET_NAMES)}."
        )
    return _FACTORIES[name](data_dir, split)
