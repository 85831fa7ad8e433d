"""Converts GroupViT checkpoints between Hugging Face `transformers` and this project.

    python -m mixreorg_jax.convert from-hf --hf_dir DIR --output CKPT
    python -m mixreorg_jax.convert to-hf --checkpoint CKPT --output DIR

A Hugging Face folder is `config.json` + `model.safetensors` of `transformers.GroupViTModel`
(e.g. a download of nvidia/groupvit-gcc-yfcc); it is read and written without torch. CKPT is the
params-only Orbax layout of `mixreorg_jax.formats.model_files` (the trainer's export, what evaluation
reads). The mapping is exact both ways: Linear weights are transposed, the patch convolution goes
from [out, in, p, p] to [p, p, in, out], the projectors' BatchNorm running averages (and
num_batches_tracked) go to `batch_stats`.

The text feature is read at the largest token id (CLIP's end-of-text token), as HF does with its
legacy eos_token_id == 2; configs whose eos_token_id is neither 2 nor vocab_size - 1 are refused.
Dropout settings of HF configs are ignored (this port has none; HF's checkpoints use 0).
"""

import argparse
import sys

from mixreorg_jax.formats import huggingface


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mixreorg_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    from_parser = commands.add_parser("from-hf", help="Hugging Face folder -> model checkpoint")
    from_parser.add_argument(
        "--hf_dir", required=True, help="folder with config.json and model.safetensors"
    )
    from_parser.add_argument("--output", required=True, help="model checkpoint directory to create")
    from_parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output"
    )
    to_parser = commands.add_parser("to-hf", help="model checkpoint -> Hugging Face folder")
    to_parser.add_argument("--checkpoint", required=True, help="model checkpoint directory")
    to_parser.add_argument(
        "--output", required=True, help="folder for config.json and model.safetensors"
    )
    args = parser.parse_args(argv)
    if args.command == "from-hf":
        config = huggingface.from_hf(args.hf_dir, args.output, overwrite=args.overwrite)
        print(
            f"Wrote {args.output} (image {config.image_size}, width {config.width}, "
            f"depths {tuple(config.depths)})"
        )
    else:
        huggingface.to_hf(args.checkpoint, args.output)
        print(f"Wrote {args.output}/config.json and model.safetensors")


if __name__ == "__main__":
    main(sys.argv[1:])
