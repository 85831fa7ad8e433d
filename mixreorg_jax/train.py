r"""Trains GroupViT or MixReorg from a config.

  python -m mixreorg_jax.train --config configs/mixreorg.py:demo --workdir /tmp/mixreorg_demo

Every config field can be overridden (`--config.optim.lr=1e-3`). Multi-process runs (TPU pods,
GPU clusters) start the same command on every host; `jax.distributed` is initialised when the
environment (or `--num_processes`) says there is more than one process.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mixreorg_jax import cli, trainer
from mixreorg_jax.training import sharding

config_flags.DEFINE_config_file(
    "config", None, "Train config file (`path.py:variant`).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Checkpoints, logs and the exported model go here.")
sharding.define_distributed_flags()


def main(argv):
    del argv
    cli.quiet_orbax_logs()
    sharding.initialize_distributed()
    if jax.default_backend() == "cpu" and (hint := cli.huge_pages_hint()):
        logging.warning(hint)
    try:
        trainer.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (trainer.TrainingDiverged, ValueError, FileNotFoundError) as e:
        # Expected failures (bad config, missing data, a checkpoint of another model, divergence)
        # end with one clear line rather than a traceback through XLA.
        raise SystemExit(f"error: {cli.one_line(e)}") from None


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=cli.parse_flags)
