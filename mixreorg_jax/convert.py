r"""Converts GroupViT checkpoints between Hugging Face `transformers` and this project.

  python -m mixreorg_jax.convert from-hf --hf_dir DIR --output CKPT [--overwrite]
  python -m mixreorg_jax.convert to-hf --checkpoint CKPT --output DIR [--overwrite]

A Hugging Face folder is `config.json` + `model.safetensors` of `transformers.GroupViTModel`
(e.g. a download of nvidia/groupvit-gcc-yfcc; from-hf reads only those two). CKPT is a model
checkpoint (the trainer's `export/`, what evaluation reads), or a training workdir whose training
finished. to-hf also writes the CLIP tokenizer and image processor files, made to preprocess as
our evaluation does, and a model card (README.md) with the training config, steps and last
evaluation results of CKPT's workdir, so that `transformers.pipeline(
"zero-shot-image-classification", model=DIR)` runs it. The mapping and its limits:
mixreorg_jax/formats/huggingface.py; the other files: mixreorg_jax/formats/hf_export.py.
"""

import logging
import shlex
import sys

from absl import app, flags
from PIL import Image

from mixreorg_jax import cli
from mixreorg_jax.data import augment, tokenizer
from mixreorg_jax.formats import hf_export, huggingface

# The command (the first positional argument) -> the flags it takes, required ones first.
COMMANDS = {
    "from-hf": (("hf_dir", "output"), ("overwrite",)),
    "to-hf": (("checkpoint", "output"), ("overwrite",)),
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
        "checkpoint",
        None,
        "to-hf: the model checkpoint directory, or a finished training workdir.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "output",
        None,
        "from-hf: the model checkpoint directory to create; to-hf: the Hugging Face folder to "
        "create.",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Replace an existing --output (to-hf: only an earlier export or an empty folder).",
        flag_values=flag_values,
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


def preprocessing() -> hf_export.Preprocessing:
    """Our evaluation's inputs, as the data layer makes them: CLIP's BPE vocabulary, the ImageNet
    normalisation and `augment.eval_image`'s bilinear centre crop."""
    return hf_export.Preprocessing(
        vocab_dir=str(tokenizer.cached_vocab_dir()),
        image_mean=augment.IMAGENET_MEAN,
        image_std=augment.IMAGENET_STD,
        crop_fraction=augment.AugmentOptions.eval_crop_fraction,
        resample=int(Image.Resampling.BILINEAR),
    )


def command_line(command: str, flag_values: flags.FlagValues) -> str:
    """The command line that runs `command` with the given flags, for the model card."""
    required, optional = COMMANDS[command]
    args = ["python", "-m", "mixreorg_jax.convert", command]
    for name in required:
        args += [f"--{name}", flag_values[name].value]
    args += [f"--{name}" for name in optional if flag_values[name].value]
    return shlex.join(args)


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
            written = huggingface.to_hf(
                flag_values.checkpoint,
                output,
                preprocessing(),
                overwrite=flag_values.overwrite,
                command=command_line(command, flag_values),
            )
            print(f"Wrote {output}: {', '.join(written)}")
    except (ValueError, OSError) as e:  # missing files, an existing output, a mismatched model
        # Orbax leaves the reads of a damaged checkpoint as coroutines that print their errors
        # when finalised, and as thread-pool reads finishing after its event loop closed, whose
        # callbacks concurrent.futures logs (asyncio its pending tasks), possibly at exit: the
        # error is this line.
        sys.unraisablehook = lambda unraisable: None
        for name in ("asyncio", "concurrent.futures"):
            logging.getLogger(name).disabled = True
        raise SystemExit(f"error: {cli.one_line(e)}") from None


if __name__ == "__main__":
    define_flags()
    cli.quiet_orbax_logs()
    app.run(main, flags_parser=cli.parse_flags)
