r"""Input pipeline throughput: images/s of decode + augment (+ prompts) in one worker.

  python -m mixreorg_jax.benchmark_data                       # 224 px, train augmentation
  python -m mixreorg_jax.benchmark_data --source_size 1280x960 --num_images 100
  python -m mixreorg_jax.benchmark_data --dir ~/tensorflow_datasets/cc12m --pipeline_workers 8

Prints one JSON line. By default the images are synthetic photos-like JPEGs made in memory
(smooth colour fields plus noise, `--source_size`, quality 90); `--dir` uses a prepared dataset
instead. `--pipeline_workers N` (with `--dir`) also times the whole grain pipeline (sharding,
shuffle, augmentation, batching, tokenization) with N worker processes.
"""

import io
import json
import time

import numpy as np
from absl import app, flags
from PIL import Image

from mixreorg_jax import cli
from mixreorg_jax.data import augment, pipeline


def synthetic_jpegs(num: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: bicubically upsampled random colour grids plus pixel noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.float32)
        noisy = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(noisy).save(out, format="JPEG", quality=90)
        images.append(out.getvalue())
    return images


def load_records(
    dataset_dir: str, split: str, num_images: int, source_size: str
) -> tuple[list[dict], str]:
    """(the first `num_images` records of a prepared dataset, or synthetic ones; a description).

    source_size: "WxH" of the synthetic JPEGs (used without `dataset_dir`).
    """
    if dataset_dir:
        spec = pipeline.resolve_datasets({"dir": dataset_dir, "split": split})[0]
        source = pipeline.open_source(spec)
        count = min(num_images, len(source))
        return [source[i] for i in range(count)], f"{spec.dir} {split}"
    try:
        width, height = (int(v) for v in source_size.split("x"))
    except ValueError:
        raise ValueError(f"--source_size must be WxH, e.g. 640x480, got {source_size!r}") from None
    images = synthetic_jpegs(num_images, width, height)
    records = [
        dict(image=b, caption="a dog runs in the park", words=["dog", "runs", "park"])
        for b in images
    ]
    return records, f"synthetic {width}x{height} JPEG q90"


def per_worker_rate(records: list[dict], image_size: int, eval_path: bool) -> float:
    """Images/s of one process decoding and augmenting `records` (after one warm-up pass)."""
    preprocess = pipeline.PreprocessExample(image_size, augment.AugmentOptions())

    def run():
        for index, record in enumerate(records):
            if eval_path:
                augment.eval_image(record["image"], size=image_size)
            else:
                preprocess.random_map(record, np.random.default_rng(index))

    run()
    start = time.perf_counter()
    run()
    return len(records) / (time.perf_counter() - start)


def pipeline_rate(
    dataset_dir: str,
    split: str,
    image_size: int,
    batch_size: int,
    num_workers: int,
    num_batches: int,
) -> float:
    """Images/s of the whole pipeline with `num_workers` workers, after 2 batches."""
    config = pipeline.get_config_defaults()
    config.dir, config.split = dataset_dir, split
    config.image_size = image_size
    config.batch_size = batch_size
    config.worker_count = num_workers
    iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    for _ in range(2):
        next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    rate = num_batches * batch_size / (time.perf_counter() - start)
    iterator.close()
    return rate


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The program's flags. Defined only when it runs (tests define them on their own
    FlagValues): other programs imported beside it in tests have an `--image_size` too."""
    flags.DEFINE_string(
        "dir", "", "A prepared dataset (default: synthetic JPEGs).", flag_values=flag_values
    )
    flags.DEFINE_string("split", "train", "The dataset's split.", flag_values=flag_values)
    flags.DEFINE_integer(
        "num_images", 200, "Images to time.", lower_bound=1, flag_values=flag_values
    )
    flags.DEFINE_string(
        "source_size", "640x480", "Synthetic JPEG size, WxH.", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "image_size", 224, "Output image side.", lower_bound=1, flag_values=flag_values
    )
    flags.DEFINE_bool("eval", False, "Time the eval centre-crop path.", flag_values=flag_values)
    flags.DEFINE_integer(
        "pipeline_workers",
        -1,
        ">= 0: also time the whole pipeline with this many workers (needs --dir).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "batch_size",
        64,
        "Batch size of the pipeline timing.",
        lower_bound=1,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "num_batches", 10, "Timed batches of the pipeline.", lower_bound=1, flag_values=flag_values
    )


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {argv[1:]}")
    f = flag_values  # Short: read on every line below.
    if f.pipeline_workers >= 0 and not f.dir:
        raise SystemExit("error: --pipeline_workers needs --dir (a prepared dataset)")
    try:
        records, source = load_records(f.dir, f.split, f.num_images, f.source_size)
        result = dict(
            images_per_s_per_worker=round(per_worker_rate(records, f.image_size, f.eval), 1),
            path="eval" if f.eval else "train",
            image_size=f.image_size,
            source=source,
            num_images=len(records),
            mean_encoded_kb=round(float(np.mean([len(r["image"]) for r in records])) / 1024, 1),
        )
        if f.pipeline_workers >= 0:
            result["pipeline_workers"] = f.pipeline_workers
            result["pipeline_images_per_s"] = round(
                pipeline_rate(
                    f.dir, f.split, f.image_size, f.batch_size, f.pipeline_workers, f.num_batches
                ),
                1,
            )
    except (ValueError, OSError) as e:  # a missing or unprepared dataset, a bad --source_size
        raise SystemExit(f"error: {cli.one_line(e)}") from None
    print(json.dumps(result))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
