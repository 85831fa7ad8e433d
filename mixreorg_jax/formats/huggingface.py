"""The Hugging Face `transformers.GroupViTModel` layout, both ways (`python -m mixreorg_jax.convert`).

A Hugging Face folder is `config.json` + `model.safetensors` of `transformers.GroupViTModel`
(e.g. a download of nvidia/groupvit-gcc-yfcc); it is read and written without torch. `from_hf`
reads only those two files; `to_hf` also writes what `transformers.pipeline` and `AutoProcessor`
load (CLIP tokenizer and image processor files) and a model card (formats/hf_export.py). CKPT is the
params-only Orbax layout of `mixreorg_jax.formats.model_files` (the trainer's export, what evaluation
reads). The mapping is exact both ways: Linear weights are transposed, the patch convolution goes
from [out, in, p, p] to [p, p, in, out], the projectors' BatchNorm running averages (and
num_batches_tracked) go to `batch_stats`.

The text feature is read at the largest token id (CLIP's end-of-text token), as HF does with its
legacy eos_token_id == 2; configs whose eos_token_id is neither 2 nor vocab_size - 1 are refused.
Dropout settings of HF configs are ignored (this port has none; HF's checkpoints use 0).
"""

import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from mixreorg_jax import progress
from mixreorg_jax.formats import hf_export, model_files
from mixreorg_jax.models import presets

# transformers' GroupViT defaults, for keys a config.json leaves out.
_HF_VISION_DEFAULTS = dict(
    hidden_size=384,
    intermediate_size=1536,
    depths=[6, 3, 3],
    num_group_tokens=[64, 8, 0],
    num_output_groups=[64, 8, 8],
    num_attention_heads=6,
    image_size=224,
    patch_size=16,
    num_channels=3,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    assign_eps=1.0,
    assign_mlp_ratio=[0.5, 4],
)
_HF_TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=12,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    eos_token_id=49407,
)
_HF_DEFAULTS = dict(
    projection_dim=256, projection_intermediate_dim=4096, logit_scale_init_value=2.6592
)
# HF buffers that are not parameters (older checkpoints saved them).
_HF_IGNORED = ("text_model.embeddings.position_ids",)


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"Only square {name} is supported, got {value}")
        value = value[0]
    return int(value)


def hf_config_to_model_config(
    hf_config: Mapping[str, Any], *, drop_path_rate: float = 0.1
) -> ml_collections.ConfigDict:
    """A `transformers.GroupViTConfig` dict (config.json) -> our model ConfigDict.

    drop_path_rate is not part of HF's config (HF has no stochastic depth); 0.1 is the paper's.
    """
    if hf_config.get("model_type", "groupvit") != "groupvit":
        raise ValueError(f"Not a GroupViT config: model_type={hf_config.get('model_type')!r}")
    # Older config.json files also carry *_config_dict entries, which take precedence (as in HF).
    vision = {
        **_HF_VISION_DEFAULTS,
        **(hf_config.get("vision_config") or {}),
        **(hf_config.get("vision_config_dict") or {}),
    }
    text = {
        **_HF_TEXT_DEFAULTS,
        **(hf_config.get("text_config") or {}),
        **(hf_config.get("text_config_dict") or {}),
    }
    top = {**_HF_DEFAULTS, **hf_config}
    if vision["hidden_act"] != "gelu" or text["hidden_act"] != "quick_gelu":
        raise ValueError(
            "This port implements GELU (vision) and QuickGELU (text); the config has "
            f"{vision['hidden_act']!r} and {text['hidden_act']!r}"
        )
    if vision["layer_norm_eps"] != text["layer_norm_eps"]:
        raise ValueError(
            "This port uses one layer_norm_eps for both towers; the config has "
            f"{vision['layer_norm_eps']} (vision) and {text['layer_norm_eps']} (text)"
        )
    if text["eos_token_id"] not in (2, text["vocab_size"] - 1):
        raise ValueError(
            f"text eos_token_id={text['eos_token_id']}: this port reads the text feature "
            "at the largest token id, which needs eos_token_id == vocab_size - 1 (or 2)"
        )
    ratio = vision["assign_mlp_ratio"]
    ratio = tuple(ratio) if isinstance(ratio, (list, tuple)) else (ratio, ratio)
    config = presets.get_model_config("groupvit_s")
    config.update(
        dict(
            image_size=_square(vision["image_size"], "image_size"),
            patch_size=_square(vision["patch_size"], "patch_size"),
            num_channels=int(vision["num_channels"]),
            width=int(vision["hidden_size"]),
            num_heads=int(vision["num_attention_heads"]),
            mlp_ratio=vision["intermediate_size"] / vision["hidden_size"],
            depths=tuple(int(d) for d in vision["depths"]),
            num_group_tokens=tuple(int(g) for g in vision["num_group_tokens"]),
            num_output_groups=tuple(int(g) for g in vision["num_output_groups"]),
            assign_mlp_ratio=ratio,
            assign_eps=float(vision["assign_eps"]),
            drop_path_rate=drop_path_rate,
            layer_norm_eps=float(vision["layer_norm_eps"]),
            text_width=int(text["hidden_size"]),
            text_layers=int(text["num_hidden_layers"]),
            text_heads=int(text["num_attention_heads"]),
            text_mlp_ratio=text["intermediate_size"] / text["hidden_size"],
            vocab_size=int(text["vocab_size"]),
            context_length=int(text["max_position_embeddings"]),
            projection_dim=int(top["projection_dim"]),
            projection_hidden=int(top["projection_intermediate_dim"]),
            logit_scale_init=float(top["logit_scale_init_value"]),
        )
    )
    return config


def model_config_to_hf_config(config: ml_collections.ConfigDict) -> dict:
    """Our model ConfigDict -> a config.json dict for `transformers.GroupViTModel`."""
    vision = dict(
        model_type="groupvit_vision_model",
        hidden_size=config.width,
        intermediate_size=round(config.mlp_ratio * config.width),
        num_hidden_layers=sum(config.depths),
        depths=list(config.depths),
        num_group_tokens=list(config.num_group_tokens),
        num_output_groups=list(config.num_output_groups),
        num_attention_heads=config.num_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        hidden_act="gelu",
        layer_norm_eps=config.layer_norm_eps,
        dropout=0.0,
        attention_dropout=0.0,
        assign_eps=config.get("assign_eps", 1.0),
        assign_mlp_ratio=list(config.assign_mlp_ratio),
    )
    text = dict(
        model_type="groupvit_text_model",
        vocab_size=config.vocab_size,
        hidden_size=config.text_width,
        intermediate_size=round(config.text_mlp_ratio * config.text_width),
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.context_length,
        hidden_act="quick_gelu",
        layer_norm_eps=config.layer_norm_eps,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=1,
        bos_token_id=config.vocab_size - 2,
        eos_token_id=config.vocab_size - 1,
    )
    return dict(
        architectures=["GroupViTModel"],
        model_type="groupvit",
        projection_dim=config.projection_dim,
        projection_intermediate_dim=config.projection_hidden,
        logit_scale_init_value=config.logit_scale_init,
        text_config=text,
        vision_config=vision,
    )


# Each mapping: HF tensor name -> (our flattened variable path, HF -> ours, ours -> HF).
_Transform = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]
_IDENTITY: _Transform = (lambda a: a, lambda a: a)
_TRANSPOSE: _Transform = (lambda a: a.T, lambda a: a.T)
# torch Conv2d [out, in, kh, kw] <-> [kh, kw, in, out].
_CONV: _Transform = (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))
# num_batches_tracked is int64 in torch; JAX (without x64) keeps an int32 count.
_COUNT: _Transform = (lambda a: a.astype(np.int32), lambda a: a.astype(np.int64))


def hf_name_map(config: ml_collections.ConfigDict) -> dict[str, tuple[str, _Transform]]:
    """{HF GroupViTModel tensor name: (our flattened variable path, (from_hf, to_hf))} for a model.

    Paths are 'params/...' or 'batch_stats/...' (`model_files.flatten_tree`); from_hf and
    to_hf map numpy arrays between the two layouts exactly.
    """
    names: dict[str, tuple[str, _Transform]] = {}

    def linear(hf, ours):
        names[f"{hf}.weight"] = (f"params/{ours}/kernel", _TRANSPOSE)
        names[f"{hf}.bias"] = (f"params/{ours}/bias", _IDENTITY)

    def layer_norm(hf, ours):
        names[f"{hf}.weight"] = (f"params/{ours}/scale", _IDENTITY)
        names[f"{hf}.bias"] = (f"params/{ours}/bias", _IDENTITY)

    def attention(hf, ours):
        for hf_proj, our_proj in (
            ("q_proj", "query"),
            ("k_proj", "key"),
            ("v_proj", "value"),
            ("out_proj", "out"),
        ):
            linear(f"{hf}.{hf_proj}", f"{ours}/{our_proj}")

    def mlp(hf, ours):
        linear(f"{hf}.fc1", f"{ours}/fc1")
        linear(f"{hf}.fc2", f"{ours}/fc2")

    def block(hf, ours):
        layer_norm(f"{hf}.layer_norm1", f"{ours}/norm1")
        attention(f"{hf}.self_attn", f"{ours}/attn")
        layer_norm(f"{hf}.layer_norm2", f"{ours}/norm2")
        mlp(f"{hf}.mlp", f"{ours}/mlp")

    def projector(hf, ours):
        linear(f"{hf}.0", f"{ours}/fc1")
        layer_norm(f"{hf}.1", f"{ours}/bn")
        names[f"{hf}.1.running_mean"] = (f"batch_stats/{ours}/bn/mean", _IDENTITY)
        names[f"{hf}.1.running_var"] = (f"batch_stats/{ours}/bn/var", _IDENTITY)
        names[f"{hf}.1.num_batches_tracked"] = (f"batch_stats/{ours}/bn/count", _COUNT)
        linear(f"{hf}.3", f"{ours}/fc2")

    embeddings = "vision_model.embeddings"
    names[f"{embeddings}.patch_embeddings.projection.weight"] = (
        "params/vision/patch_embed/kernel",
        _CONV,
    )
    names[f"{embeddings}.patch_embeddings.projection.bias"] = (
        "params/vision/patch_embed/bias",
        _IDENTITY,
    )
    layer_norm(f"{embeddings}.layernorm", "vision/patch_norm")
    names[f"{embeddings}.position_embeddings"] = ("params/vision/position_embedding", _IDENTITY)
    for i, depth in enumerate(config.depths):
        hf, ours = f"vision_model.encoder.stages.{i}", f"vision/stages_{i}"
        for j in range(depth):
            block(f"{hf}.layers.{j}", f"{ours}/blocks_{j}")
        if not config.num_group_tokens[i]:
            continue
        names[f"{hf}.group_token"] = (f"params/{ours}/group_tokens", _IDENTITY)
        if i > 0:
            layer_norm(f"{hf}.group_projector.0", f"{ours}/group_projector_norm")
            mlp(f"{hf}.group_projector.1", f"{ours}/group_projector/mlp")
        hf, ours = f"{hf}.downsample", f"{ours}/grouping"
        layer_norm(f"{hf}.norm_tokens", f"{ours}/norm_tokens")
        mlp(f"{hf}.mlp_inter", f"{ours}/token_mlp/mlp")
        layer_norm(f"{hf}.norm_post_tokens", f"{ours}/norm_post_tokens")
        layer_norm(f"{hf}.norm_x", f"{ours}/norm_x")
        attention(f"{hf}.pre_assign_attn.attn", f"{ours}/cross_attn/attn")
        layer_norm(f"{hf}.pre_assign_attn.norm2", f"{ours}/cross_attn/norm_mlp")
        mlp(f"{hf}.pre_assign_attn.mlp", f"{ours}/cross_attn/mlp")
        layer_norm(f"{hf}.pre_assign_attn.norm_post", f"{ours}/cross_attn/norm_post")
        for hf_proj, our_proj in (
            ("q_proj", "query"),
            ("k_proj", "key"),
            ("v_proj", "value"),
            ("proj", "out"),
        ):
            linear(f"{hf}.assign.{hf_proj}", f"{ours}/assign/{our_proj}")
        layer_norm(f"{hf}.norm_new_x", f"{ours}/norm_out")
        mlp(f"{hf}.mlp_channels", f"{ours}/mlp")
    layer_norm("vision_model.layernorm", "vision/norm")

    names["text_model.embeddings.token_embedding.weight"] = (
        "params/text/token_embedding/embedding",
        _IDENTITY,
    )
    names["text_model.embeddings.position_embedding.weight"] = (
        "params/text/position_embedding",
        _IDENTITY,
    )
    for j in range(config.text_layers):
        block(f"text_model.encoder.layers.{j}", f"text/blocks_{j}")
    layer_norm("text_model.final_layer_norm", "text/norm")

    projector("visual_projection", "image_projector")
    projector("text_projection", "text_projector")
    names["logit_scale"] = ("params/logit_scale", _IDENTITY)
    return names


def _expected_hf_shapes(config, names) -> dict[str, tuple]:
    ours = model_files.flatten_tree(model_files.abstract_variables(config))
    mapped = {path for path, _ in names.values()}
    if mapped != set(ours):  # The name map and the model disagree: a bug here, not in the input.
        raise AssertionError(
            f"convert.py's name map and GroupViT differ: unmapped "
            f"{sorted(set(ours) - mapped)}, unknown {sorted(mapped - set(ours))}"
        )
    # Each transform only permutes axes, so it maps shapes when applied to a dummy array.
    return {
        hf: to_hf(np.empty(ours[path].shape, np.int8)).shape
        for hf, (path, (_, to_hf)) in names.items()
    }


def params_from_hf(state_dict: Mapping[str, np.ndarray], config: ml_collections.ConfigDict) -> dict:
    """HF GroupViTModel tensors (numpy) -> our variables {'params', 'batch_stats'} (numpy)."""
    names = hf_name_map(config)
    tensors = {k: v for k, v in state_dict.items() if k not in _HF_IGNORED}
    model_files.check_shapes(
        {k: np.shape(v) for k, v in tensors.items()},
        _expected_hf_shapes(config, names),
        "Hugging Face checkpoint",
    )
    flat = {}
    for hf, (path, (from_hf, _)) in names.items():
        value = np.asarray(tensors[hf])
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        flat[path] = np.asarray(from_hf(value), order="C")
    return model_files.unflatten_tree(flat)


def params_to_hf(
    variables: Mapping[str, Any], config: ml_collections.ConfigDict
) -> dict[str, np.ndarray]:
    """Our variables {'params', 'batch_stats'} -> HF GroupViTModel tensors (numpy)."""
    names = hf_name_map(config)
    flat = {k: np.asarray(v) for k, v in model_files.flatten_tree(variables).items()}
    expected = model_files.flatten_tree(model_files.abstract_variables(config))
    model_files.check_shapes(
        {k: v.shape for k, v in flat.items()},
        {k: v.shape for k, v in expected.items()},
        "variables",
    )
    return {
        hf: np.asarray(to_hf(flat[path]), order="C") for hf, (path, (_, to_hf)) in names.items()
    }


def read_hf_folder(hf_dir: str) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, config.json dict) of a Hugging Face GroupViT folder, read without torch.

    Weights: model.safetensors, or the shards that model.safetensors.index.json lists.
    """
    config_file = os.path.join(hf_dir, "config.json")
    weights_file = os.path.join(hf_dir, "model.safetensors")
    index_file = weights_file + ".index.json"
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"No config.json in {hf_dir}")
    with open(config_file) as f:
        hf_config = json.load(f)
    if os.path.isfile(weights_file):
        return model_files.read_safetensors(weights_file), hf_config
    if os.path.isfile(index_file):
        with open(index_file) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(model_files.read_safetensors(os.path.join(hf_dir, shard)))
        return tensors, hf_config
    hint = ""
    if os.path.exists(os.path.join(hf_dir, "pytorch_model.bin")):
        hint = (
            " (found pytorch_model.bin: only safetensors weights are read; re-save them with "
            "transformers.GroupViTModel.from_pretrained(dir).save_pretrained(new_dir))"
        )
    raise FileNotFoundError(f"No model.safetensors in {hf_dir}{hint}")


def from_hf(hf_dir: str, output: str, *, overwrite: bool = False) -> ml_collections.ConfigDict:
    """Converts a Hugging Face GroupViT folder into a model checkpoint at `output`."""
    tensors, hf_config = read_hf_folder(hf_dir)
    config = hf_config_to_model_config(hf_config)
    model_files.save_model(output, params_from_hf(tensors, config), config, overwrite=overwrite)
    return config


# Model config fields with no Hugging Face counterpart: training and compute settings.
_NOT_IN_HF = ("drop_path_rate", "weight_init", "dtype", "remat")


def check_hf_expressible(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError if the HF config written for `config` describes another model (e.g. an
    MLP ratio whose hidden size is not a whole number) or our tokenizer cannot feed it."""
    back = hf_config_to_model_config(model_config_to_hf_config(config))
    differ = [
        f"{k} {config[k]} -> {back[k]}"
        for k in config
        if k not in _NOT_IN_HF and k in back and config[k] != back[k]
    ]
    if differ:
        raise ValueError(
            "The model has no exact transformers.GroupViTConfig; written and read back it "
            f"changes {', '.join(differ)}"
        )
    if config.vocab_size != _HF_TEXT_DEFAULTS["vocab_size"]:
        raise ValueError(
            f"The model's vocab_size is {config.vocab_size}; the CLIP tokenizer written beside "
            f"it has {_HF_TEXT_DEFAULTS['vocab_size']} tokens"
        )


def _load_checkpoint(model_dir: str) -> tuple[dict, ml_collections.ConfigDict]:
    """`model_files.load_model`, with the errors of a damaged checkpoint said in a line."""
    try:
        return model_files.load_model(model_dir)
    except json.JSONDecodeError as e:
        raise ValueError(f"{model_dir}: the stored model config is not JSON ({e})") from None
    except (ValueError, OSError):  # Missing files and mismatched shapes, named already.
        raise
    except Exception as e:  # Orbax wraps TensorStore's read error (which names the tensor).
        while e.__cause__ or e.__context__:
            e = e.__cause__ or e.__context__
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"{model_dir}: the variables are unreadable ({type(e).__name__}: {first_line})"
        ) from None


def to_hf(
    checkpoint: str,
    output: str,
    preprocessing: hf_export.Preprocessing,
    *,
    overwrite: bool = False,
    command: str = "",
) -> list[str]:
    """Writes the Hugging Face folder `output` from a model checkpoint (or a finished training
    workdir, or its export/): weights, config, tokenizer, image processor and model card
    (formats/hf_export.py). The folder is written beside `output` and moved into place whole.

    Args:
        checkpoint: the model checkpoint, training workdir or WORKDIR/export.
        output: the folder to create; with `overwrite`, an earlier export to replace.
        preprocessing: how this project makes the model's inputs (convert.py fills it in).
        command: the command line that runs this, for the model card.

    Returns:
        The names of the files written, in writing order.
    """
    model_dir, workdir = hf_export.find_model(checkpoint)
    hf_export.check_output(output, overwrite, model_dir)
    logging.info("reading %s", model_dir)
    variables, config = _load_checkpoint(model_dir)
    check_hf_expressible(config)
    if not hf_export.exact_crop(config.image_size, preprocessing.crop_fraction):
        logging.warning(
            "image_size %d: CLIPImageProcessor cannot make our eval crop exactly (see README.md)",
            config.image_size,
        )
    tensors = params_to_hf(variables, config)
    record = hf_export.read_training_record(workdir) if workdir else None
    card = hf_export.model_card(
        config,
        checkpoint=model_dir,
        record=record,
        preprocessing=preprocessing,
        num_params=sum(np.size(v) for v in model_files.flatten_tree(variables["params"]).values()),
        logit_scale=float(np.exp(tensors["logit_scale"])),
        command=command,
    )

    output = os.path.abspath(os.path.expanduser(output))
    os.makedirs(os.path.dirname(output), exist_ok=True)
    staging = f"{output}.partial-{uuid.uuid4().hex[:8]}"
    os.mkdir(staging)
    vocab_dir, length = preprocessing.vocab_dir, config.context_length
    processor = hf_export.preprocessor_config(config.image_size, preprocessing)
    size_mb = sum(t.nbytes for t in tensors.values()) / 2**20
    files = [
        (
            "config.json",
            "transformers.GroupViTConfig",
            lambda path: hf_export.write_json(path, model_config_to_hf_config(config)),
        ),
        (
            "model.safetensors",
            f"{len(tensors)} tensors, {size_mb:.1f} MiB",
            lambda path: model_files.write_safetensors(path, tensors),
        ),
        (
            "vocab.json",
            "CLIP's BPE vocabulary",
            lambda path: shutil.copyfile(os.path.join(vocab_dir, "vocab.json"), path),
        ),
        (
            "merges.txt",
            "CLIP's BPE merges",
            lambda path: shutil.copyfile(os.path.join(vocab_dir, "merges.txt"), path),
        ),
        (
            "tokenizer_config.json",
            f"CLIPTokenizer, model_max_length {length}",
            lambda path: hf_export.write_json(path, hf_export.tokenizer_config(length)),
        ),
        (
            "special_tokens_map.json",
            "CLIPTokenizer's special tokens",
            lambda path: hf_export.write_json(path, hf_export.special_tokens()),
        ),
        (
            "preprocessor_config.json",
            f"CLIPImageProcessor, short side {processor['size']['shortest_edge']}, "
            f"centre crop {config.image_size}",
            lambda path: hf_export.write_json(path, processor),
        ),
        (
            "README.md",
            f"model card, training record from {workdir}" if workdir else "model card",
            lambda path: pathlib.Path(path).write_text(card),
        ),
    ]
    try:
        # Files as open() makes them under the umask (safetensors makes its file private).
        mode = os.stat(staging).st_mode & 0o666
        report = progress.Progress(len(files), f"export {output}", unit="files", every_seconds=0)
        for name, what, write_file in files:
            logging.info("writing %s (%s)", name, what)
            write_file(os.path.join(staging, name))
            os.chmod(os.path.join(staging, name), mode)
            report.update()
        hf_export.replace_folder(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [name for name, _, _ in files]
