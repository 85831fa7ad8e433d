"""Input pipeline throughput: images/s of decode + augment (+ prompts) in one worker.

Prints one JSON line. By default the images are synthetic photos-like JPEGs made in memory
(smooth colour fields plus noise, `--source_size`, quality 90); `--dir` uses a prepared dataset
instead. `--pipeline_workers N` (with `--dir`) also times the whole grain pipeline (sharding,
shuffle, augmentation, batching, tokenization) with N worker processes.

  python -m mixreorg_jax.benchmark_data                       # 224 px, train augmentation
  python -m mixreorg_jax.benchmark_data --source_size 1280x960 --num_images 100
  python -m mixreorg_jax.benchmark_data --dir ~/tensorflow_datasets/cc12m --pipeline_workers 8
"""

import argparse
import io
import json
import time

import numpy as np
from PIL import Image

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


def _records(args) -> tuple[list[dict], str]:
    if args.dir:
        spec = pipeline.resolve_datasets({"datasets": [dict(dir=args.dir, split=args.split)]})[0]
        source = pipeline.open_source(spec)
        count = min(args.num_images, len(source))
        return [source[i] for i in range(count)], f"{spec.dir} {args.split}"
    width, height = (int(v) for v in args.source_size.split("x"))
    images = synthetic_jpegs(args.num_images, width, height)
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


def pipeline_rate(args) -> float:
    """Images/s of the whole pipeline with `args.pipeline_workers` workers, after 2 batches."""
    config = pipeline.get_config_defaults()
    config.datasets = [dict(dir=args.dir, split=args.split, weight=1.0)]
    config.image_size = args.image_size
    config.batch_size = args.batch_size
    config.worker_count = args.pipeline_workers
    iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    for _ in range(2):
        next(iterator)
    start = time.perf_counter()
    for _ in range(args.num_batches):
        next(iterator)
    rate = args.num_batches * args.batch_size / (time.perf_counter() - start)
    iterator.close()
    return rate


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m mixreorg_jax.benchmark_data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dir", default="", help="a prepared dataset (default: synthetic)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_images", type=int, default=200)
    parser.add_argument("--source_size", default="640x480", help="synthetic JPEG WxH")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--eval", action="store_true", help="time the eval centre-crop path")
    parser.add_argument(
        "--pipeline_workers",
        type=int,
        default=-1,
        help=">= 0: also time the whole pipeline with this many workers",
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_batches", type=int, default=10)
    args = parser.parse_args(argv)

    records, source = _records(args)
    result = dict(
        images_per_s_per_worker=round(per_worker_rate(records, args.image_size, args.eval), 1),
        path="eval" if args.eval else "train",
        image_size=args.image_size,
        source=source,
        num_images=len(records),
        mean_encoded_kb=round(float(np.mean([len(r["image"]) for r in records])) / 1024, 1),
    )
    if args.pipeline_workers >= 0:
        if not args.dir:
            parser.error("--pipeline_workers needs --dir (a prepared dataset)")
        result["pipeline_workers"] = args.pipeline_workers
        result["pipeline_images_per_s"] = round(pipeline_rate(args), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
