"""The training input pipeline: prepared image-caption datasets -> per-process numpy batches.

Per dataset (a prepared TFDS array_record directory, see `data/captions.py`): this process's
shard (every process_count-th example from process_index), shuffled with a seed folded with the
epoch, repeated forever. Several datasets are interleaved in proportion to their weights. Each
example is then augmented (`data/augment.py`) and given its 3 multi-label prompts
(`data/prompts.py`) by a grain random map, whose generator is seeded by (seed, process, index in
the stream), so any example's processing is reproducible and an iterator restored from
`get_state()` yields exactly the batches the original would have. Examples are batched to the
per-process batch (remainder dropped) and tokenized; `read_threads` batches are made at once
in each process, and `worker_count` > 0 moves all of it into that many worker processes (grain
`mp_prefetch`, each making whole batches). The batches do not depend on either count; an iterator
state is restorable into an iterator with the same `worker_count`.

Each batch (numpy, this process's share of the global batch `b = batch_size / process_count`):
  image:         float32 [b, S, S, 3], ImageNet mean/std normalised
  tokens:        int32 [b, L], the caption
  prompt_tokens: int32 [b, 3, L], the multi-label prompts
  prompt_ids:    int32 [b, 3], each prompt's word id (`prompts.word_id`; -1: the caption)
  labels:        float32 [b, K], with `labels` (K class names) set: 1 where a class name is one
                 of the caption's words (image-level labels)
  caption:       str [b] (only with `include_caption`, for debugging)
The global batch is assembled from these by the trainer (`jax.make_array_from_process_local_data`).

Config (`config.data`; `get_config_defaults()` lists every field with its default, and fields a
config leaves out take these defaults):
  dir:            the training data, a string so that a shell can set it
                  (`--config.data.dir=PATH`): a prepared dataset directory (the version
                  directory .../cc12m/1.0.0 or the one above it), several separated by commas
                  (a mixture), or "synthetic" for the built-in world (prepared on first use under
                  `synthetic_dir`; `training/config.py`)
  split:          the split of every dataset, or one per dataset separated by commas
  weights:        mixing weights separated by commas, one per dataset ("": equal)
  image_size, context_length, batch_size (global), shuffle_seed,
  worker_count (0: in this process), worker_buffer_size (batches per worker),
  read_threads (batches made concurrently in each process), include_caption,
  augment:        `augment.AugmentOptions` fields
"""

import dataclasses
import functools
import os

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from etils import epath

from mixreorg_jax.data import augment
from mixreorg_jax.data import prompts as prompts_lib

REQUIRED_FEATURES = ("image", "caption", "words")


def get_config_defaults() -> ml_collections.ConfigDict:
    """Every `config.data` field of the training pipeline, with its default."""
    return ml_collections.ConfigDict(
        dict(
            dir="~/tensorflow_datasets/cc12m",
            split="train",
            weights="",
            image_size=224,
            context_length=77,
            batch_size=4096,
            shuffle_seed=0,
            worker_count=0,
            worker_buffer_size=2,
            read_threads=4,
            include_caption=False,
            # Multi-label prompt templates (`prompts.TEMPLATE_SETS`): "imagenet80" (GroupViT) or
            # "photo" ("a photo of a {}.", the zero-shot evaluation's template).
            prompt_templates="imagenet80",
            # Image-level labels: class names; when set, each example also gets `labels`
            # float32 [K], 1 where the name is one of its caption's words (the classification
            # objective of backbone pre-training; configs/backbone.py).
            labels=(),
            augment=dataclasses.asdict(augment.AugmentOptions()),
        )
    )


def _option(config, name: str):
    value = config.get(name, None) if hasattr(config, "get") else getattr(config, name, None)
    return get_config_defaults()[name] if value is None else value


# ---------------------------------------------------------------- datasets
@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One prepared dataset: its TFDS version directory, split and mixing weight."""

    dir: str  # a local or cloud (gs://) path
    split: str
    weight: float


def version_dir(path: epath.Path) -> str:
    """`path` if it holds dataset_info.json, else its one (or newest) version sub-directory."""
    if (path / "dataset_info.json").exists():
        return str(path)
    versions = sorted(
        (d for d in path.iterdir() if (d / "dataset_info.json").exists()),
        key=lambda d: tuple(int(p) if p.isdigit() else -1 for p in d.name.split(".")),
    )
    if not versions:
        raise FileNotFoundError(
            f"{path} is not a prepared TFDS dataset (no dataset_info.json in it or in a "
            "version sub-directory); prepare one with `python -m mixreorg_jax.prepare_captions`"
        )
    return str(versions[-1])


def _items(value) -> list[str]:
    return [item.strip() for item in str(value).split(",") if item.strip()]


def resolve_datasets(data_config) -> list[DatasetSpec]:
    """`dir`, `split` and `weights` as dataset specs; a missing directory, a split or weight
    list of the wrong length, or a weight <= 0 is an error naming it."""
    dirs = _items(_option(data_config, "dir"))
    if not dirs:
        raise ValueError("config.data.dir is empty: give a prepared dataset directory")
    splits = _items(_option(data_config, "split")) or ["train"]
    weights = _items(_option(data_config, "weights")) or ["1"] * len(dirs)
    if len(splits) == 1:
        splits *= len(dirs)
    for name, values in (("split", splits), ("weights", weights)):
        if len(values) != len(dirs):
            raise ValueError(
                f"config.data.{name} has {len(values)} entries for {len(dirs)} directories "
                f"in config.data.dir"
            )
    specs = []
    for directory, split, weight in zip(dirs, splits, weights):
        if directory == "synthetic":
            from mixreorg_jax.data import synthetic_tfds  # Deferred: registers a TFDS builder.

            path = epath.Path(synthetic_tfds.prepare_synthetic_world(data_config))
        else:
            path = epath.Path(os.path.expanduser(directory))
        if not path.is_dir():
            raise FileNotFoundError(
                f"config.data.dir: prepared dataset directory {path} does not exist"
            )
        try:
            weight = float(weight)
        except ValueError:
            raise ValueError(f"config.data.weights: {weight!r} is not a number") from None
        if weight <= 0:
            raise ValueError(f"config.data.weights: {path} has weight {weight}; it must be > 0")
        specs.append(DatasetSpec(version_dir(path), split, weight))
    return specs


def open_source(spec: DatasetSpec):
    """Random-access source of `spec`'s split; records hold the image's encoded bytes."""
    builder = tfds.builder_from_directory(spec.dir)
    missing = [f for f in REQUIRED_FEATURES if f not in builder.info.features]
    if missing:
        raise ValueError(
            f"dataset {spec.dir} lacks feature(s) {missing} (it has "
            f"{sorted(builder.info.features)}); the pipeline needs "
            f"{list(REQUIRED_FEATURES)}"
        )
    if spec.split not in builder.info.splits:
        raise ValueError(
            f"dataset {spec.dir} has no split {spec.split!r}; it has {sorted(builder.info.splits)}"
        )
    try:
        return builder.as_data_source(spec.split, decoders={"image": tfds.decode.SkipDecoding()})
    except NotImplementedError as e:
        raise ValueError(
            f"dataset {spec.dir} is not in array_record format, which random "
            "access needs; re-prepare it"
        ) from e


# ---------------------------------------------------------------- per-example and per-batch maps
def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class PreprocessExample(grain.transforms.RandomMap):
    """Record -> dict(image float32 [S, S, 3], caption str, prompts str [3],
    prompt_ids int32 [3]) and, with `labels` (class names), labels float32 [K]."""

    def __init__(
        self,
        image_size: int,
        options: augment.AugmentOptions,
        prompt_templates: str = "imagenet80",
        labels: tuple[str, ...] = (),
    ):
        self._image_size = image_size
        self._options = options
        self._templates = prompts_lib.templates(prompt_templates)
        self._labels = {name: k for k, name in enumerate(labels)}

    def random_map(self, record, rng: np.random.Generator):
        caption = _text(record["caption"])
        words = [_text(w) for w in record["words"]]
        image = augment.train_image(
            record["image"], rng, size=self._image_size, options=self._options
        )
        prompts, ids = prompts_lib.multi_label_prompts(
            words, caption, rng, template_set=self._templates
        )
        out = dict(
            image=image,
            caption=np.array(caption),
            prompts=np.array(prompts),
            prompt_ids=np.array(ids, np.int32),
        )
        if self._labels:
            out["labels"] = np.zeros(len(self._labels), np.float32)
            out["labels"][[self._labels[w] for w in set(words) if w in self._labels]] = 1.0
        return out


@functools.cache
def _default_tokenizer(context_length: int):
    from mixreorg_jax.data.tokenizer import get_tokenizer  # pylint: disable=g-import-not-at-top

    return get_tokenizer(context_length)


class TokenizeBatch(grain.transforms.Map):
    """Batch of examples -> the pipeline's output batch (module docstring).

    The tokenizer is built in the process that runs the map (the default is not pickled into
    workers); an injected one must be picklable when worker_count > 0.
    """

    def __init__(self, context_length: int, tokenizer=None, include_caption: bool = False):
        self._context_length = context_length
        self._tokenizer = tokenizer
        self._include_caption = include_caption

    def _tokenize(self, texts) -> np.ndarray:
        tokenize = self._tokenizer or _default_tokenizer(self._context_length)
        tokens = np.asarray(tokenize([str(t) for t in texts]), np.int32)
        if tokens.shape != (len(texts), self._context_length):
            raise ValueError(
                f"the tokenizer gave shape {tokens.shape} for {len(texts)} texts; "
                f"expected ({len(texts)}, {self._context_length})"
            )
        return tokens

    def map(self, batch):
        b, num_prompts = batch["prompts"].shape
        out = dict(
            image=batch["image"],
            tokens=self._tokenize(batch["caption"]),
            prompt_tokens=self._tokenize(batch["prompts"].reshape(-1)).reshape(
                b, num_prompts, self._context_length
            ),
            prompt_ids=batch["prompt_ids"],
        )
        if "labels" in batch:
            out["labels"] = batch["labels"]
        if self._include_caption:
            out["caption"] = batch["caption"]
        return out


# ---------------------------------------------------------------- the iterator
class TrainIterator(grain.DatasetIterator):
    """The pipeline's endless iterator; `get_state()` is small JSON (positions, no data).

    `num_examples`: size of the first dataset's split (what the trainer's epochs count);
    `dataset_sizes`: every dataset's.
    """

    def __init__(self, parent: grain.DatasetIterator, dataset_sizes: list[int]):
        super().__init__(parent)
        self.dataset_sizes = dataset_sizes
        self.num_examples = dataset_sizes[0]

    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def _seed(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def make_train_dataset(
    data_config,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    tokenizer=None,
):
    """-> (grain IterDataset of this process's batches, dataset sizes). See the module doc."""
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    batch_size = int(_option(data_config, "batch_size"))
    if batch_size % process_count:
        raise ValueError(
            f"data.batch_size {batch_size} is not divisible by the process count {process_count}"
        )
    local_batch = batch_size // process_count
    seed = int(_option(data_config, "shuffle_seed"))
    options = augment.AugmentOptions.from_config(data_config.get("augment", None))

    shards, weights, sizes = [], [], []
    for i, spec in enumerate(resolve_datasets(data_config)):
        source = open_source(spec)
        if len(source) < process_count:
            raise ValueError(
                f"dataset {spec.dir} split {spec.split} has {len(source)} "
                f"examples, fewer than the {process_count} processes"
            )
        shard = grain.MapDataset.source(source)[process_index::process_count]
        shards.append(shard.shuffle(seed=_seed(seed, i)).repeat())
        weights.append(spec.weight)
        sizes.append(len(source))
    ds = shards[0] if len(shards) == 1 else grain.MapDataset.mix(shards, weights)

    preprocess = PreprocessExample(
        int(_option(data_config, "image_size")),
        options,
        str(_option(data_config, "prompt_templates")),
        tuple(data_config.get("labels", ()) or ()),
    )
    ds = ds.random_map(preprocess, seed=_seed(seed, process_index, 1))
    # Batching before `to_iter_dataset` makes whole batches the unit that threads and worker
    # processes share out, so the batches do not depend on `worker_count` or `read_threads`.
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.map(
        TokenizeBatch(
            int(_option(data_config, "context_length")),
            tokenizer,
            bool(_option(data_config, "include_caption")),
        )
    )
    read_threads = int(_option(data_config, "read_threads"))
    ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_threads)
    )
    worker_count = int(_option(data_config, "worker_count"))
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():
            # grain's multiprocessing reads its absl flags (defaults will do); outside an absl
            # app nothing has parsed them.
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count,
                per_worker_buffer_size=int(_option(data_config, "worker_buffer_size")),
            )
        )
    return ds, sizes


def make_train_iterator(
    data_config,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    tokenizer=None,
) -> TrainIterator:
    """This process's endless batch iterator (jax.process_index/count unless given).

    `tokenizer`: texts -> int32 [N, context_length]; default `mixreorg_jax.data.tokenizer`'s.
    """
    ds, sizes = make_train_dataset(
        data_config, process_index=process_index, process_count=process_count, tokenizer=tokenizer
    )
    return TrainIterator(iter(ds), sizes)
