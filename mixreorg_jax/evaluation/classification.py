"""Zero-shot image classification, top-1 and top-5, with GroupViT's protocol (docs/method.md §2).

A class's embedding is the text tower's embeddings of its name in each prompt template (CLIP's
80 ImageNet templates by default) averaged and L2-normalised; an image's is the pooled, projected,
L2-normalised embedding of its centre crop (`data/augment.py`'s eval crop at the model's input
size); an image's class scores are the cosines of the two. In the training loop
(`config.evals.imagenet = dict(type='classification', data_dir=..., every_steps=5000)`) and in the
eval binary (`configs/eval/imagenet.py`) alike:

    evaluator = Evaluator(eval_config, model=groupvit.GroupViT(model_config), mesh=mesh)
    evaluator.run(state)           # {'top1': ..., 'top5': ...}, fractions
    evaluator.evaluate(variables)  # what the binary writes to results.json

The images come from a class-folder tree, DATA_DIR/CLASS/*.{jpg,jpeg,png} with the classes in
sorted folder order (torchvision's ImageFolder; GroupViT's ImageNet val folder), or from a TFDS
split in array_record format with an `image` and a `label` (ClassLabel) feature. Each process
classifies every `process_count`-th image on its own devices; the counts are summed.
"""

import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from mixreorg_jax import evaluation
from mixreorg_jax.data import augment
from mixreorg_jax.evaluation import inference, loop
from mixreorg_jax.models import groupvit
from mixreorg_jax.training import step as train_step

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_WORDNET_ID = re.compile(r"n\d{8}")


def default_config() -> ml_collections.ConfigDict:
    """Every field of a classification eval config, with its default.

    Fields:
      data_dir: a class-folder tree (DATA_DIR/CLASS/*.jpg), or with `tfds_name` the TFDS data_dir
          ('': TFDS's default). tfds_name: a TFDS dataset (e.g. 'imagenet2012') read instead of a
          folder tree. split: its split.
      class_names: a text file of the class names, one a line in class order ('': the folder
          names or the ClassLabel names, '_' read as a space); needed when those are WordNet ids.
      templates: prompt templates, averaged per class ('imagenet80' names CLIP's 80).
      crop_fraction: the centre crop's side over the image's short side.
      max_images: classify only the first N (0: all). batch: images per model call (rounded up
          to a multiple of the local device count).
      enabled: False leaves the evaluation out of the training loop.
      every_steps: the training loop's schedule (0: last step only).
    """
    return ml_collections.ConfigDict(
        dict(
            type="classification",
            enabled=True,
            every_steps=0,
            data_dir="",
            tfds_name="",
            split="validation",
            class_names="",
            templates=("imagenet80",),
            crop_fraction=0.875,
            max_images=0,
            batch=64,
        )
    )


class ImageFolder:
    """DIR/CLASS/*.{jpg,jpeg,png}: (encoded image, label) items, the classes in sorted folder
    order and each class's images sorted by name."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder tree {root} does not exist")
        self.class_names = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.items = [
            (os.path.join(root, name, file), label)
            for label, name in enumerate(self.class_names)
            for file in sorted(os.listdir(os.path.join(root, name)))
            if file.lower().endswith(IMAGE_SUFFIXES)
        ]
        if not self.items:
            raise FileNotFoundError(f"no images in {root}/CLASS/*{{{','.join(IMAGE_SUFFIXES)}}}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        path, label = self.items[index]
        with open(path, "rb") as f:
            return f.read(), label


class TfdsSplit:
    """A TFDS split's (encoded image, label) items, read at random (array_record)."""

    def __init__(self, name: str, data_dir: str, split: str):
        try:
            builder = tfds.builder(name, data_dir=data_dir or None)
        except tfds.core.DatasetNotFoundError:
            builder = None
        if builder is None or not builder.is_prepared():
            where = data_dir or "TFDS's default data_dir"
            raise FileNotFoundError(f"no prepared TFDS dataset {name!r} in {where}")
        features = dict(builder.info.features.items())
        label = features.get("label")
        if "image" not in features or not isinstance(label, tfds.features.ClassLabel):
            raise ValueError(
                f"TFDS dataset {name}: needs an 'image' and a 'label' (ClassLabel) feature, "
                f"has {sorted(features)}"
            )
        if split not in builder.info.splits:
            raise ValueError(
                f"TFDS dataset {name}: no split {split!r}; has {sorted(builder.info.splits)}"
            )
        try:
            self.source = builder.as_data_source(
                split, decoders={"image": tfds.decode.SkipDecoding()}
            )
        except NotImplementedError:
            raise ValueError(
                f"TFDS dataset {name} is not in array_record format, which random access needs; "
                f"convert it: tfds convert_format --dataset_version_dir={builder.data_dir} "
                "--out_file_format=array_record"
            ) from None
        self.class_names = list(label.names)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        record = self.source[index]
        return record["image"], int(record["label"])


def open_images(settings: ml_collections.ConfigDict) -> tuple[Any, list[str]]:
    """(the images, an `ImageFolder` or `TfdsSplit`; the class names to embed)."""
    data_dir = os.path.expanduser(settings.data_dir)
    if settings.tfds_name:
        images = TfdsSplit(settings.tfds_name, data_dir, settings.split)
    elif data_dir:
        images = ImageFolder(data_dir)
    else:
        raise ValueError("classification evaluator: set data_dir (and tfds_name for TFDS)")
    if not settings.class_names:
        names = images.class_names
        if any(_WORDNET_ID.fullmatch(name) for name in names):
            raise ValueError(
                f"the classes of {settings.tfds_name or data_dir} are WordNet ids ({names[0]}, "
                "...): give their names in class_names, a text file of one name a line in class "
                "order"
            )
        return images, [name.replace("_", " ") for name in names]
    with open(os.path.expanduser(settings.class_names)) as f:
        names = [line.strip() for line in f if line.strip()]
    if len(names) != len(images.class_names):
        raise ValueError(
            f"{settings.class_names} has {len(names)} class names for "
            f"{len(images.class_names)} classes"
        )
    return images, names


@jax.jit
def _hits(image_emb, class_emb, labels):
    """int32[2]: how many images have their true class first, and among the first five."""
    logits = jnp.matmul(image_emb, class_emb.T, precision=jax.lax.Precision.HIGHEST)
    true = jnp.take_along_axis(logits, labels[:, None], axis=1)
    rank = jnp.sum(logits > true, axis=1)  # classes scored above the true one
    return jnp.stack([jnp.sum(rank < 1), jnp.sum(rank < 5)])


class Evaluator:
    """Zero-shot top-1 and top-5 accuracy; the same code in the training loop and the binary."""

    def __init__(
        self,
        eval_config: ml_collections.ConfigDict,
        *,
        model: groupvit.GroupViT,
        mesh: jax.sharding.Mesh | None = None,
        config: ml_collections.ConfigDict | None = None,
    ):
        """Args: eval_config: fields of `default_config`; model: the GroupViT module (only its
        config is used); mesh: devices to use (this process's part of it); config: unused."""
        del config
        s = self.settings = loop.with_overrides(
            default_config(), eval_config, "classification evaluator"
        )
        if s.batch < 1 or not 0 < s.crop_fraction <= 1 or s.max_images < 0:
            raise ValueError(
                "classification evaluator: needs batch >= 1, 0 < crop_fraction <= 1, "
                "max_images >= 0"
            )
        self.schedule = evaluation.Schedule(s.every_steps)
        self.templates = inference.expand_templates(s.templates)
        self.images, self.class_names = open_images(s)
        self.image_size = model.config.image_size
        self.embedder = inference.Embedder(model.config, mesh, batch=s.batch)

    def due(self, step: int, total_steps: int) -> bool:
        return self.schedule.due(step, total_steps)

    def run(self, state: dict) -> dict[str, float]:
        """{'top1', 'top5'}: fractions of the images, for the training loop's metrics."""
        return self.evaluate(train_step.model_variables(state))["metrics"]

    def _load(self, index: int) -> tuple[np.ndarray, int]:
        image, label = self.images[index]
        size, fraction = self.image_size, self.settings.crop_fraction
        return augment.eval_image(image, size=size, crop_fraction=fraction), label

    def evaluate(self, variables: dict) -> dict[str, Any]:
        """Evaluates model variables {'params', 'batch_stats'}; every process gets the results:
        dataset, split, num_images, metrics {top1, top5} (fractions), class_names, protocol (the
        settings), seconds, images_per_second and images_per_second_after_compilation."""
        start, s = time.perf_counter(), self.settings
        with jax.set_mesh(None):  # The embedder places its arrays itself.
            variables = self.embedder.place(variables)
            class_emb = self.embedder.class_embeddings(variables, self.class_names, self.templates)
            totals = loop.Totals({"hits": np.zeros(2)}, lag=1)
            indices = loop.process_indices(len(self.images), s.max_images)
            throughput = loop.Throughput(
                len(indices), f"classification {s.tfds_name or s.data_dir}"
            )
            examples = loop.read_ahead(self._load, indices, depth=2 * self.embedder.batch)
            for k, batch in enumerate(loop.batches(examples, self.embedder.batch)):
                images = np.stack([image for _, (image, _) in batch])
                labels = np.array([label for _, (_, label) in batch], np.int32)
                image_emb = self.embedder.image_embeddings(variables, images)
                hits = _hits(image_emb, class_emb, labels)
                throughput.add(len(batch), hits, first=k == 0)
                totals.add({"hits": hits})
            hits = totals.summed()["hits"]
            num_images = int(loop.sum_over_processes(np.array([throughput.images]))[0])
        seconds = time.perf_counter() - start
        return dict(
            dataset=s.tfds_name or s.data_dir,
            split=s.split if s.tfds_name else None,
            num_images=num_images,
            metrics=dict(zip(("top1", "top5"), (hits / max(num_images, 1)).tolist())),
            class_names=self.class_names,
            protocol=dict(
                templates=list(self.templates),
                image_size=self.image_size,
                crop_fraction=s.crop_fraction,
                batch=self.embedder.batch,
                max_images=s.max_images,
                local_devices=self.embedder.mesh.devices.size,
                processes=jax.process_count(),
            ),
            seconds=seconds,
            images_per_second=num_images / seconds,
            images_per_second_after_compilation=throughput.rate(),
        )
