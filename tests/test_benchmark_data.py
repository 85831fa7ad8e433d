"""The input-pipeline benchmark (benchmark_data.py) on tiny inputs: its JSON line and its errors."""

import io
import json

import numpy as np
import pytest
from absl import flags
from PIL import Image

from mixreorg_jax import benchmark_data
from mixreorg_jax.data import captions


def run_benchmark(argv: list[str], capsys) -> dict:
    """`python -m mixreorg_jax.benchmark_data ARGV` in this process (its flags on their own
    FlagValues: the global ones hold other programs' flags of the same names); its JSON line."""
    flag_values = flags.FlagValues()
    benchmark_data.define_flags(flag_values)
    benchmark_data.main(flag_values(["benchmark_data", *argv]), flag_values)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_synthetic_jpegs_train_and_eval_paths(capsys):
    images = benchmark_data.synthetic_jpegs(2, 48, 32)
    assert [Image.open(io.BytesIO(b)).size for b in images] == [(48, 32), (48, 32)]
    for extra, path in (([], "train"), (["--eval"], "eval")):
        result = run_benchmark(
            ["--num_images", "3", "--source_size", "48x32", "--image_size", "32", *extra], capsys
        )
        assert result["images_per_s_per_worker"] > 0 and result["num_images"] == 3
        assert result["path"] == path and result["image_size"] == 32
        assert result["source"] == "synthetic 48x32 JPEG q90" and result["mean_encoded_kb"] > 0
        assert "pipeline_images_per_s" not in result


def test_a_prepared_dataset_and_the_whole_pipeline(tmp_path, capsys):
    lines = []
    for i in range(6):
        pixels = np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.jpg", quality=90)
        lines.append(f"{i}.jpg\ta dog in the park {i}")
    (tmp_path / "captions.tsv").write_text("\n".join(lines) + "\n")
    directory = captions.prepare(
        "bench",
        str(tmp_path / "captions.tsv"),
        data_dir=str(tmp_path / "tfds"),
        tag=lambda tokens: [(t, "NN") for t in tokens],
    )
    argv = ["--dir", directory, "--num_images", "4", "--image_size", "16"]
    result = run_benchmark(
        [*argv, "--pipeline_workers", "0", "--batch_size", "2", "--num_batches", "1"], capsys
    )
    assert result["num_images"] == 4 and result["source"] == f"{directory} train"
    assert result["pipeline_workers"] == 0 and result["pipeline_images_per_s"] > 0


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^error: --pipeline_workers needs --dir"):
        run_benchmark(["--pipeline_workers", "2"], capsys)
    with pytest.raises(SystemExit, match=r"^error: --source_size must be WxH, e.g. 640x480"):
        run_benchmark(["--source_size", "640"], capsys)
    with pytest.raises(SystemExit, match=r"^error: .*is not a prepared TFDS dataset"):
        run_benchmark(["--dir", str(tmp_path)], capsys)
