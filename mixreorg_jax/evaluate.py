r"""Zero-shot evaluation of a checkpoint: segmentation (docs/method.md §2), classification or
image-text retrieval, as the eval config's `type` says.

  python -m mixreorg_jax.evaluate --config configs/eval/voc.py \
      --config.data_dir=~/data --checkpoint=/tmp/mixreorg_demo --output_dir=/tmp/eval_voc
  python -m mixreorg_jax.evaluate --config configs/eval/imagenet.py \
      --config.data_dir=~/data/imagenet/val --config.class_names=~/data/imagenet/names.txt \
      --checkpoint=/tmp/mixreorg_demo --output_dir=/tmp/eval_imagenet

`--checkpoint`: a training workdir, an exported or converted model checkpoint, or a Hugging Face
GroupViT folder. Writes `OUTPUT_DIR/results.json` (the metrics and the protocol's settings; for a
segmentation also per-class IoU and the trivial baselines, printed as a per-class table) and
prints a summary line. For a segmentation, `--config.save_predictions=N` also writes the first N
images' predicted masks (`predictions/ID.png`, indexed PNGs of the label values) and pictures
(`pictures/ID.png`: image, prediction, ground truth; `pictures/ID_groups.png`: the final groups).
`--config.max_images=N` evaluates the first N images only (a quick check, or a throughput
measurement: results.json has `images_per_second` with and without compilation).

The evaluation is the training loop's evaluator (`mixreorg_jax/evaluation/segmentation.py`,
`classification.py`, `retrieval.py`), built by the same factory
(`mixreorg_jax/evaluation/offline.py`). On several hosts, start the same command on each: every
host takes its share of the images on its own devices, and the counts are summed.
"""

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from mixreorg_jax import cli
from mixreorg_jax.evaluation import offline
from mixreorg_jax.training import sharding


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, argv: list[str] | None = None):
    """The program's flags. Defined only when run as a program (or on a caller's own FlagValues,
    with the `argv` it will parse), so that importing this module does not clash with other
    programs' `--config`."""
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


def run(config: ml_collections.ConfigDict, checkpoint: str, output_dir: str) -> dict:
    """`offline.evaluate_checkpoint`, with expected failures (missing data or checkpoint, a bad
    setting) ending in one line `error: ...` rather than a traceback through XLA."""
    try:
        return offline.evaluate_checkpoint(config, checkpoint, output_dir)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {cli.one_line(e)}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_orbax_logs()
    sharding.initialize_distributed()
    run(flags.FLAGS.config, flags.FLAGS.checkpoint, flags.FLAGS.output_dir)


if __name__ == "__main__":
    define_flags()
    sharding.define_distributed_flags()
    app.run(main, flags_parser=cli.parse_flags)
