r"""Zero-shot segmentation of a checkpoint on an evaluation set (method.md section 2).

  python -m mixreorg_jax.evaluate --config configs/eval/voc.py \
      --config.data_dir=~/data --checkpoint=/tmp/mixreorg_demo --output_dir=/tmp/eval_voc

`--checkpoint`: a training workdir, an exported or converted model checkpoint, or a Hugging Face
GroupViT folder. Writes `OUTPUT_DIR/results.json` (mIoU, per-class IoU, the trivial baselines, the
protocol's settings) and prints a per-class table; `--config.save_predictions=N` also writes the
first N images' predicted masks (`predictions/ID.png`, indexed PNGs of the label values) and
pictures (`pictures/ID.png`: image, prediction, ground truth; `pictures/ID_groups.png`: the final
groups). `--config.max_images=N` evaluates the first N images only (a quick check, or a throughput
measurement: results.json has `images_per_second` with and without compilation).

The evaluation is the training loop's evaluator (`mixreorg_jax/evaluation/segmentation.py`),
built by the same factory. On several hosts, start the same command on each: every host takes
its share of the images on its own devices, and the confusion matrices are summed.
"""

import json
import math
import os

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from mixreorg_jax import evaluation
from mixreorg_jax.models import groupvit
from mixreorg_jax.training import checkpointing, sharding


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, argv: list[str] | None = None):
    """The binary's flags. Defined only when run as a program (or on a caller's own FlagValues,
    with the `argv` it will parse), so that importing this module does not clash with other
    binaries' `--config`."""
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Eval config (`configs/eval/*.py[:variant]`).",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=argv,
    )
    flags.DEFINE_string(
        "checkpoint",
        None,
        "Model checkpoint, training workdir or HF GroupViT folder.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "output_dir", None, "results.json (and pictures) go here.", flag_values=flag_values
    )
    flags.mark_flags_as_required(["config", "checkpoint", "output_dir"], flag_values=flag_values)


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


def evaluate(config: ml_collections.ConfigDict, checkpoint: str, output_dir: str) -> dict:
    """Evaluates `checkpoint` with the eval `config`; writes OUTPUT_DIR/results.json."""
    if not checkpoint:
        raise ValueError("--checkpoint is required")
    if not output_dir:
        raise ValueError("--output_dir is required")
    variables, model_config = checkpointing.load_variables(checkpoint)
    config.output_dir = output_dir
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
    [(_, evaluator)] = evaluation.create(
        ml_collections.ConfigDict({"segmentation": config}),
        model=groupvit.GroupViT(model_config),
        mesh=mesh,
        config=None,
    )
    results = evaluator.evaluate(variables)
    results = _json_safe({"checkpoint": os.path.abspath(os.path.expanduser(checkpoint)), **results})
    if jax.process_index() == 0:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2, allow_nan=False)
        print(format_table(results))
        thresh = results["bg_thresh"]
        print(
            f"{results['dataset']}:{results['split']}, {results['num_images']} images, "
            f"bg_thresh {thresh}"
            + (f" (chosen on {config.bg_thresh_split})" if "bg_thresh_sweep" in results else "")
            + f", {results['seconds']:.1f} s ({results['images_per_second']:.2f} images/s"
            + (
                f"; {steady:.2f} after compilation"
                if (steady := results["images_per_second_after_compilation"])
                else ""
            )
            + ")"
        )
        print(f"wrote {os.path.join(output_dir, 'results.json')}")
    return results


def run(config: ml_collections.ConfigDict, checkpoint: str, output_dir: str) -> dict:
    """`evaluate`, with expected failures (missing data or checkpoint, a bad setting) ending in
    one line rather than a traceback through XLA."""
    try:
        return evaluate(config, checkpoint, output_dir)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    sharding.initialize_distributed()
    run(flags.FLAGS.config, flags.FLAGS.checkpoint, flags.FLAGS.output_dir)


if __name__ == "__main__":
    define_flags()
    sharding.define_distributed_flags()
    app.run(main)
