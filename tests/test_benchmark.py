"""The benchmark: its memory report (what the forward pass saves for the backward pass), TPU
slices compiled for ahead of time, and the fair comparison with PyTorch."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from mixreorg_jax import benchmark
from mixreorg_jax.training import config as train_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def saved_bytes(remat: bool, mix: bool) -> int:
    config = train_config.from_file(f"{REPO}/configs/mixreorg.py:tiny")
    config = benchmark.variant(config, mix=mix)
    config.data.batch_size = 16
    config.model.remat = remat
    _, _, abstract, _, batch, mesh = benchmark.build_step(config)
    with jax.set_mesh(mesh):
        return benchmark.saved_for_backward_bytes(config, abstract, batch)


def test_remat_shrinks_what_the_forward_pass_saves():
    for mix in (False, True):
        plain, remat = saved_bytes(False, mix), saved_bytes(True, mix)
        # Block remat keeps each block's input instead of its attention and MLP activations.
        assert 0 < remat < 0.7 * plain, (mix, plain, remat)
    # MixReorg's extra branches are saved too.
    assert saved_bytes(False, True) > saved_bytes(False, False)


def test_devices_given_ahead_of_time_get_an_abstract_batch_of_the_same_shapes():
    # The `--topology` path: devices that may not exist here, so the batch is shapes only.
    config = train_config.from_file(f"{REPO}/configs/mixreorg.py:tiny")
    config.data.batch_size = 16
    _, _, abstract, _, concrete, _ = benchmark.build_step(config)
    _, _, _, _, shapes, mesh = benchmark.build_step(config, jax.devices())
    assert set(shapes) == set(concrete)
    for name, array in concrete.items():
        assert isinstance(shapes[name], jax.ShapeDtypeStruct)
        assert (shapes[name].shape, shapes[name].dtype) == (array.shape, array.dtype), name
        assert shapes[name].sharding == array.sharding, name
    with jax.set_mesh(mesh):
        assert benchmark.saved_for_backward_bytes(
            config, abstract, shapes
        ) == benchmark.saved_for_backward_bytes(config, abstract, concrete)


def test_tpu_slices_are_named_as_cloud_tpu_or_libtpu_names_them():
    chip, topology, shape = benchmark.parse_slice("v4-64")  # TensorCores: 32 chips
    assert (topology, shape, chip.peak_bf16_flops, chip.hbm_bytes) == (
        "v4:2x4x4",
        (2, 4, 4),
        275e12,
        32 * 2**30,
    )
    assert benchmark.parse_slice("v5litepod-16")[1:] == ("v5e:4x4", (4, 4))  # chips
    assert benchmark.parse_slice("v5e-16")[1] == "v5e:4x4"
    assert benchmark.parse_slice("v5e:2x2")[1:] == ("v5e:2x2", (2, 2))
    assert benchmark.parse_slice("v4:2x2x1")[1:] == ("v4:2x2x1", (2, 2, 1))


def test_a_bad_tpu_slice_is_a_one_line_error():
    for name, words in [
        ("v4-63", "no TPU slice 'v4-63'"),
        ("v4-6", "known: v4-8, v4-16"),
        ("v4:2x2", "a v4 topology is v4:NxNxN"),
        ("tpu-v4", "unknown TPU slice 'tpu-v4'; try `v4-64`"),
    ]:
        with pytest.raises(ValueError) as error:
            benchmark.parse_slice(name)
        assert words in str(error.value) and "\n" not in str(error.value), error.value
    # The command line: one line on stderr, before any compiling.
    result = subprocess.run(
        [sys.executable, "-m", "mixreorg_jax.benchmark", "--config", "configs/mixreorg.py:tiny"]
        + ["--topology", "v4-63"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert result.returncode != 0, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no TPU slice 'v4-63'")
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not benchmark.libtpu_installed(), reason="needs libtpu (jax[tpu])")
def test_the_tiny_step_compiled_for_a_tpu_slice_reports_consistent_numbers():
    # XLA's TPU compiler, ahead of time, on this CPU: the `--topology` path, one variant.
    config = train_config.from_file(f"{REPO}/configs/mixreorg.py:tiny")
    result = benchmark.topology_report(
        config, "v4-8", variants=("mixreorg",), mfu=0.5, train_samples=1000, epochs=30
    )
    assert (result["accelerator_type"], result["chips"], result["device_kind"]) == (
        "v4-8",
        4,
        "TPU v4",
    )
    assert result["train_steps"] == math.ceil(30 * 1000 / config.data.batch_size)
    assert "groupvit_step" not in result
    memory, step = result["mixreorg_memory"], result["mixreorg_step"]
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "generated_code_bytes"):
        assert memory[key] > 0, key
    assert memory["peak_bytes_per_device"] == (
        memory["argument_bytes"]
        + memory["output_bytes"]
        + memory["temp_bytes"]
        - memory["alias_bytes"]
    )
    assert memory["alias_bytes"] > 0  # The state is donated: the new one reuses its buffers.
    assert memory["total_bytes_per_device"] == (
        memory["peak_bytes_per_device"] + memory["generated_code_bytes"]
    )
    assert memory["fits_hbm"] and memory["total_bytes_per_device"] < 2**30
    assert step["flops_per_chip"] > 0 and step["flops"] == 4 * step["flops_per_chip"]
    assert step["flops_per_example"] == pytest.approx(step["flops"] / config.data.batch_size)
    assert step["step_s"] == pytest.approx(step["flops"] / (4 * 275e12 * 0.5))
    assert step["examples_per_s"] == pytest.approx(config.data.batch_size / step["step_s"])
    assert step["chip_hours"] == pytest.approx(result["train_steps"] * step["step_s"] * 4 / 3600)
    assert step["slice_days"] == pytest.approx(step["chip_hours"] / 4 / 24)
    assert step["compile_s"] > 0
    assert json.loads(json.dumps(result)) == result  # What the command line prints.
    table = benchmark.markdown_table(result)
    assert table.count("\n") == 3 and "| mixreorg |" in table and "(fits)" in table


# ---------------------------------------------------------------- against PyTorch
def test_each_side_runs_in_a_fresh_process_alternating_between_rounds(monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        side = next(a.split("=")[1] for a in command if a.startswith("--side="))
        dtype = next(a.split("=")[1] for a in command if a.startswith("--config.model.dtype="))
        calls.append((side, dtype))
        assert "glibc.malloc.hugetlb=1" in kwargs["env"]["GLIBC_TUNABLES"]  # both sides alike
        rate = {"ours": 30.0, "pytorch": 10.0}[side] + len(calls)  # a different rate each run
        line = json.dumps({"images_per_sec": rate, "side": side, "dtype": dtype})
        return subprocess.CompletedProcess(command, 0, stdout=f"log\n{line}\n", stderr="")

    monkeypatch.setattr(benchmark.subprocess, "run", fake_run)
    result = benchmark.compare_with_pytorch(
        ["--config=c.py:tiny"], ["float32"], rounds=3, threads=2, steps=1, warmup=0
    )
    assert [side for side, _ in calls] == ["ours", "pytorch", "pytorch", "ours", "ours", "pytorch"]
    ours, pytorch = result["float32"]["ours"], result["float32"]["pytorch"]
    assert [r["images_per_sec"] for r in ours["runs"]] == [31.0, 34.0, 35.0]
    assert (ours["images_per_sec_median"], ours["images_per_sec_min"]) == (34.0, 31.0)
    assert pytorch["images_per_sec_median"] == 13.0  # of 12, 13, 16
    assert result["float32"]["ours_over_pytorch"] == 34.0 / 13.0


@pytest.mark.parametrize("piece", benchmark.PIECES[1:])
def test_pieces_time_the_same_computation_on_both_sides(piece):
    """Each piece runs on both sides at the tiny model's shapes, in both dtypes."""
    import torch

    config = train_config.from_file(f"{REPO}/configs/mixreorg.py:tiny")
    config.data.batch_size = 2
    threads = torch.get_num_threads()
    try:
        for dtype in benchmark.DTYPES:
            config.model.dtype = dtype
            for side in benchmark.SIDES:
                timed = benchmark.time_piece(config, side, piece, steps=1, warmup=0, threads=1)
                assert timed["images_per_sec"] > 0 and timed["call_ms"] > 0, (side, dtype)
    finally:
        torch.set_num_threads(threads)  # this worker's other tests


@pytest.mark.parametrize("piece", benchmark.ELEMENTWISE_PIECES)
def test_elementwise_pieces_compute_the_same_gradient_on_both_sides(piece):
    """fp32: ours and PyTorch's give the same input gradient of the output's sum."""
    config = train_config.from_file(f"{REPO}/configs/mixreorg.py:tiny")
    m = config.model
    m.dtype = "float32"
    width = round(m.width * m.mlp_ratio) if piece == "gelu" else m.width
    x = np.random.default_rng(0).standard_normal((2, 5, width), dtype=np.float32) * 2
    ours = benchmark._our_piece(m, piece, [x])()[1]
    _, (theirs,) = benchmark._pytorch_piece(m, piece, [x], threads=1)()
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-5, atol=1e-5)


def test_cpu_info_names_the_model_and_its_matmul_features():
    info = benchmark.cpu_info()
    assert info["model"] and info["logical_cpus"] == os.cpu_count()
    assert set(benchmark.CPU_FEATURES) <= set(info)


def test_against_pytorch_from_the_command_line_passes_the_config_to_both_sides():
    result = subprocess.run(
        [sys.executable, "-m", "mixreorg_jax.benchmark", "--config", "configs/mixreorg.py:tiny"]
        + ["--config.data.batch_size=8", "--against=pytorch", "--rounds=1", "--dtypes=bfloat16"]
        + ["--steps=1", "--warmup=0", "--threads=1", "--pieces=matmul"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[0])
    assert report["cpu"] == benchmark.cpu_info() and report["threads"] == 1
    for piece in ("matmul",):
        for side in benchmark.SIDES:
            (run,) = report["comparison"][piece]["bfloat16"][side]["runs"]
            assert (run["side"], run["piece"], run["dtype"]) == (side, piece, "bfloat16")
            assert run["threads"] == 1 and run["batch_size"] == 8 and run["images_per_sec"] > 0
            assert "glibc.malloc.hugetlb=1" in run["glibc_tunables"]
    assert lines[-1].startswith("| matmul | bfloat16 |")
    assert report["cpu"]["model"] in result.stdout
