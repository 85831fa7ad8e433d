"""The synthetic benchmark's driver: run configs, the results table and the plots."""

import json

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from flax import traverse_util

from mixreorg_jax.experiments import synthetic


def test_run_configs_apply_the_run_then_the_common_overrides():
    config = synthetic.run_config("block_size_2", 3, {"total_steps": 7, "optim.lr": 5e-4}, "/w")
    assert (config.seed, config.total_steps, config.optim.lr) == (3, 7, 5e-4)
    assert config.mix.enabled and config.mix.block_size == 2
    assert config.data.synthetic_dir == "/w"
    assert not synthetic.run_config("groupvit", 0, {}, "/w").mix.enabled
    with pytest.raises(ValueError, match="optim.lrr"):
        synthetic.run_config("mixreorg", 0, {"optim.lrr": 1.0}, "/w")
    with pytest.raises(ValueError, match="unknown run 'mixup'"):
        synthetic.run_config("mixup", 0, {}, "/w")


def test_groupvit_and_mixreorg_runs_differ_only_in_the_method():
    """Same world, model, data, schedule and options: the benchmark compares methods."""
    groupvit, mixreorg = (
        traverse_util.flatten_dict(synthetic.run_config(name, 0, {}, "/w").to_dict(), sep=".")
        for name in ("groupvit", "mixreorg")
    )
    assert groupvit.keys() == mixreorg.keys()
    differ = {key for key in groupvit if groupvit[key] != mixreorg[key]}
    # The demo has no caption-contrastive terms, so no restoration loss either; the mixing
    # stages are MixReorg's own (GroupViT's config keeps the base defaults, unused).
    assert differ == {
        "mix.enabled",
        "loss.mixseg",
        "mix.contextual_depth",
        "mix.progressive_weight",
        "mix.progressive_mode",
    }


def test_parse_value():
    assert synthetic.parse_value("3") == 3
    assert synthetic.parse_value("1e-3") == 1e-3
    assert synthetic.parse_value("True") is True
    assert synthetic.parse_value("[1, 2]") == [1, 2]
    assert synthetic.parse_value("group") == "group"


def _summary(name, seed, miou):
    curves = [{"step": s, "contrastive": 4.0 - s / 100, "mixseg": 0.69} for s in (10, 20)]
    baselines = {"group_oracle": {"miou": miou + 0.2}, "all_background": {"miou": 0.08}}
    return dict(
        name=name, seed=seed, miou=miou, baselines=baselines, steps_per_second=2.0, curves=curves
    )


def test_table_gives_mean_and_std_over_seeds_and_the_command():
    summaries = [
        _summary("groupvit", 0, 0.10),
        _summary("groupvit", 1, 0.20),
        _summary("block_size_2", 0, 0.30),
    ]
    table = synthetic.markdown_table(summaries, "python -m x --seeds=0,1")
    assert "| groupvit | - | 15.0 ± 5.0 | 10.0 / 20.0 | 35.0 ± 5.0 | 2.00 |" in table
    assert "| block_size_2 | mix.block_size=2 | 30.0 ± 0.0 | 30.0 | 50.0 ± 0.0 | 2.00 |" in table
    assert "Seeds 0, 1; produced by `python -m x --seeds=0,1`." in table
    assert "All background: 8.0." in table


def test_main_writes_results_table_and_plots(tmp_path, monkeypatch):
    calls = []

    def fake_run_one(name, seed, extra, root, synthetic_dir):
        calls.append((name, seed, extra))
        return _summary(name, seed, 0.1 + seed / 10)

    monkeypatch.setattr(synthetic, "run_one", fake_run_one)
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(
        output_dir=str(tmp_path),
        runs=["groupvit", "ablations"],
        seeds=["0", "1"],
        set=["total_steps=5"],
    ):
        synthetic.main(["synthetic"])
    assert len(calls) == 2 * (1 + len(synthetic.ABLATIONS))
    assert calls[0] == ("groupvit", 0, {"total_steps": 5})
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["runs"]) == len(calls)
    assert (tmp_path / "table.md").read_text().count("\n| ") == 1 + len(synthetic.ABLATIONS)
    assert (
        "--runs=groupvit,ablations --seeds=0,1 --set=total_steps=5`"
        in (tmp_path / "table.md").read_text()
    )
    for name in ("miou.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    with (
        flagsaver.flagsaver(output_dir=str(tmp_path), runs=["mixup"]),
        pytest.raises(SystemExit, match="unknown runs"),
    ):
        synthetic.main(["synthetic"])


def test_steady_speed_leaves_out_the_first_interval_with_compilation():
    metrics = [
        {"step": 20, "examples_per_sec": 5.0},
        {"step": 40, "examples_per_sec": 64.0},
        {"step": 40, "contrastive": 3.0},
        {"step": 60, "examples_per_sec": 128.0},
        {"step": 80, "examples_per_sec": 96.0},
    ]
    assert synthetic.steady_steps_per_second(metrics, 32) == 3.0  # median 96 images/s
    assert np.isnan(synthetic.steady_steps_per_second(metrics[:1], 32))


def test_diagnose_reads_patch_labels_and_reports_every_level(tmp_path):
    import mixreorg_jax
    from mixreorg_jax.data import synthetic as world_lib
    from mixreorg_jax.experiments import diagnose
    from mixreorg_jax.formats import model_files
    from mixreorg_jax.models import groupvit, presets

    world = world_lib.WorldConfig(image_size=32)
    images, present, labels = diagnose._images_and_patch_labels(world, 3, 4)
    assert images.shape == (3, 32, 32, 3) and labels.shape == (3, 64)
    mask = world_lib.generate_example(1, "test", world)["mask"]
    patch = mask[8:12, 4:8]  # patch (row 2, column 1) of the 8 x 8 grid
    assert labels[1, 2 * 8 + 1] == np.bincount(patch.ravel()).argmax()
    assert present[1] == set(np.unique(mask)) - {0}

    config = presets.get_model_config("tiny")
    model_files.save_model(
        str(tmp_path / "model"), groupvit.init_variables(config, jax.random.key(0)), config
    )
    model = mixreorg_jax.load(str(tmp_path / "model"))
    got = diagnose.diagnose(model, world, num_images=6)
    text = np.asarray(model.encode_text([f"a photo of a {n}." for n in world_lib.SHAPE_NAMES[:8]]))
    want_cosine = ((text @ text.T).sum() - np.trace(text @ text.T)) / 56
    np.testing.assert_allclose(got["class_prompt_cosine"], want_cosine, rtol=1e-5)
    assert 0 <= got["image_top_class_present"] <= 1 and 0 <= got["object_segment_accuracy"] <= 1
    assert 1 <= got["groups_per_image"] <= config.num_output_groups[-1]
    assert 0 <= got["object_segments"] <= got["groups_per_image"] * 6

    assert diagnose.training_config(str(tmp_path / "model")) == {}  # not a training workdir
    (tmp_path / "workdir").mkdir()
    (tmp_path / "workdir" / "config.json").write_text(
        '{"data": {"synthetic_world": {"class_texture_prob": 1.0}}}'
    )
    assert diagnose.training_config(str(tmp_path / "workdir")) == {
        "data": {"synthetic_world": {"class_texture_prob": 1.0}}
    }


def test_diagnose_mixing_scores_the_mixed_segments_by_source(tmp_path):
    import mixreorg_jax
    from mixreorg_jax.data import synthetic as world_lib
    from mixreorg_jax.experiments import diagnose
    from mixreorg_jax.formats import model_files
    from mixreorg_jax.models import groupvit, presets
    from mixreorg_jax.training import config as train_config

    # Segment 0 holds one patch of each source, segment 1 two of source 0; image 2: one segment.
    owner = np.array([[0, 0, 1, 1], [5, 5, 5, 5]])
    source = np.array([[0, 1, 0, 0], [1, 1, 1, 0]])
    assert diagnose.majority_share(owner, source) == [0.5, 1.0, 0.75]

    config = presets.get_model_config("tiny")
    model_files.save_model(
        str(tmp_path / "model"), groupvit.init_variables(config, jax.random.key(0)), config
    )
    model = mixreorg_jax.load(str(tmp_path / "model"))
    world = world_lib.WorldConfig(image_size=config.image_size)
    defaults = train_config.base_config().mix.to_dict()
    for mix in (defaults, {**defaults, "group_size": 4, "block_size": 2, "contextual_depth": 0}):
        got = diagnose.diagnose_mixing(model, world, mix, num_images=10)
        k = mix["group_size"]
        for key in ("mixed_segment_source_purity", "shuffled_source_purity"):
            assert 1 / k <= got[key] <= 1, (key, got)
        for key in ("mixed_patch_accuracy_object", "mixed_patch_accuracy_background"):
            assert 0 <= got[key] <= 1, (key, got)
    with pytest.raises(ValueError, match="block_size 3 does not divide"):
        diagnose.diagnose_mixing(model, world, {**defaults, "block_size": 3}, 4)


def test_diagnose_reports_a_missing_model_in_one_line(tmp_path):
    from mixreorg_jax.experiments import diagnose

    with pytest.raises(SystemExit, match="^error: .*nothing"):
        diagnose.run(str(tmp_path / "nothing"))
