"""Zero-shot image-text retrieval: recall at 1, 5 and 10, image-to-text and text-to-image.

The pairs are a held-out split of a caption dataset prepared by `data/captions.py` (`python -m
mixreorg_jax.prepare_captions`), each record one image and its caption. An image's embedding is
the pooled, projected, L2-normalised embedding of its centre crop (`data/augment.py`'s eval crop
at the model's input size), a caption's the text tower's projected, L2-normalised embedding
(docs/method.md §1); a pair scores their cosine. Image i's recall@k counts whether caption i is
among the k captions that score highest with it (i2t), and the other way round (t2i). In the
training loop (`config.evals.retrieval = dict(type='retrieval', data_dir=..., every_steps=5000)`)
and in the eval binary (`configs/eval/retrieval.py`) alike:

    evaluator = Evaluator(eval_config, model=groupvit.GroupViT(model_config), mesh=mesh)
    evaluator.run(state)  # {'i2t_r1': ..., 'i2t_r5': ..., ..., 't2i_r10': ...}, fractions

Each process embeds every `process_count`-th pair on its own devices; the embeddings are gathered
on every process, which ranks all of them on the host.
"""

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from mixreorg_jax import evaluation
from mixreorg_jax.data import augment, pipeline
from mixreorg_jax.evaluation import inference, loop
from mixreorg_jax.models import groupvit
from mixreorg_jax.training import step as train_step

RECALL_AT = (1, 5, 10)


def default_config() -> ml_collections.ConfigDict:
    """Every field of a retrieval eval config, with its default.

    Fields:
      data_dir: a prepared caption dataset (its version directory, .../NAME/1.0.0, or the one
          above it). split: the held-out split.
      max_images: the first N pairs (0: all); every process ranks N x N similarities.
      crop_fraction: the centre crop's side over the image's short side.
      batch: images per model call (rounded up to a multiple of the local device count).
      enabled: False leaves the evaluation out of the training loop.
      every_steps: the training loop's schedule (0: last step only).
    """
    return ml_collections.ConfigDict(
        dict(
            type="retrieval",
            enabled=True,
            every_steps=0,
            data_dir="",
            split="validation",
            max_images=1000,
            crop_fraction=0.875,
            batch=64,
        )
    )


def ranks(queries: np.ndarray, keys: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """int[n]: for each query i, how many keys score above key i, its pair (ties do not count);
    the scores (dot products) are computed `chunk` queries at a time."""
    result = np.empty(len(queries), np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ keys.T
        rows = np.arange(len(scores))
        result[start : start + len(scores)] = np.sum(
            scores > scores[rows, start + rows][:, None], axis=1
        )
    return result


def recalls(image_emb: np.ndarray, text_emb: np.ndarray) -> dict[str, float]:
    """{i2t_r1, i2t_r5, i2t_r10, t2i_r1, ...}: the fraction of images (texts) whose own text
    (image), the one of the same row, is among their k best matches."""
    found = {"i2t": ranks(image_emb, text_emb), "t2i": ranks(text_emb, image_emb)}
    return {f"{kind}_r{k}": float(np.mean(r < k)) for kind, r in found.items() for k in RECALL_AT}


class Evaluator:
    """Image-text recall@k of a caption split; the same code in the training loop and the binary."""

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
            default_config(), eval_config, "retrieval evaluator"
        )
        if s.batch < 1 or not 0 < s.crop_fraction <= 1 or s.max_images < 0:
            raise ValueError(
                "retrieval evaluator: needs batch >= 1, 0 < crop_fraction <= 1, max_images >= 0"
            )
        if not s.data_dir:
            raise ValueError("retrieval evaluator: set data_dir, a prepared caption dataset")
        directory = epath.Path(os.path.expanduser(s.data_dir))
        if not directory.is_dir():
            raise FileNotFoundError(f"prepared caption dataset {directory} does not exist")
        self.schedule = evaluation.Schedule(s.every_steps)
        spec = pipeline.DatasetSpec(pipeline.version_dir(directory), s.split, 1.0)
        self.records = pipeline.open_source(spec)
        self.image_size = model.config.image_size
        self.embedder = inference.Embedder(model.config, mesh, batch=s.batch)

    def due(self, step: int, total_steps: int) -> bool:
        return self.schedule.due(step, total_steps)

    def run(self, state: dict) -> dict[str, float]:
        """{i2t_r1, ..., t2i_r10}: fractions, for the training loop's metrics."""
        return self.evaluate(train_step.model_variables(state))["metrics"]

    def _load(self, index: int) -> tuple[np.ndarray, str]:
        record = self.records[index]
        size, fraction = self.image_size, self.settings.crop_fraction
        image = augment.eval_image(record["image"], size=size, crop_fraction=fraction)
        caption = record["caption"]
        return image, caption.decode() if isinstance(caption, bytes) else str(caption)

    def evaluate(self, variables: dict) -> dict[str, Any]:
        """Evaluates model variables {'params', 'batch_stats'}; every process gets the results:
        dataset, split, num_images, metrics {i2t_r1, ..., t2i_r10} (fractions), protocol (the
        settings), seconds, images_per_second and images_per_second_after_compilation."""
        start, s = time.perf_counter(), self.settings
        indices = loop.process_indices(len(self.records), s.max_images)
        image_rows, captions = [], []
        throughput = loop.Throughput(len(indices), f"retrieval {s.data_dir}")
        with jax.set_mesh(None):  # The embedder places its arrays itself.
            variables = self.embedder.place(variables)
            examples = loop.read_ahead(self._load, indices, depth=2 * self.embedder.batch)
            for k, batch in enumerate(loop.batches(examples, self.embedder.batch)):
                images = np.stack([image for _, (image, _) in batch])
                image_rows.append(self.embedder.image_embeddings(variables, images))
                throughput.add(len(batch), image_rows[-1], first=k == 0)
                captions += [caption for _, (_, caption) in batch]
            text_emb = self.embedder.text_embeddings(variables, captions)
            dim = self.embedder.model_config.projection_dim
            image_emb = np.concatenate(
                [np.zeros((0, dim), np.float32), *jax.device_get(image_rows)]
            )
            # All pairs on every process, in the split's order (`indices.stop`: their number).
            image_emb = loop.gather_over_processes(image_emb, indices.stop)
            text_emb = loop.gather_over_processes(np.asarray(text_emb), indices.stop)
        metrics = recalls(image_emb, text_emb)
        seconds = time.perf_counter() - start
        return dict(
            dataset=s.data_dir,
            split=s.split,
            num_images=len(image_emb),
            metrics=metrics,
            protocol=dict(
                image_size=self.image_size,
                crop_fraction=s.crop_fraction,
                batch=self.embedder.batch,
                max_images=s.max_images,
                local_devices=self.embedder.mesh.devices.size,
                processes=jax.process_count(),
            ),
            seconds=seconds,
            images_per_second=len(image_emb) / seconds,
            images_per_second_after_compilation=throughput.rate(),
        )
