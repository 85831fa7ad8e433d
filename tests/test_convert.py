"""Hugging Face <-> ours: numerical parity with transformers.GroupViTModel, exact round trips, errors;
the to-hf export that transformers' pipeline and processor load (same rankings, pixels and ids).

torch and transformers are the reference here only; the conversion itself never imports torch.
Graphs are compiled with XLA's CPU optimisation level 0 (several times faster to compile; the
numerics agree with the default level far inside the 1e-4 tolerance).
"""

import functools
import html
import io
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import ftfy
import jax
import numpy as np
import pytest
import torch
import transformers
from absl import flags
from PIL import Image

from mixreorg_jax import convert, losses
from mixreorg_jax.data import augment, tokenizer
from mixreorg_jax.evaluation import inference
from mixreorg_jax.formats import huggingface, model_files
from mixreorg_jax.models import groupvit, presets

EOT = 49407
# What to-hf writes.
EXPORT_FILES = (
    "config.json",
    "model.safetensors",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "README.md",
)
REPO = pathlib.Path(__file__).resolve().parents[1]
fast_jit = functools.partial(
    jax.jit,
    compiler_options={
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
    },
)


def run_convert(argv: list[str]) -> None:
    """`python -m mixreorg_jax.convert ARGV` in this process: its flags on their own FlagValues
    (the global ones hold other programs' flags of the same names)."""
    flag_values = flags.FlagValues()
    convert.define_flags(flag_values)
    convert.main(flag_values(["convert", *argv]), flag_values)


def _small_hf_config(
    width=32,
    heads=2,
    depths=(2, 1, 1),
    group_tokens=(8, 4, 0),
    output_groups=(8, 4, 4),
    image_size=32,
    patch_size=4,
    mlp=4,
    assign_mlp_ratio=(0.5, 4),
    text_width=32,
    text_layers=2,
    text_heads=2,
    context=16,
    projection=(32, 64),
):
    return transformers.GroupViTConfig(
        text_config=dict(
            hidden_size=text_width,
            intermediate_size=mlp * text_width,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            max_position_embeddings=context,
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=mlp * width,
            depths=list(depths),
            num_hidden_layers=sum(depths),
            num_group_tokens=list(group_tokens),
            num_output_groups=list(output_groups),
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
            assign_mlp_ratio=list(assign_mlp_ratio),
        ),
        projection_dim=projection[0],
        projection_intermediate_dim=projection[1],
    )


SMALL_CONFIGS = {
    # The 'tiny' preset's shape.
    "three_stages": dict(),
    # Grouping in every stage, other head count, MLP ratios and patch size.
    "three_groupings": dict(
        width=24,
        heads=3,
        depths=(1, 1, 1),
        group_tokens=(6, 4, 2),
        output_groups=(6, 4, 2),
        image_size=24,
        patch_size=6,
        mlp=2,
        assign_mlp_ratio=(1.0, 2),
        text_width=16,
        text_layers=1,
        context=8,
    ),
}


def _hf_model(hf_config, seed):
    """An HF GroupViTModel in eval mode with every tensor random (BatchNorm running stats included,
    which HF initialises to 0 / 1 and would leave their mapping untested)."""
    torch.manual_seed(seed)
    model = transformers.GroupViTModel(hf_config).eval()
    gen = torch.Generator().manual_seed(seed)
    randn = lambda shape: torch.randn(shape, generator=gen)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(seed + 3)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif name == "logit_scale":
                tensor.fill_(2.0)
            elif tensor.ndim >= 2:
                tensor.copy_(randn(tensor.shape) * min(0.2, tensor.shape[-1] ** -0.5))
            elif name.endswith(".weight"):  # LayerNorm and BatchNorm scales.
                tensor.copy_(1 + 0.1 * randn(tensor.shape))
            else:
                tensor.copy_(0.1 * randn(tensor.shape))
    return model


def _tokens(batch, length, seed):
    """CLIP-like ids: SOT, random BPE ids, EOT (the largest id), zero padding."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int64)
    for i, eot in enumerate(rng.integers(2, length, batch)):
        ids[i, 0] = EOT - 1
        ids[i, 1:eot] = rng.integers(1, EOT - 1, eot - 1)
        ids[i, eot] = EOT
    return ids


def _relative_error(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape
    return np.abs(ours - reference).max() / np.abs(reference).max()


def _hf_image_forward(model, pixels):
    """HF's vision tower + projector at any resolution (its GroupViTModel never interpolates)."""
    vision = model.vision_model
    with torch.no_grad():
        hidden = vision.embeddings(pixels, interpolate_pos_encoding=True)
        encoded = vision.encoder(hidden, output_attentions=True, return_dict=True)
        pooled = vision.layernorm(encoded.last_hidden_state).mean(dim=1)
        embedding = model.visual_projection(pooled)
    return embedding / embedding.norm(dim=-1, keepdim=True), encoded.attentions


def _nhwc(pixels):
    return pixels.permute(0, 2, 3, 1).numpy()


def _ours(config):
    """Jitted (image, text) forward and image-only forward of GroupViT(config) in eval mode."""
    model = groupvit.GroupViT(config)
    both = fast_jit(lambda v, images, tokens: model.apply(v, images, tokens))
    image = fast_jit(
        lambda v, images: model.apply(v, images, method=groupvit.GroupViT.encode_image)
    )
    return both, image


def _assert_matches_hf(hf_model, variables, config, pixels, tokens):
    both, _ = _ours(config)
    with torch.no_grad():
        reference = hf_model(
            input_ids=torch.tensor(tokens), pixel_values=pixels, output_attentions=True
        )
    ours = both(variables, _nhwc(pixels), tokens)
    assert _relative_error(ours["image_embedding"], reference.image_embeds) < 1e-4
    assert _relative_error(ours["text_embedding"], reference.text_embeds) < 1e-4
    assert _relative_error(ours["logits_per_image"], reference.logits_per_image) < 1e-4
    hf_maps = reference.vision_model_output.attentions
    assert len(ours["soft_assignments"]) == len(hf_maps)
    for soft, hf_map in zip(ours["soft_assignments"], hf_maps):
        # HF: [B, G, N]; ours token -> group [B, N, G].
        assert _relative_error(soft, hf_map.transpose(1, 2)) < 1e-4


def _assert_image_matches_hf(hf_model, variables, config, pixels):
    _, image = _ours(config)
    reference, hf_maps = _hf_image_forward(hf_model, pixels)
    ours = image(variables, _nhwc(pixels))
    assert _relative_error(ours["embedding"], reference) < 1e-4
    assert len(ours["soft_assignments"]) == len(hf_maps)
    for soft, hf_map in zip(ours["soft_assignments"], hf_maps):
        assert _relative_error(soft, hf_map.transpose(1, 2)) < 1e-4


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """(HF model, its saved folder) for the 'three_stages' config."""
    hf_config = _small_hf_config(**SMALL_CONFIGS["three_stages"])
    model = _hf_model(hf_config, seed=0)
    folder = str(tmp_path_factory.mktemp("hf_tiny"))
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_small_models_match_hf_through_the_cli(name, tmp_path):
    hf_config = _small_hf_config(**SMALL_CONFIGS[name])
    hf_model = _hf_model(hf_config, seed=1)
    hf_model.save_pretrained(tmp_path / "hf")
    run_convert(["from-hf", "--hf_dir", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt")])
    variables, config = model_files.load_model(str(tmp_path / "ckpt"))
    size = hf_config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    _assert_matches_hf(
        hf_model,
        variables,
        config,
        pixels,
        _tokens(2, hf_config.text_config.max_position_embeddings, seed=3),
    )


def test_small_model_matches_hf_at_twice_the_resolution(tiny_hf):
    hf_model, folder = tiny_hf
    tensors, hf_config = huggingface.read_hf_folder(folder)
    config = huggingface.hf_config_to_model_config(hf_config)
    variables = huggingface.params_from_hf(tensors, config)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    _assert_image_matches_hf(hf_model, variables, config, pixels)


def test_groupvit_s_matches_hf_at_224_and_448(tmp_path):
    # HF's default GroupViTConfig is GroupViT-S.
    hf_model = _hf_model(transformers.GroupViTConfig(), seed=5)
    hf_model.save_pretrained(tmp_path)
    tensors, hf_config = huggingface.read_hf_folder(str(tmp_path))
    config = huggingface.hf_config_to_model_config(hf_config)
    expected = presets.get_model_config("groupvit_s").to_dict()
    # HF rounds the initial logit scale to 2.6592 ~ log(1 / 0.07); it is only an initial value.
    assert abs(config.logit_scale_init - expected.pop("logit_scale_init")) < 1e-4
    assert {k: v for k, v in config.to_dict().items() if k != "logit_scale_init"} == expected
    variables = huggingface.params_from_hf(tensors, config)
    del tensors
    gen = torch.Generator().manual_seed(6)
    _assert_matches_hf(
        hf_model,
        variables,
        config,
        torch.randn(2, 3, 224, 224, generator=gen),
        _tokens(2, 77, seed=7),
    )
    _assert_image_matches_hf(
        hf_model, variables, config, torch.randn(1, 3, 448, 448, generator=gen)
    )


def test_round_trip_reproduces_every_tensor(tiny_hf, tmp_path):
    hf_model, folder = tiny_hf
    run_convert(["from-hf", "--hf_dir", folder, "--output", str(tmp_path / "ckpt")])
    run_convert(["to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")])
    original = model_files.read_safetensors(os.path.join(folder, "model.safetensors"))
    exported = model_files.read_safetensors(str(tmp_path / "hf" / "model.safetensors"))
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert np.array_equal(exported[name], tensor), name

    reloaded, info = transformers.GroupViTModel.from_pretrained(
        str(tmp_path / "hf"), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reloaded_state = reloaded.state_dict()
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(reloaded_state[name], tensor), name

    # A full folder (weights, config, tokenizer and image processor files, as nvidia/groupvit-gcc-
    # yfcc is laid out): ours, and the same with the processor saved by transformers.
    assert set(EXPORT_FILES) <= set(os.listdir(tmp_path / "hf"))
    full = tmp_path / "hf_full"
    hf_model.save_pretrained(full)
    transformers.AutoProcessor.from_pretrained(str(tmp_path / "hf")).save_pretrained(full)
    first, _ = model_files.load_model(str(tmp_path / "ckpt"))
    for name, folder in (("from_export", tmp_path / "hf"), ("from_full", full)):
        run_convert(["from-hf", "--hf_dir", str(folder), "--output", str(tmp_path / name)])
        again, _ = model_files.load_model(str(tmp_path / name))
        flat, flat_again = model_files.flatten_tree(first), model_files.flatten_tree(again)
        assert set(flat_again) == set(flat)
        assert all(np.array_equal(flat_again[k], flat[k]) for k in flat), name


def test_sharded_hf_folder_reads_like_a_single_file(tiny_hf, tmp_path):
    hf_model, folder = tiny_hf
    hf_model.save_pretrained(tmp_path, max_shard_size="2MB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    sharded, _ = huggingface.read_hf_folder(str(tmp_path))
    single, _ = huggingface.read_hf_folder(folder)
    assert set(sharded) == set(single)
    assert all(np.array_equal(sharded[name], single[name]) for name in single)


@pytest.mark.parametrize("preset", ["tiny", "demo", "groupvit_s"])
def test_config_mapping_round_trips(preset):
    config = presets.get_model_config(preset)
    back = huggingface.hf_config_to_model_config(
        huggingface.model_config_to_hf_config(config), drop_path_rate=config.drop_path_rate
    )
    assert back.to_dict() == config.to_dict()
    # transformers accepts what we write.
    hf_config = transformers.GroupViTConfig(**huggingface.model_config_to_hf_config(config))
    assert hf_config.vision_config.num_output_groups == list(config.num_output_groups)


def test_mismatched_shapes_missing_and_unexpected_tensors_are_named(tiny_hf):
    _, folder = tiny_hf
    tensors, hf_config = huggingface.read_hf_folder(folder)
    wider = huggingface.hf_config_to_model_config(hf_config)
    wider.width = 48
    with pytest.raises(ValueError) as error:
        huggingface.params_from_hf(tensors, wider)
    assert (
        "shape mismatch vision_model.embeddings.position_embeddings: expected (1, 64, 48), "
        "got (1, 64, 32)" in str(error.value)
    )

    config = huggingface.hf_config_to_model_config(hf_config)
    tensors = dict(tensors)
    del tensors["visual_projection.1.running_mean"]
    tensors["vision_model.encoder.stages.0.extra"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as error:
        huggingface.params_from_hf(tensors, config)
    assert "missing visual_projection.1.running_mean (expected shape (64,))" in str(error.value)
    assert "unexpected vision_model.encoder.stages.0.extra (shape (3,))" in str(error.value)


def test_hf_folder_whose_config_disagrees_with_its_weights(tiny_hf, tmp_path):
    _, folder = tiny_hf
    with open(os.path.join(folder, "config.json")) as f:
        hf_config = json.load(f)
    hf_config["text_config"]["max_position_embeddings"] = 20
    os.symlink(os.path.join(folder, "model.safetensors"), tmp_path / "model.safetensors")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf_config, f)
    with pytest.raises(
        SystemExit,
        match=r"^error: .*text_model\.embeddings\.position_embedding\.weight: "
        r"expected \(20, 32\), got \(16, 32\)",
    ):
        run_convert(["from-hf", "--hf_dir", str(tmp_path), "--output", str(tmp_path / "ckpt")])
    assert not os.path.exists(tmp_path / "ckpt")


def test_checkpoint_loaded_into_another_model_shape(tiny_hf, tmp_path):
    _, folder = tiny_hf
    config = huggingface.from_hf(folder, str(tmp_path / "ckpt"))
    other = config.copy_and_resolve_references()
    other.num_group_tokens = (6, 4, 0)
    other.num_output_groups = (6, 4, 4)
    with pytest.raises(
        ValueError,
        match=r"shape mismatch params/vision/stages_0/group_tokens: "
        r"expected \(1, 6, 32\), got \(1, 8, 32\)",
    ):
        model_files.load_model(str(tmp_path / "ckpt"), other)
    with pytest.raises(FileExistsError, match="already exists"):
        huggingface.from_hf(folder, str(tmp_path / "ckpt"))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(SystemExit, match="^error: No config.json in"):
        run_convert(["from-hf", "--hf_dir", str(tmp_path), "--output", str(tmp_path / "out")])
    (tmp_path / "config.json").write_text(
        json.dumps(huggingface.model_config_to_hf_config(presets.get_model_config("tiny")))
    )
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        SystemExit, match="^error: No model.safetensors in .*found pytorch_model.bin"
    ):
        run_convert(["from-hf", "--hf_dir", str(tmp_path), "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="^error: No model checkpoint directory at .*nowhere"):
        run_convert(
            ["to-hf", "--checkpoint", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]
        )
    with pytest.raises(FileNotFoundError, match="model_config/metadata is missing"):
        model_files.load_model(str(tmp_path))


def test_unsupported_hf_configs_are_refused():
    hf_config = huggingface.model_config_to_hf_config(presets.get_model_config("tiny"))
    hf_config["vision_config"]["hidden_act"] = "relu"
    with pytest.raises(ValueError, match="GELU"):
        huggingface.hf_config_to_model_config(hf_config)
    with pytest.raises(ValueError, match="Not a GroupViT config"):
        huggingface.hf_config_to_model_config({"model_type": "clip"})


def test_cli_help():
    """The real command line (its own process): absl shows the module docstring, and exits 1."""
    result = subprocess.run(
        [sys.executable, "-m", "mixreorg_jax.convert", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    out = result.stdout
    assert "from-hf" in out and "to-hf" in out
    assert out.startswith(convert.__doc__) and "--hf_dir" in out and "--overwrite" in out


def test_commands_and_their_flags_are_checked_in_one_line(tmp_path):
    for argv, message in [
        (["--output", "o"], "got none"),
        (["from_hf", "--output", "o"], "got 'from_hf'"),
        (["to-hf", "from-hf"], "got 'to-hf from-hf'"),
    ]:
        with pytest.raises(SystemExit) as error:
            run_convert(argv)
        assert str(error.value) == (
            "error: name one command, from-hf (Hugging Face folder -> model checkpoint) or "
            f"to-hf (model checkpoint -> Hugging Face folder); {message}"
        )
    with pytest.raises(SystemExit, match="^error: from-hf needs --hf_dir and --output$"):
        run_convert(["from-hf"])
    with pytest.raises(SystemExit, match="^error: to-hf needs --output$"):
        run_convert(["to-hf", "--checkpoint", "c"])
    with pytest.raises(SystemExit, match="^error: to-hf does not take --hf_dir$"):
        run_convert(["to-hf", "--checkpoint", "c", "--output", "o", "--hf_dir", "h", "--overwrite"])


# ---------------------------------------------------------------- the export transformers loads
# A model made at 28 px: 28 / 0.875 = 32 px is a whole number with an even margin, so
# CLIPImageProcessor's crop of a square picture is our eval crop exactly (as at 224 -> 256).
EXPORT_IMAGE_SIZE = 28
LABELS = ("cat", "dog", "car", "tree", "boat", "house")
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model checkpoint, its to-hf export) of a random 28-px model (every tensor random)."""
    root = tmp_path_factory.mktemp("export")
    hf_config = _small_hf_config(image_size=EXPORT_IMAGE_SIZE)
    _hf_model(hf_config, seed=8).save_pretrained(root / "hf_source")
    checkpoint, export = str(root / "ckpt"), str(root / "export")
    huggingface.from_hf(str(root / "hf_source"), checkpoint)
    run_convert(["to-hf", "--checkpoint", checkpoint, "--output", export])
    return checkpoint, export


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def _pictures() -> list[np.ndarray]:
    """Square uint8 RGB pictures of other sizes and kinds: noise, blobs, stripes, halves."""
    rng = np.random.default_rng(9)
    blobs = Image.fromarray(rng.integers(0, 256, (6, 6, 3), np.uint8)).resize((100, 100))
    stripes = np.zeros((56, 56, 3), np.uint8)
    stripes[:, ::8] = (250, 40, 10)
    halves = np.zeros((90, 90, 3), np.uint8)
    halves[:, :45] = (20, 200, 60)
    halves[:, 45:] = (30, 30, 220)
    return [
        rng.integers(0, 256, (64, 64, 3), np.uint8),
        np.asarray(blobs),
        stripes,
        halves,
        rng.integers(0, 256, (EXPORT_IMAGE_SIZE, EXPORT_IMAGE_SIZE, 3), np.uint8),
    ]


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_pipeline_classifies_as_our_zero_shot_classification(exported):
    checkpoint, export = exported
    variables, config = model_files.load_model(checkpoint)
    pictures = _pictures()
    # Ours: the classification evaluator's class embeddings and eval crop, cosine scores.
    embedder = inference.Embedder(config, None, batch=len(pictures))
    variables = embedder.place(variables)
    class_emb = embedder.class_embeddings(variables, LABELS, (TEMPLATE,))
    images = np.stack([augment.eval_image(_png(p), size=config.image_size) for p in pictures])
    cosines = np.asarray(embedder.image_embeddings(variables, images) @ class_emb.T)
    ranks = np.argsort(-cosines, axis=1)
    # Not degenerate: the pictures rank the classes differently, and no two scores nearly tie.
    assert len({tuple(r) for r in ranks}) >= 3
    assert np.diff(np.sort(cosines, axis=1), axis=1).min() > 5e-4
    probabilities = _softmax(
        float(losses.logit_scale(variables["params"]["logit_scale"])) * cosines
    )

    classify = transformers.pipeline("zero-shot-image-classification", model=export)
    for picture, rank, probs in zip(pictures, ranks, probabilities):
        results = classify(
            Image.fromarray(picture), candidate_labels=list(LABELS), hypothesis_template=TEMPLATE
        )
        assert [r["label"] for r in results] == [LABELS[i] for i in rank]
        np.testing.assert_allclose([r["score"] for r in results], probs[rank], atol=1e-4)


def test_processor_pixels_are_our_eval_crop(exported):
    _, export = exported
    processor = transformers.AutoProcessor.from_pretrained(export)
    std_levels = 255 * np.array(augment.IMAGENET_STD)

    def both(pixels):
        """(ours, transformers') float[28, 28, 3] of a uint8 picture."""
        ours = augment.eval_image(_png(pixels), size=EXPORT_IMAGE_SIZE)
        theirs = processor(images=Image.fromarray(pixels), return_tensors="np").pixel_values
        return ours, theirs[0].transpose(1, 2, 0)

    rng = np.random.default_rng(10)
    # Square pictures, and others that vary only across their short side: the same pixels, to
    # float rounding (CLIPImageProcessor scales to [0, 1], then normalises; we do it in one step).
    across_short_side = [
        np.repeat(rng.integers(0, 256, (48, 1, 3), np.uint8), 80, axis=1),
        np.repeat(rng.integers(0, 256, (1, 61, 3), np.uint8), 97, axis=0),
    ]
    for pixels in [*_pictures(), *across_short_side]:
        ours, theirs = both(pixels)
        assert np.abs(ours - theirs).max() < 1e-5, pixels.shape

    # Along the long side CLIPImageProcessor rounds the resized length and its crop offset down
    # to whole pixels: on a ramp of 3 levels a source pixel, its crop sits less than one output
    # pixel off ours (a uint8 rounding of each adds at most 1/4.5 pixel to the measure).
    height, width, slope = 48, 80, 3
    ramp = np.broadcast_to(
        (slope * np.arange(width, dtype=np.uint8))[None, :, None], (height, width, 3)
    )
    ours, theirs = both(np.ascontiguousarray(ramp))
    source_pixels_per_output_pixel = height * 0.875 / EXPORT_IMAGE_SIZE
    offset = (ours - theirs) * std_levels / slope / source_pixels_per_output_pixel
    assert np.abs(offset).max() < 1


def test_processor_tokenizes_as_ours(exported):
    _, export = exported
    hf_tokenizer = transformers.AutoProcessor.from_pretrained(export).tokenizer
    context_length = 16  # the model's

    def hf_ids(texts):
        """Ids padded with 0, as ours (CLIPTokenizer pads with the end token)."""
        tokens = hf_tokenizer(texts, padding="max_length", truncation=True, return_tensors="np")
        return np.where(tokens.attention_mask, tokens.input_ids, 0)

    ours = tokenizer.get_tokenizer(context_length)
    plain = [
        "a photo of a cat.",
        "Two DOGS   playing\tin the snow!",
        "it's 3 o'clock, isn't it?",
        "a caption far too long for sixteen tokens, which both tokenizers cut the same way",
    ]
    np.testing.assert_array_equal(hf_ids(plain), ours(plain))
    # Ours cleans text with ftfy and html.unescape (twice); CLIPTokenizer does not (README.md).
    dirty = ["fish &amp; chips", "caf\u00c3\u00a9 au lait", "&amp;quot;quoted&amp;quot;"]
    assert all(not np.array_equal(h, o) for h, o in zip(hf_ids(dirty), ours(dirty)))
    cleaned = [html.unescape(html.unescape(ftfy.fix_text(text))) for text in dirty]
    np.testing.assert_array_equal(hf_ids(cleaned), ours(dirty))


def _write_workdir(workdir: pathlib.Path) -> None:
    """A training workdir's config.json and metrics.jsonl (the trainer's layout), no training."""
    config = dict(
        seed=3,
        model=dict(image_size=EXPORT_IMAGE_SIZE),
        data=dict(datasets=[dict(dir="/data/cc12m", split="train", weight=1.0)], batch_size=64),
        total_steps=30,
        optim=dict(lr=1e-3),
        mix=dict(enabled=True, group_size=2),
        loss=dict(contrastive=1.0, multi_label=0.0, mixseg=4.0),
    )
    (workdir / "config.json").write_text(json.dumps(config, indent=2))
    lines = [
        dict(step=10, total=3.5),
        {"step": 10, "voc/miou": 0.125},
        dict(step=20, total=3.0),
        {"step": 20, "voc/miou": 0.25, "imagenet/top1": 0.5},
        dict(step=30, total=2.5),
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (workdir / "metrics.jsonl").write_text(text + '{"step": 3')  # a line cut short by a crash


def test_model_card_records_the_training_workdir(exported, tmp_path):
    checkpoint, export = exported
    workdir = tmp_path / "run"
    shutil.copytree(checkpoint, workdir / "export")
    _write_workdir(workdir)
    for name, source in (("workdir", workdir), ("export", workdir / "export")):
        out = tmp_path / f"hf_{name}"
        run_convert(["to-hf", "--checkpoint", str(source), "--output", str(out)])
        card = (out / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: transformers\n")
        assert "# MixReorg (mixreorg_jax export)" in card
        assert "Steps trained: 30 (the last step in metrics.jsonl)." in card
        assert "| voc/miou | 0.2500 | 20 |" in card and "| imagenet/top1 | 0.5000 | 20 |" in card
        assert "0.1250" not in card  # only the last evaluation
        assert "`/data/cc12m`, split `train`" in card and "mixseg 4" in card
        assert f"python -m mixreorg_jax.convert to-hf --checkpoint {source} --output {out}" in card
        assert "width 32, 2 heads" in card and "context 16 tokens" in card

    # A checkpoint outside a workdir: what is known.
    card = pathlib.Path(export, "README.md").read_text()
    assert "# GroupViT (mixreorg_jax export)" in card
    assert "is not part of a training workdir" in card and "No in-loop evaluation" in card
    # Its processor settings, as the card states them.
    with open(os.path.join(export, "preprocessor_config.json")) as f:
        processor = json.load(f)
    assert processor["size"] == {"shortest_edge": 32} and processor["resample"] == 2
    assert processor["crop_size"] == {"height": EXPORT_IMAGE_SIZE, "width": EXPORT_IMAGE_SIZE}
    assert "resized (bilinear) to 32 px" in card


def _cli_error(argv: list[str]) -> str:
    """The error line of `python -m mixreorg_jax.convert ARGV` run in its own process, after
    checking that it fails without a traceback and that the line is its last output."""
    result = subprocess.run(
        [sys.executable, "-m", "mixreorg_jax.convert", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode != 0 and not result.stdout
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_existing_output_is_refused_in_one_line_by_the_cli(exported, tmp_path):
    checkpoint, _ = exported
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    error = _cli_error(["to-hf", "--checkpoint", checkpoint, "--output", str(out)])
    assert error == f"error: {out} exists; --overwrite replaces it"
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only an earlier export (or an empty folder) and never the checkpoint.
    with pytest.raises(SystemExit, match=r"^error: .*hf is not a Hugging Face folder"):
        run_convert(["to-hf", "--checkpoint", checkpoint, "--output", str(out), "--overwrite"])
    with pytest.raises(SystemExit, match=r"^error: .* holds the checkpoint"):
        run_convert(["to-hf", "--checkpoint", checkpoint, "--output", checkpoint, "--overwrite"])
    assert (out / "keep.txt").exists() and os.path.isdir(os.path.join(checkpoint, "variables"))


def test_overwrite_replaces_an_earlier_export(exported, tmp_path, caplog):
    checkpoint, export = exported
    out = tmp_path / "hf"
    shutil.copytree(export, out)
    (out / "stale.txt").write_text("from before")
    caplog.set_level(logging.INFO)
    run_convert(["to-hf", "--checkpoint", checkpoint, "--output", str(out), "--overwrite"])
    done = f"export {out}: {len(EXPORT_FILES)}/{len(EXPORT_FILES)} files (100%) in "
    assert any(r.getMessage().startswith(done) for r in caplog.records)  # progress, one per file
    assert sorted(os.listdir(out)) == sorted(EXPORT_FILES)
    assert not [p for p in os.listdir(tmp_path) if p != "hf"]  # no staging folder left
    assert (out / "model.safetensors").read_bytes() == pathlib.Path(
        export, "model.safetensors"
    ).read_bytes()


def test_unusable_checkpoints_are_named_in_one_line(exported, tmp_path):
    checkpoint, _ = exported
    # Its stored config describes another model than its variables.
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    config_file = other / "model_config" / "metadata"
    config_file.write_text(
        config_file.read_text().replace('"context_length": 16', '"context_length": 20')
    )
    with pytest.raises(SystemExit) as error:
        run_convert(["to-hf", "--checkpoint", str(other), "--output", str(tmp_path / "a")])
    assert "\n" not in str(error.value)
    assert "shape mismatch params/text/position_embedding: expected (20, 32), got (16, 32)" in str(
        error.value
    )
    # A damaged tensor file: TensorStore's error, which names the tensor, in a line. (In a process
    # of its own: Orbax leaves its failed reads' coroutines to the garbage collector.)
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    data = max(damaged.glob("variables/**/d/*"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:1000])
    error = _cli_error(["to-hf", "--checkpoint", str(damaged), "--output", str(tmp_path / "b")])
    assert error.startswith(f"error: {damaged}: the variables are unreadable (ValueError: ")
    assert '"params.' in error  # the tensor
    # A training workdir whose training has not finished.
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit, match="training workdir without export/"):
        run_convert(
            ["to-hf", "--checkpoint", str(tmp_path / "unfinished"), "--output", str(tmp_path / "x")]
        )
    assert not [p for p in os.listdir(tmp_path) if p in ("a", "b", "x")]


def test_models_without_an_exact_hf_config_are_refused():
    config = presets.get_model_config("tiny")
    huggingface.check_hf_expressible(config)
    config.mlp_ratio = 4.1  # a hidden size of 131.2 at width 32
    with pytest.raises(ValueError, match="no exact transformers.GroupViTConfig.*mlp_ratio 4.1"):
        huggingface.check_hf_expressible(config)
    config = presets.get_model_config("tiny")
    config.vocab_size = 1000
    with pytest.raises(ValueError, match="vocab_size is 1000; the CLIP tokenizer"):
        huggingface.check_hf_expressible(config)
