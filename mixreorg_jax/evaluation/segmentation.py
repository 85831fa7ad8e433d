"""Zero-shot segmentation mIoU of a dataset split with GroupViT's protocol (docs/method.md §2).

In the training loop (`config.evals.seg = dict(type='segmentation', dataset='synthetic',
every_steps=500)`) and in the eval binary (`python -m mixreorg_jax.evaluate`) alike:

    evaluator = Evaluator(eval_config, model=groupvit.GroupViT(model_config), mesh=mesh)
    evaluator.run(state)          # {'miou': ..., 'miou_top_class': ..., ...}, fractions
    evaluator.evaluate(variables) # everything the binary writes to results.json

The fields and their checks are `segmentation_settings`; the images go through the inference
engine (`inference.Segmenter`), read a few ahead by threads. Each process evaluates every
`process_count`-th image on its own devices; the confusion matrices are summed over processes.
Beside the model's mIoU come the engine's trivial references (all_background, top_class,
group_oracle). `bg_thresh='auto'` sweeps `bg_sweep` on `bg_thresh_split` and evaluates `split`
with the threshold of the best mIoU there.
"""

import collections
import concurrent.futures
import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mixreorg_jax import evaluation
from mixreorg_jax.evaluation import inference, segmentation_settings, visualize
from mixreorg_jax.models import groupvit
from mixreorg_jax.ops import miou as miou_ops

_READ_AHEAD = 8  # images decoded ahead of the model
# The settings the inference engine takes as they are (its batch is rounded to the devices).
_ENGINE_FIELDS = ("short_side", "max_long", "window", "stride", "top_k")
_BASELINES = ("all_background", "top_class", "group_oracle")


def _read_ahead(dataset, indices):
    """(index, dataset[index]) in order, decoded by threads a few images ahead."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        pending = collections.deque()
        for index in indices:
            pending.append((index, pool.submit(dataset.__getitem__, index)))
            if len(pending) >= _READ_AHEAD:
                i, future = pending.popleft()
                yield i, future.result()
        while pending:
            i, future = pending.popleft()
            yield i, future.result()


def sum_over_processes(counts: np.ndarray) -> np.ndarray:
    """int64 counts summed over all processes (exact: sent as two int32 halves)."""
    counts = np.asarray(counts, np.int64)
    if jax.process_count() == 1:
        return counts
    high, low = np.divmod(counts, 1 << 30)
    gathered = np.asarray(
        multihost_utils.process_allgather(np.stack([high, low]).astype(np.int32)), np.int64
    )
    return (gathered[:, 0] * (1 << 30) + gathered[:, 1]).sum(axis=0)


def _miou_dict(class_names, confusion) -> dict[str, Any]:
    """{miou, per_class_iou {class: IoU, None for classes absent from truth and prediction}}."""
    miou, per_class = miou_ops.miou_from_confusion(confusion)
    ious = {name: None if math.isnan(v) else float(v) for name, v in zip(class_names, per_class)}
    return dict(miou=miou, per_class_iou=ious)


class Evaluator:
    """Zero-shot mIoU of one dataset split; the same code in the training loop and the binary."""

    def __init__(
        self,
        eval_config: ml_collections.ConfigDict,
        *,
        model: groupvit.GroupViT,
        mesh: jax.sharding.Mesh | None = None,
        config: ml_collections.ConfigDict | None = None,
    ):
        """Args: eval_config: fields of `segmentation_settings.default_config` (`dataset`
        required); model: the GroupViT module (only its config is used); mesh: devices to use
        (this process's part of it); config: the train config (its synthetic world), if any."""
        s = self.settings = segmentation_settings.resolve(eval_config, model.config, config)
        self.schedule = evaluation.Schedule(s.every_steps)
        self.bg_thresh = segmentation_settings.parse_bg_thresh(s.bg_thresh)
        self.templates = inference.expand_templates(s.templates)
        self.dataset, self.threshold_dataset = segmentation_settings.open_splits(s)
        self.class_names = list(self.dataset.class_names)
        self.has_background = bool(self.dataset.has_background)
        self.segmenter = inference.Segmenter(
            model.config, mesh, batch=s.batch, **{k: s[k] for k in _ENGINE_FIELDS}
        )

    def due(self, step: int, total_steps: int) -> bool:
        return self.schedule.due(step, total_steps)

    def run(self, state: dict) -> dict[str, float]:
        """Scalars for the training loop's metrics (fractions)."""
        results = self.evaluate(
            {"params": state["params"]["model"], "batch_stats": state["batch_stats"]}
        )
        scalars = {"miou": results["miou"]}
        scalars.update({f"miou_{name}": r["miou"] for name, r in results["baselines"].items()})
        if self.bg_thresh == "auto":
            scalars["bg_thresh"] = results["bg_thresh"]
        return scalars

    def _confusions(self, dataset, variables, class_emb, thresholds, *, save: bool):
        """(confusion matrices {name: int64 [K, K]; 'prediction' [max(T, 1), K, K]} summed over
        processes, the number of images, this process's images/s after the first model calls'
        images: None with one call or several processes)."""
        k, save_count = len(self.class_names), self.settings.save_predictions if save else 0
        totals = {"prediction": np.zeros((max(len(thresholds), 1), k, k), np.int64)}
        for name in _BASELINES[0 if self.has_background else 1 :]:
            totals[name] = np.zeros((k, k), np.int64)

        def add(confusions):
            for name, cm in jax.device_get(confusions).items():
                totals[name] += cm

        count = min(len(dataset), self.settings.max_images or len(dataset))
        indices = range(jax.process_index(), count, jax.process_count())
        results = self.segmenter.segment(
            variables,
            class_emb,
            _read_ahead(dataset, indices),
            thresholds=thresholds,
            num_label_classes=k,
            keep_groups=lambda index: index < save_count,
        )
        in_flight, num_images, steady_images, steady_start = collections.deque(), 0, 0, None
        for result in results:
            num_images += 1
            # Throughput without compilation: from the end of the first model calls' images
            # (whose next calls are not launched before this loop asks for them).
            if result.call_group == 0:
                jax.block_until_ready(result.predictions)
                steady_start = time.perf_counter()
            else:
                steady_images += 1
            # Fetched two images late, so the host never waits on work it just launched.
            in_flight.append(result.confusions)
            if len(in_flight) > 2:
                add(in_flight.popleft())
            if result.index < save_count:
                self._save_pictures(result)
        while in_flight:
            add(in_flight.popleft())
        steady = jax.process_count() == 1 and steady_images
        rate = steady_images / (time.perf_counter() - steady_start) if steady else None
        totals = {name: sum_over_processes(cm) for name, cm in totals.items()}
        return totals, int(sum_over_processes(np.array([num_images]))[0]), rate

    def _save_pictures(self, result: inference.ImageResult) -> None:
        example = result.example
        visualize.save_pictures(
            self.settings.output_dir,
            str(example.get("id", result.index)),
            example["image"],
            np.asarray(result.predictions[0]),
            example["label"],
            result.groups,
            self.class_names,
            self.has_background,
        )

    def _choose_bg_thresh(self, variables, class_emb) -> tuple[float, dict[str, float]]:
        """bg_thresh='auto': the sweep's threshold of the best mIoU on `bg_thresh_split`, and
        {threshold: mIoU} of the sweep."""
        s = self.settings
        sweep = tuple(float(t) for t in s.bg_sweep)
        totals, _, _ = self._confusions(
            self.threshold_dataset, variables, class_emb, sweep, save=False
        )
        mious = [miou_ops.miou_from_confusion(cm)[0] for cm in totals["prediction"]]
        if all(math.isnan(m) for m in mious):
            raise ValueError(f"no labelled pixels in {s.dataset}:{s.bg_thresh_split}")
        return sweep[int(np.nanargmax(mious))], {str(t): m for t, m in zip(sweep, mious)}

    def evaluate(self, variables: dict) -> dict[str, Any]:
        """Evaluates model variables {'params', 'batch_stats'}; every process gets the results.

        Returns (fractions; IoUs of classes absent from ground truth and predictions are None):
            dataset, split, num_images, miou, per_class_iou {class: IoU}, bg_thresh (the one
            used), baselines {all_background, top_class, group_oracle: {miou, per_class_iou}},
            confusion_matrix (rows ground truth), class_names, protocol (the settings), seconds
            and images_per_second (compilation included), images_per_second_after_compilation
            (see `_confusions`), and for bg_thresh='auto' bg_thresh_sweep {threshold: mIoU} on
            `bg_thresh_split`.
        """
        # The evaluator places every array itself: the caller's mesh context (the training
        # loop's) would clash with the arrays kept on one device for merging.
        with jax.set_mesh(None):
            return self._evaluate(variables)

    def _evaluate(self, variables: dict) -> dict[str, Any]:
        start, s = time.perf_counter(), self.settings
        variables = self.segmenter.place(variables)
        text_classes = self.class_names[1:] if self.has_background else self.class_names
        class_emb = self.segmenter.class_embeddings(variables, text_classes, self.templates)
        results: dict[str, Any] = {"dataset": s.dataset, "split": s.split}
        if self.bg_thresh == "auto":
            bg_thresh, results["bg_thresh_sweep"] = self._choose_bg_thresh(variables, class_emb)
            thresholds = (bg_thresh,)
        else:
            thresholds = () if self.bg_thresh is None else (self.bg_thresh,)
        totals, num_images, steady_rate = self._confusions(
            self.dataset, variables, class_emb, thresholds, save=True
        )
        prediction = totals.pop("prediction")[0]
        seconds = time.perf_counter() - start
        return dict(
            results,
            num_images=num_images,
            **_miou_dict(self.class_names, prediction),
            bg_thresh=thresholds[0] if thresholds else None,
            baselines={name: _miou_dict(self.class_names, cm) for name, cm in totals.items()},
            confusion_matrix=prediction.tolist(),
            class_names=self.class_names,
            protocol=dict(
                templates=list(self.templates),
                bg_thresh=s.bg_thresh,
                bg_thresh_split=s.bg_thresh_split if self.bg_thresh == "auto" else None,
                **{k: s[k] for k in _ENGINE_FIELDS},
                batch=self.segmenter.batch,
                max_images=s.max_images,
                local_devices=self.segmenter.mesh.devices.size,
                processes=jax.process_count(),
            ),
            seconds=seconds,
            images_per_second=num_images / seconds,
            images_per_second_after_compilation=steady_rate,
        )
