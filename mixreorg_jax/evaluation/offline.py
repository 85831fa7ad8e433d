"""A model checkpoint evaluated offline: what `python -m mixreorg_jax.evaluate` does.

    results = evaluate_checkpoint(config, "/tmp/mixreorg_demo", "/tmp/eval_voc")

`config` is an eval config (`configs/eval/*.py`): its `type` ('segmentation' when it has none)
names the evaluator, which the same factory as the training loop's builds (`evaluation.build`).
"""

import json
import math
import os

import jax
import ml_collections

from mixreorg_jax import evaluation
from mixreorg_jax.models import groupvit
from mixreorg_jax.training import checkpointing, sharding


def _json_safe(value):
    """NaN (an IoU or mIoU without any labelled pixel) -> None, so results.json is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _percent(value) -> str:
    return "    -" if value is None or math.isnan(value) else f"{100 * value:5.1f}"


def format_table(results: dict) -> str:
    """Per-class IoU (%) of the model and the baselines, then the mIoUs."""
    baselines = results["baselines"]
    names = list(baselines)
    width = max(12, *(len(c) for c in results["class_names"]))
    header = f"{'class':<{width}}  model  " + "  ".join(f"{n:>14}" for n in names)
    lines = [header, "-" * len(header)]
    for name in results["class_names"]:
        row = [_percent(results["per_class_iou"][name])]
        row += [f"{_percent(baselines[n]['per_class_iou'][name]):>14}" for n in names]
        lines.append(f"{name:<{width}}  " + "  ".join(row))
    lines.append("-" * len(header))
    lines.append(
        f"{'mIoU':<{width}}  {_percent(results['miou'])}  "
        + "  ".join(f"{_percent(baselines[n]['miou']):>14}" for n in names)
    )
    return "\n".join(lines)


def _summary(results: dict, eval_config: ml_collections.ConfigDict) -> str:
    """One line: the split, the images, the metrics (or the background threshold), the time and
    the throughput."""
    if "metrics" in results:
        measured = ", ".join(f"{k} {100 * v:.1f}%" for k, v in results["metrics"].items())
    else:
        chosen = (
            f" (chosen on {eval_config.bg_thresh_split})" if "bg_thresh_sweep" in results else ""
        )
        measured = f"bg_thresh {results['bg_thresh']}{chosen}"
    steady = results["images_per_second_after_compilation"]
    split = f":{results['split']}" if results["split"] else ""
    return (
        f"{results['dataset']}{split}, {results['num_images']} images, "
        f"{measured}, {results['seconds']:.1f} s ({results['images_per_second']:.2f} images/s"
        + (f"; {steady:.2f} after compilation" if steady else "")
        + ")"
    )


def evaluate_checkpoint(
    eval_config: ml_collections.ConfigDict, checkpoint: str, output_dir: str
) -> dict:
    """Evaluates `checkpoint` (a model checkpoint, training workdir or HF GroupViT folder) with
    `eval_config` on all local devices; process 0 writes OUTPUT_DIR/results.json (strict JSON:
    NaN as null) and prints a summary line (after the per-class table of a segmentation).

    Returns the results (the evaluator's `evaluate`, with `checkpoint`, NaN as None).
    Raises ValueError (a bad setting) or FileNotFoundError (no model, no data).
    """
    if not checkpoint:
        raise ValueError("--checkpoint is required")
    if not output_dir:
        raise ValueError("--output_dir is required")
    variables, model_config = checkpointing.load_variables(checkpoint)
    if "output_dir" in eval_config:
        eval_config.output_dir = output_dir
    evaluator = evaluation.build(
        eval_config.get("type", "segmentation"),
        eval_config,
        model=groupvit.GroupViT(model_config),
        mesh=sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1))),
        config=None,
    )
    results = evaluator.evaluate(variables)
    results = _json_safe({"checkpoint": os.path.abspath(os.path.expanduser(checkpoint)), **results})
    if jax.process_index() == 0:
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "results.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=2, allow_nan=False)
        if "per_class_iou" in results:
            print(format_table(results))
        print(_summary(results, eval_config))
        print(f"wrote {path}")
    return results
