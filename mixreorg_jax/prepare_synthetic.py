r"""Prepares the synthetic world as a TFDS dataset (array_record) ahead of training or evaluation.

  python -m mixreorg_jax.prepare_synthetic --data_dir DIR [--image_size 32 --train_size 1000]

Every field of the world's config (`WorldConfig` in mixreorg_jax/data/synthetic.py) is a flag;
the ones not given keep their defaults. The dataset goes to
`DIR/synthetic_world/<config name>/<version>/` (mixreorg_jax/data/synthetic_tfds.py); a world
already prepared there is reused as is. Prints the dataset's directory: evaluation takes it as
`--config.data_dir` (configs/eval/synthetic.py); training finds it again from
`--config.data.synthetic_dir=DIR` and the same settings in `config.data.synthetic_world`.
"""

import dataclasses
import time

from absl import app, flags

from mixreorg_jax import cli
from mixreorg_jax.data import synthetic, synthetic_tfds

_DEFINE_BY_TYPE = {int: flags.DEFINE_integer, float: flags.DEFINE_float}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The program's flags. Defined only when it runs (tests define them on their own
    FlagValues): other programs imported beside it in tests have a `--seed` or `--data_dir`."""
    flags.DEFINE_string(
        "data_dir", None, "Root TFDS data directory.", required=True, flag_values=flag_values
    )
    flags.DEFINE_integer(
        "num_workers",
        None,
        "Processes generating examples (default: all CPUs); never changes the result.",
        lower_bound=1,
        flag_values=flag_values,
    )
    for field in dataclasses.fields(synthetic.WorldConfig):
        _DEFINE_BY_TYPE[type(field.default)](
            field.name,
            None,
            f"World parameter (default {field.default}).",
            flag_values=flag_values,
        )


def world_overrides(flag_values: flags.FlagValues) -> dict:
    """The WorldConfig fields given on the command line."""
    return {
        field.name: flag_values[field.name].value
        for field in dataclasses.fields(synthetic.WorldConfig)
        if flag_values[field.name].value is not None
    }


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {argv[1:]}")
    start = time.perf_counter()
    try:
        path = synthetic_tfds.prepare_synthetic(
            flag_values.data_dir,
            num_workers=flag_values.num_workers,
            **world_overrides(flag_values),
        )
    except (ValueError, OSError) as e:  # a world setting out of range, a data_dir not writable
        raise SystemExit(f"error: {cli.one_line(e)}") from None
    print(f"{path} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
