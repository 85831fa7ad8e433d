"""The synthetic world as a TFDS dataset (array_record), and its segmentation-eval reader.

One dataset per world config, in `<data_dir>/synthetic_world/<config name>/<version>/`, with
splits train / validation / test. Every split has the same features (TFDS builders have one
feature dict): image (PNG), label (PNG, uint8 mask: 0 background, c = class c), caption, words,
id. Training reads image/caption/words; evaluation reads image/label/id through
`SyntheticSegmentation`. The class names and the world config are in the dataset's metadata.

The config name is a readable summary plus a hash of every WorldConfig field, so changing any
parameter prepares a new dataset beside the old one, and an existing one is reused as is.
Training prepares its world on first use (`prepare_synthetic_world`); the program

    python -m mixreorg_jax.prepare_synthetic --data_dir DIR [--image_size 48 --train_size 1000]

prepares one ahead of time.

Measured on the 2 CPU cores shared with other jobs (load average ~2.5), `--num_workers 2`: the
default dataset (50,000 + 1,000 + 1,000 examples, 581 MB) took 62 s wall and 86 s of CPU over
the parent (TFDS serialisation and writing, ~0.5 ms per example) and the two workers
(generation and PNG, ~1.2 ms per example); peak memory 0.74 GB, about the data's size (TFDS's writer
appears to hold a split in memory: mind this for much larger splits). Reusing a prepared dataset takes milliseconds.
"""

import dataclasses
import hashlib
import json
import multiprocessing
import os
import struct
import zlib

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from mixreorg_jax.data import synthetic

DATASET_NAME = "synthetic_world"
DATASET_VERSION = "1.0.0"
SPLITS = ("train", "validation", "test")
# Below this many examples a worker pool costs more to start than it saves.
_MIN_EXAMPLES_PER_WORKER = 2_000
_CHUNK = 500


def config_name(world: synthetic.WorldConfig) -> str:
    """Readable summary + a hash of every field, e.g. 's64_c8_o1-3_seed0_1a2b3c4d'."""
    fields = json.dumps(dataclasses.asdict(world), sort_keys=True)
    digest = hashlib.sha256(fields.encode()).hexdigest()[:8]
    return (
        f"s{world.image_size}_c{world.num_classes}_o{world.min_objects}-{world.max_objects}"
        f"_seed{world.seed}_{digest}"
    )


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bytes(array: np.ndarray, compress_level: int) -> bytes:
    """uint8[H, W] or [H, W, 3] -> PNG bytes (no row filters), decodable by any PNG reader.

    Written by hand because PIL's encoder costs ~10x more per 64 px image than the generation;
    noisy images hardly compress, so images are stored (level 0) and masks compressed (level 1).
    """
    if (
        array.dtype != np.uint8
        or array.ndim not in (2, 3)
        or array.ndim == 3
        and array.shape[2] != 3
    ):
        raise ValueError(f"Expected uint8[H, W] or uint8[H, W, 3], got {array.dtype}{array.shape}")
    height, width = array.shape[:2]
    rows = np.zeros((height, 1 + array[0].size), np.uint8)  # a leading 0 per row: filter "none"
    rows[:, 1:] = array.reshape(height, -1)
    colour_type = 0 if array.ndim == 2 else 2  # greyscale or RGB, 8 bits per sample
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level))
        + _png_chunk(b"IEND", b"")
    )


def encoded_examples(split: str, start: int, stop: int, world: synthetic.WorldConfig):
    """[(key, features dict)] for examples start..stop-1 of a split, images PNG-encoded."""
    out = []
    for index in range(start, stop):
        example = synthetic.generate_example(index, split, world)
        out.append(
            (
                index,
                dict(
                    image=png_bytes(example["image"], 0),
                    label=png_bytes(example["mask"], 1),
                    caption=example["caption"],
                    words=example["words"],
                    id=f"{split}_{index:06d}",
                ),
            )
        )
    return out


def _encoded_chunk(args):
    return encoded_examples(*args)


class SyntheticWorldConfig(tfds.core.BuilderConfig):
    """A BuilderConfig holding the WorldConfig; its name changes with any field."""

    def __init__(self, world: synthetic.WorldConfig | None = None):
        world = world or synthetic.WorldConfig()
        super().__init__(
            name=config_name(world),
            version=DATASET_VERSION,
            description=json.dumps(dataclasses.asdict(world), sort_keys=True),
        )
        self.world = world


class SyntheticWorld(tfds.core.GeneratorBasedBuilder):
    """Shapes on textured backgrounds with captions and exact masks (see `synthetic`)."""

    name = DATASET_NAME
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "First version."}
    BUILDER_CONFIGS = [SyntheticWorldConfig()]

    def __init__(self, *, num_workers: int = 1, **kwargs):
        super().__init__(**kwargs)
        self._num_workers = num_workers

    def _info(self) -> tfds.core.DatasetInfo:
        world = self.builder_config.world
        size = world.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "label": tfds.features.Image(
                        shape=(size, size, 1), encoding_format="png", use_colormap=True
                    ),
                    "caption": tfds.features.Text(),
                    "words": tfds.features.Sequence(tfds.features.Text()),
                    "id": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(
                class_names=synthetic.class_names(world), world=dataclasses.asdict(world)
            ),
            # Stored in index order: record i of a split is generate_example(i, split).
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        world = self.builder_config.world
        return {
            split: self._generate_examples(split) for split in SPLITS if world.split_size(split) > 0
        }

    def _generate_examples(self, split: str):
        world = self.builder_config.world
        size = world.split_size(split)
        chunks = [
            (split, start, min(start + _CHUNK, size), world) for start in range(0, size, _CHUNK)
        ]
        workers = min(self._num_workers, max(1, size // _MIN_EXAMPLES_PER_WORKER))
        if workers <= 1:
            for chunk in chunks:
                yield from _encoded_chunk(chunk)
            return
        # spawn, not fork: the parent may hold TensorFlow/JAX threads that fork would break.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for encoded in pool.imap(_encoded_chunk, chunks):
                yield from encoded


def world_config(**overrides) -> synthetic.WorldConfig:
    """WorldConfig with overrides; an unknown field is an error naming it and the known ones."""
    known = {f.name for f in dataclasses.fields(synthetic.WorldConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"Unknown synthetic world parameter(s) {unknown}; known: {sorted(known)}")
    return synthetic.WorldConfig(**overrides)


def prepare_synthetic(data_dir: str, num_workers: int | None = None, **overrides) -> str:
    """Prepares the world's dataset once and returns its directory (for builder_from_directory).

    An existing dataset with the same config is reused; any changed field gives a new config name.
    num_workers: processes generating examples (default: all CPUs); never changes the result.
    """
    world = world_config(**overrides)
    # TFDS insists on the class's own object when a config has a predefined config's name.
    config = SyntheticWorld.builder_configs.get(config_name(world)) or SyntheticWorldConfig(world)
    builder = SyntheticWorld(
        data_dir=data_dir,
        config=config,
        file_format="array_record",
        num_workers=num_workers or os.cpu_count() or 1,
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP
        )
    )
    return os.fspath(builder.data_dir)


def prepare_synthetic_world(data_config) -> str:
    """The built-in world's dataset directory, prepared on first use (process 0 first).

    Uses `data_config.synthetic_dir` and the world overrides in `data_config.synthetic_world`.
    """
    data_dir = os.path.expanduser(str(data_config.get("synthetic_dir", "")))
    if not data_dir:
        raise ValueError('config.data.dir="synthetic" needs config.data.synthetic_dir')
    world = dict(data_config.get("synthetic_world", None) or {})
    if jax.process_index() == 0:
        path = prepare_synthetic(data_dir, **world)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("synthetic world prepared")
        if jax.process_index() > 0:  # Now only finds what process 0 wrote.
            path = prepare_synthetic(data_dir, **world)
    return path


def _dataset_dir(data_dir: str, overrides: dict) -> str:
    if os.path.exists(os.path.join(data_dir, "dataset_info.json")):
        if overrides:
            raise ValueError(
                f"{data_dir} is a prepared dataset; world overrides {sorted(overrides)} "
                "only apply to a root data_dir"
            )
        return data_dir
    return prepare_synthetic(data_dir, **overrides)


class SyntheticSegmentation:
    """A split of the world as a segmentation benchmark (grain RandomAccessDataSource protocol).

    data_dir: a dataset directory returned by `prepare_synthetic`, or a root data_dir, in which case
    the world given by `overrides` is prepared there (or reused) first.
    Items: dict(image=uint8[S, S, 3], label=uint8[S, S] (0 background, c = class_names[c]), id=str).
    """

    has_background = True

    def __init__(self, data_dir: str, split: str = "test", **overrides):
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; known: {list(SPLITS)}")
        builder = tfds.builder_from_directory(_dataset_dir(data_dir, overrides))
        if split not in builder.info.splits:
            raise ValueError(f"{builder.data_dir} has no {split!r} split (size 0 in its config)")
        self.class_names = list(builder.info.metadata["class_names"])
        self.world = synthetic.WorldConfig(**builder.info.metadata["world"])
        self._source = builder.as_data_source(split)
        self.split = split

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        example = self._source[index]
        identifier = example["id"]
        return dict(
            image=example["image"],
            label=example["label"][..., 0],
            id=identifier.decode() if isinstance(identifier, bytes) else str(identifier),
        )

    def __repr__(self) -> str:
        return f"SyntheticSegmentation(split={self.split!r}, n={len(self)}, world={self.world})"
