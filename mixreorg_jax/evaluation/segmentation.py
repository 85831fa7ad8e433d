"""Zero-shot segmentation mIoU of a dataset split with GroupViT's protocol (docs/method.md §2).

In the training loop (`config.evals.seg = dict(type='segmentation', dataset='synthetic',
every_steps=500)`) and in the eval binary (`python -m mixreorg_jax.evaluate`) alike:

    evaluator = Evaluator(eval_config, model=groupvit.GroupViT(model_config), mesh=mesh)
    evaluator.run(state)          # {'miou': ..., 'miou_top_class': ..., 'overlays': ...}
    evaluator.evaluate(variables) # everything the binary writes to results.json

The fields and their checks are `segmentation_settings`; the images go through the inference
engine (`inference.Segmenter`). Each process evaluates its share of the images (`loop`) on its own
devices; the confusion matrices are summed over processes. Beside the model's mIoU come the
engine's trivial references (all_background, top_class, group_oracle). `bg_thresh='auto'` sweeps
`bg_sweep` on `bg_thresh_split` and evaluates `split` with the threshold of the best mIoU there.
"""

import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mixreorg_jax import evaluation
from mixreorg_jax.evaluation import inference, loop, segmentation_settings, visualize
from mixreorg_jax.models import groupvit
from mixreorg_jax.ops import miou as miou_ops
from mixreorg_jax.training import step as train_step


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
        self.segmenter = segmentation_settings.make_segmenter(s, model.config, mesh)

    def due(self, step: int, total_steps: int) -> bool:
        return self.schedule.due(step, total_steps)

    def run(self, state: dict) -> dict[str, Any]:
        """The training loop's metrics: scalars (fractions) and, with `summary_images`, `overlays`
        uint8[N, window, window, 3], the predicted masks over this process's first N images."""
        results = self.evaluate(
            train_step.model_variables(state), overlays=self.settings.summary_images
        )
        scalars = {"miou": results["miou"]}
        scalars.update({f"miou_{name}": r["miou"] for name, r in results["baselines"].items()})
        if self.bg_thresh == "auto":
            scalars["bg_thresh"] = results["bg_thresh"]
        if self.settings.summary_images:
            scalars["overlays"] = results["overlays"]
        return scalars

    def _confusions(self, dataset, variables, class_emb, thresholds, *, save=0, overlays=0):
        """(confusion matrices {name: int64 [K, K]; 'prediction' [max(T, 1), K, K]} summed over
        processes, the number of images, `loop.Throughput.rate`, the `summary_overlay`s of this
        process's first `overlays` images); pictures of the images indexed below `save` go to
        `output_dir`."""
        k = len(self.class_names)
        totals = loop.Totals(inference.zero_confusions(len(thresholds), k, self.has_background))
        indices = loop.process_indices(len(dataset), self.settings.max_images)
        throughput = loop.Throughput(len(indices), f"segmentation {self.settings.dataset}")
        pictures = []
        for result in self.segmenter.segment(
            variables,
            class_emb,
            loop.read_ahead(dataset.__getitem__, indices),
            thresholds=thresholds,
            num_label_classes=k,
            keep_groups=lambda index: index < save,
        ):
            # The images of the first model calls, whose next calls are only launched when this
            # loop asks for them, start the clock.
            throughput.add(1, result.predictions, first=result.call_group == 0)
            totals.add(result.confusions)
            if result.index < save:
                visualize.save_pictures(
                    self.settings.output_dir,
                    result.example,
                    result.predictions[0],
                    result.groups,
                    self.class_names,
                    self.has_background,
                )
            if len(pictures) < overlays:
                image, prediction = result.example["image"], result.predictions[0]
                side = self.settings.window
                pictures.append(
                    visualize.summary_overlay(image, prediction, self.has_background, side)
                )
        num_images = int(loop.sum_over_processes(np.array([throughput.images]))[0])
        pictures = np.array(pictures, np.uint8).reshape(-1, *(self.settings.window,) * 2, 3)
        return totals.summed(), num_images, throughput.rate(), pictures

    def _choose_bg_thresh(self, variables, class_emb) -> tuple[float, dict[str, float]]:
        """bg_thresh='auto': the sweep's threshold of the best mIoU on `bg_thresh_split`, and
        {threshold: mIoU} of the sweep."""
        s = self.settings
        sweep = tuple(float(t) for t in s.bg_sweep)
        totals, *_ = self._confusions(self.threshold_dataset, variables, class_emb, sweep)
        mious = [miou_ops.miou_from_confusion(cm)[0] for cm in totals["prediction"]]
        if all(math.isnan(m) for m in mious):
            raise ValueError(f"no labelled pixels in {s.dataset}:{s.bg_thresh_split}")
        return sweep[int(np.nanargmax(mious))], {str(t): m for t, m in zip(sweep, mious)}

    def evaluate(self, variables: dict, *, overlays: int = 0) -> dict[str, Any]:
        """Evaluates model variables {'params', 'batch_stats'}; every process gets the results.

        Returns (fractions; IoUs of classes absent from ground truth and predictions are None):
            dataset, split, num_images, miou, per_class_iou {class: IoU}, bg_thresh (the one
            used), baselines {all_background, top_class, group_oracle: {miou, per_class_iou}},
            confusion_matrix (rows ground truth), class_names, protocol (the settings), seconds
            and images_per_second (compilation included), images_per_second_after_compilation
            (see `_confusions`), for bg_thresh='auto' bg_thresh_sweep {threshold: mIoU} on
            `bg_thresh_split`, and with `overlays` > 0 the overlays of `run`.
        """
        start, s = time.perf_counter(), self.settings
        # The evaluator places every array itself: the caller's mesh context (the training
        # loop's) would clash with the arrays kept on one device for merging.
        with jax.set_mesh(None):
            variables = self.segmenter.place(variables)
            text_classes = self.class_names[1:] if self.has_background else self.class_names
            class_emb = self.segmenter.class_embeddings(variables, text_classes, self.templates)
            results: dict[str, Any] = {"dataset": s.dataset, "split": s.split}
            if self.bg_thresh == "auto":
                bg_thresh, results["bg_thresh_sweep"] = self._choose_bg_thresh(variables, class_emb)
                thresholds = (bg_thresh,)
            else:
                thresholds = () if self.bg_thresh is None else (self.bg_thresh,)
            totals, num_images, steady_rate, pictures = self._confusions(
                self.dataset,
                variables,
                class_emb,
                thresholds,
                save=s.save_predictions,
                overlays=overlays,
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
            protocol=segmentation_settings.protocol(s, self.segmenter),
            seconds=seconds,
            images_per_second=num_images / seconds,
            images_per_second_after_compilation=steady_rate,
            **({"overlays": pictures} if overlays else {}),
        )
