r"""Prepares real image-caption data as a TFDS dataset (array_record) for the training pipeline.

  python -m mixreorg_jax.prepare_captions --source 'cc12m/{00000..01242}.tar' \
      --data_dir ~/tensorflow_datasets --name cc12m [--num_workers 16]

`--source` takes brace ranges and globs and may be repeated; the sources are webdataset shards
(`*.tar`), img2dataset parquet or tfrecord files, or a captions file (`*.tsv`, `*.csv`,
`*.jsonl`) beside its images (mixreorg_jax/data/captions.py tells them apart and checks every
sample). Writes `DATA_DIR/NAME/1.0.0/` with the features `image`, `caption` and `words` (the
caption's nouns and verbs, tagged by NLTK, whose tagger data must be installed:
`python -m nltk.downloader averaged_perceptron_tagger_eng`). A dataset already prepared there is
reused unless `--overwrite`. Prints one JSON line: the dataset's directory, how many samples were
skipped (corrupt image, bad caption) or re-encoded, and the source files that were missing or
unreadable (their samples before the damage are kept).

On Apache Beam (`pip install 'mixreorg_jax[beam]'`), the same dataset, prepared by a pipeline:
`--beam_runner=DirectRunner` on this machine, or Dataflow, Flink or Spark with their options
passed through `--beam_pipeline_options` (comma-separated, as `tfds build` takes them):

  python -m mixreorg_jax.prepare_captions --source 'gs://BUCKET/cc12m/{00000..01242}.tar' \
      --data_dir gs://BUCKET/tensorflow_datasets --name cc12m --beam_pipeline_options=\
  runner=DataflowRunner,project=PROJECT,region=REGION,temp_location=gs://BUCKET/tmp,\
  setup_file=./setup.py

(`setup_file` installs this package on the workers; NLTK's tagger is loaded here and sent to them.)
"""

import json

import tensorflow_datasets as tfds
from absl import app, flags

from mixreorg_jax import cli
from mixreorg_jax.data import captions, words


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The program's flags. Defined only when it runs (tests define them on their own
    FlagValues): other programs imported beside it in tests have a `--data_dir` too."""
    flags.DEFINE_multi_string(
        "source",
        None,
        "File pattern (brace ranges and globs); repeat for more.",
        required=True,
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "data_dir", None, "Root TFDS data directory.", required=True, flag_values=flag_values
    )
    flags.DEFINE_string(
        "name",
        None,
        "Dataset name (snake_case), e.g. cc12m.",
        required=True,
        flag_values=flag_values,
    )
    flags.DEFINE_string("split", "train", "Split the sources make.", flag_values=flag_values)
    flags.DEFINE_integer(
        "num_workers",
        0,
        "Processes reading and checking source files (0: this one).",
        lower_bound=0,
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "overwrite", False, "Prepare again over an existing dataset.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "beam_runner",
        None,
        "Prepare in an Apache Beam pipeline on this runner (DirectRunner, DataflowRunner, ...).",
        flag_values=flag_values,
    )
    flags.DEFINE_list(
        "beam_pipeline_options",
        [],
        "Beam pipeline options, comma-separated key=value (runner=DataflowRunner,project=...).",
        flag_values=flag_values,
    )


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {argv[1:]}")
    try:
        directory = captions.prepare(
            flag_values.name,
            {flag_values.split: flag_values.source},
            data_dir=flag_values.data_dir,
            num_workers=flag_values.num_workers,
            overwrite=flag_values.overwrite,
            beam_runner=flag_values.beam_runner,
            beam_options=[f"--{option}" for option in flag_values.beam_pipeline_options],
        )
    except (ValueError, OSError, words.MissingTaggerData) as e:
        # A bad name, no file matching a pattern, an unknown source type, no tagger data.
        raise SystemExit(f"error: {cli.one_line(e)}") from None
    metadata = tfds.builder_from_directory(directory).info.metadata
    summary = {
        "dir": directory,
        **{name: metadata.get(name) for name in captions.COUNT_NAMES[1:]},
        "counts": metadata.get("counts"),
        captions.UNREADABLE_FILES: metadata.get(captions.UNREADABLE_FILES),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
