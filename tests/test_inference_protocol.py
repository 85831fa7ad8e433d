"""Inference that fits the model: each checkpoint's own segmentation protocol (recorded by
`model_files.save_model`, derived from the model config for older checkpoints), and the memory
check that refuses a protocol whose crops would not fit, in one line."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

import mixreorg_jax
from mixreorg_jax import api
from mixreorg_jax.evaluation import inference, segmentation_settings
from mixreorg_jax.formats import model_files
from mixreorg_jax.models import presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# GroupViT's published protocol (docs/method.md §2) and the demo model's own resolution.
GROUPVIT_S = dict(short_side=448, max_long=2048, window=448, stride=224, top_k=5)
DEMO = dict(short_side=32, max_long=2048, window=32, stride=16, top_k=5)
REFUSAL = (
    "error: a 448-px window is 12544 tokens for this model (patch 4): ~47.5 GiB per batch of "
    "8 crops, more than the 1.0 GiB set by MIXREORG_MEMORY_LIMIT_GIB; lower --window/--short_side "
    "(the model was trained at 32 px)"
)


def random_variables(config):
    """Random weights drawn in numpy (initialising the model would compile it for nothing)."""
    rng = np.random.default_rng(0)

    def leaf(path, shape):
        if np.issubdtype(shape.dtype, np.integer):
            return np.zeros(shape.shape, shape.dtype)
        if "'var'" in jax.tree_util.keystr(path):
            return np.ones(shape.shape, shape.dtype)
        return (rng.standard_normal(shape.shape) * 0.3).astype(shape.dtype)

    return jax.tree_util.tree_map_with_path(leaf, model_files.abstract_variables(config))


@pytest.fixture(scope="module")
def demo_variables():
    return random_variables(presets.get_model_config("demo"))


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory, demo_variables):
    """A training workdir of the demo model as the trainer leaves it: its model in `export/`."""
    workdir = tmp_path_factory.mktemp("workdirs") / "mixreorg_demo"
    config = presets.get_model_config("demo")
    model_files.save_model(str(workdir / "export"), demo_variables, config)
    return str(workdir)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A 200 x 150 picture."""
    image = np.random.default_rng(1).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    image[40:110, 60:140] = (220, 30, 30)
    path = tmp_path_factory.mktemp("pictures") / "PIC.jpg"
    Image.fromarray(image).save(path)
    return str(path)


def segment_command(checkpoint, picture, output, *flags, env=None):
    """The README's command as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "mixreorg_jax.segment", f"--checkpoint={checkpoint}"]
        + ["--image", picture, "--classes", "circle,square,heart", "--output", output]
        + list(flags),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, **(env or {})),
        timeout=300,
    )


def test_each_preset_picks_its_own_protocol(demo_workdir, tmp_path):
    assert model_files.default_inference(presets.get_model_config("groupvit_s")) == GROUPVIT_S
    assert model_files.default_inference(presets.get_model_config("demo")) == DEMO
    assert api.Model({"params": {}}, presets.get_model_config("groupvit_s")).protocol == GROUPVIT_S

    # The demo's export records its protocol; loading the workdir or the export takes it.
    export = os.path.join(demo_workdir, "export")
    with open(os.path.join(export, "inference", "metadata")) as f:
        assert json.load(f) == DEMO
    assert model_files.read_inference(export) == DEMO
    assert mixreorg_jax.load(demo_workdir).protocol == DEMO
    assert mixreorg_jax.load(export).protocol == DEMO

    # An explicit protocol is recorded as given; a malformed one is refused.
    config = presets.get_model_config("demo")
    variables, _ = model_files.load_model(export)
    own = dict(DEMO, window=64, stride=48)
    model_files.save_model(str(tmp_path / "own"), variables, config, inference=own)
    assert mixreorg_jax.load(str(tmp_path / "own")).protocol == own
    for bad in (dict(DEMO, window=0), {"window": 32}, dict(DEMO, stride=1.5)):
        with pytest.raises(ValueError, match="inference"):
            model_files.save_model(str(tmp_path / "bad"), variables, config, inference=bad)
    assert not os.path.exists(tmp_path / "bad")


def test_checkpoint_without_a_recorded_protocol_still_loads(demo_variables, tmp_path):
    # The layout `save_model` wrote before it recorded protocols: variables and model config.
    config = presets.get_model_config("demo")
    path = str(tmp_path / "old")
    ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(
            variables=ocp.StandardCheckpointHandler(), model_config=ocp.JsonCheckpointHandler()
        )
    ).save(
        path,
        args=ocp.args.Composite(
            variables=ocp.args.StandardSave(demo_variables),
            model_config=ocp.args.JsonSave(json.loads(config.to_json())),
        ),
    )
    assert not os.path.exists(os.path.join(path, "inference"))
    variables, loaded_config = model_files.load_model(path)
    assert loaded_config.to_dict() == config.to_dict()
    np.testing.assert_array_equal(
        variables["params"]["logit_scale"], demo_variables["params"]["logit_scale"]
    )
    assert model_files.read_inference(path) == DEMO
    assert mixreorg_jax.load(path).protocol == DEMO


def test_memory_estimate_is_the_documented_bound():
    tiny = presets.get_model_config("tiny")
    # 32 px, patch 4: 64 patches + 8 group tokens; 2 heads, width 32, MLP ratio 4, 8 groups.
    tokens = 64 + 8
    per_crop = 5 * 2 * tokens**2 + (6 + 2 * 4) * tokens * 32 + 2 * 8 * 32 * 32
    assert inference.window_batch_bytes(tiny, (32, 32), 3) == 4 * 3 * per_crop
    demo, groupvit_s = presets.get_model_config("demo"), presets.get_model_config("groupvit_s")
    # The 448-px protocol on the demo model went past 24 GiB before the OOM killer stopped it.
    assert inference.window_batch_bytes(demo, (448, 448), 8) > 24 * 2**30
    assert inference.window_batch_bytes(demo, (32, 32), 8) < 0.01 * 2**30
    assert inference.window_batch_bytes(groupvit_s, (448, 448), 8) < 2 * 2**30
    # The largest crop is bounded by the resized picture: short side x max_long.
    assert inference.crop_size(short_side=32, max_long=2048, window=448) == (32, 448)
    assert inference.crop_size(short_side=448, max_long=300, window=448) == (448, 300)


def test_available_memory(monkeypatch):
    class Device:
        platform = "gpu"

        def __init__(self, in_use):
            self.in_use = in_use

        def memory_stats(self):
            return {"bytes_limit": 10 * 2**30, "bytes_in_use": self.in_use}

    monkeypatch.delenv(inference.MEMORY_LIMIT_ENV, raising=False)
    assert inference.available_memory([Device(2**30), Device(3 * 2**30)]) == (
        7 * 2**30,
        "GiB free per GPU",
        True,
    )
    available, what, per_device = inference.available_memory(jax.local_devices())
    assert 0 < available <= inference.host_available_memory() + 2**30
    assert what == "GiB of host memory available" and not per_device
    monkeypatch.setenv(inference.MEMORY_LIMIT_ENV, "0.5")
    assert inference.available_memory([Device(0)])[0] == 2**29


def test_oversized_requests_are_refused_before_running(demo_workdir, monkeypatch):
    monkeypatch.setenv(inference.MEMORY_LIMIT_ENV, "1")
    demo = presets.get_model_config("demo")
    sizes = dict(short_side=448, max_long=2048, window=448)
    with pytest.raises(ValueError, match=r"lower window/short_side \(the model was trained at 32"):
        inference.check_memory(demo, batch=8, **sizes)
    # A smaller batch is suggested where crops of that size fit.
    with pytest.raises(ValueError, match=r"or --batch \(4 crops fit\)$"):
        inference.check_memory(
            demo, batch=8, flag_prefix="--", short_side=192, max_long=2048, window=192
        )
    inference.check_memory(demo, batch=8, **dict(sizes, short_side=32, window=32))

    # The Python handle and the evaluator (the eval binary's VOC protocol) refuse before running.
    model = mixreorg_jax.load(demo_workdir)
    image = np.zeros((150, 200, 3), np.uint8)
    with pytest.raises(ValueError, match="12544 tokens"):
        model.segment(image, ["circle"], window=448, short_side=448)
    voc = segmentation_settings.default_config("voc")
    with pytest.raises(ValueError, match="12544 tokens"):
        segmentation_settings.make_segmenter(voc, demo, None)
    voc.update(dict(short_side=32, window=32, stride=16))
    assert segmentation_settings.make_segmenter(voc, demo, None).window == 32


def test_readme_command_fits_the_demo_model_and_oversized_flags_are_refused(
    demo_workdir, picture, tmp_path
):
    output = str(tmp_path / "out.png")
    result = segment_command(demo_workdir, picture, output)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "short_side 32, max_long 2048, window 32, stride 16, top_k 5" in result.stdout
    for path in (output, str(tmp_path / "out_mask.png")):
        with Image.open(path) as written:
            assert written.size == (200, 150)

    result = segment_command(
        demo_workdir,
        picture,
        str(tmp_path / "big.png"),
        "--window",
        "448",
        "--short_side",
        "448",
        env={inference.MEMORY_LIMIT_ENV: "1"},
    )
    assert result.returncode == 1  # refused, not killed (a signal is negative)
    assert result.stderr.strip().splitlines()[-1] == REFUSAL
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "big.png")
