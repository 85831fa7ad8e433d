r"""Converts GroupViT checkpoints between Hugging Face `transformers` and this project.

  python -m mixreorg_jax.convert from-hf --hf_dir DIR --output CKPT [--overwrite]
  python -m mixreorg_jax.convert to-hf --checkpoint CKPT --output DIR

A Hugging Face folder is `config.json` + `model.safetensors` of `transformers.GroupViTModel`
(e.g. a download of nvidia/groupvit-gcc-yfcc); CKPT is a model checkpoint (the trainer's
`export/`, what evaluation reads). The mapping and its limits: mixreorg_jax/formats/huggingface.py.
"""

from absl import app, flags

from mixreorg_jax import cli
from mixreorg_jax.formats import huggingface

# The command (the first positional argument) -> the flags it takes, required ones first.
COMMANDS = {
    "from-hf": (("hf_dir", "output"), ("overwrite",)),
    "to-hf": (("checkpoint", "output"), ()),
}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The program's flags. Defined only when it runs (tests define them on their own
    FlagValues): other programs imported beside it in tests have a `--checkpoint` too."""
    flags.DEFINE_string(
        "hf_dir",
        None,
        "from-hf: the Hugging Face folder (config.json and model.safetensors).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "checkpoint", None, "to-hf: the model checkpoint directory.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "output",
        None,
        "from-hf: the model checkpoint directory to create; to-hf: the folder for config.json "
        "and model.safetensors.",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "overwrite", False, "from-hf: replace an existing --output.", flag_values=flag_values
    )


def _command(argv: list[str], flag_values: flags.FlagValues) -> str:
    """The command named in `argv`, after checking that its flags, and only those, are given."""
    if len(argv) != 2 or argv[1] not in COMMANDS:
        got = f"got {' '.join(argv[1:])!r}" if len(argv) > 1 else "got none"
        raise SystemExit(
            "error: name one command, from-hf (Hugging Face folder -> model checkpoint) or "
            f"to-hf (model checkpoint -> Hugging Face folder); {got}"
        )
    command = argv[1]
    required, optional = COMMANDS[command]
    missing = [f"--{name}" for name in required if not flag_values[name].value]
    if missing:
        raise SystemExit(f"error: {command} needs {' and '.join(missing)}")
    others = {name for names in COMMANDS.values() for group in names for name in group}
    stray = sorted(f"--{n}" for n in others - {*required, *optional} if flag_values[n].present)
    if stray:
        raise SystemExit(f"error: {command} does not take {' or '.join(stray)}")
    return command


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    command = _command(argv, flag_values)
    output = flag_values.output
    try:
        if command == "from-hf":
            config = huggingface.from_hf(
                flag_values.hf_dir, output, overwrite=flag_values.overwrite
            )
            print(
                f"Wrote {output} (image {config.image_size}, width {config.width}, "
                f"depths {tuple(config.depths)})"
            )
        else:
            huggingface.to_hf(flag_values.checkpoint, output)
            print(f"Wrote {output}/config.json and model.safetensors")
    except (ValueError, OSError) as e:  # missing files, an existing output, a mismatched model
        raise SystemExit(f"error: {cli.one_line(e)}") from None


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
