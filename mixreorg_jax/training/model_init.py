"""`config.model_init`: start training from another model's parameters (not its optimiser).

Sources:
- a model checkpoint, a training workdir or a Hugging Face GroupViT folder: every parameter and
  BatchNorm statistic, which must match the model's shapes;
- a Hugging Face `ViTModel`/`DeiTModel` folder (config.json + model.safetensors, read without
  torch), e.g. DeiT-S/16 for GroupViT-S: its patch embedding, position embedding (without the
  class/distillation entries, resized bicubically if the grid differs) and its blocks, in order,
  initialise ours; group tokens, grouping blocks, the post-patch LayerNorm, the final LayerNorm,
  the text tower and the projectors start fresh (docs/method.md §3).
"""

import json
import re

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from mixreorg_jax.formats import huggingface, model_files
from mixreorg_jax.ops import resize
from mixreorg_jax.training import checkpointing
from mixreorg_jax.training import step as train_step

# Hugging Face ViT/DeiT block names -> GroupViT's (both PyTorch Linear/LayerNorm layouts).
_VIT_BLOCK = {
    "attention.attention.query": "self_attn.q_proj",
    "attention.attention.key": "self_attn.k_proj",
    "attention.attention.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "layer_norm1",
    "layernorm_after": "layer_norm2",
}
_VIT_TYPES = ("vit", "deit")
# The image tower up to the first grouping block without its group tokens: what a plain ViT has
# (what backbone pre-training, configs/backbone.py, trains).
BACKBONE = r"params/vision/(patch_embed|patch_norm|position_embedding|stages_0/blocks_\d+)(/.*)?"


def _vit_as_groupvit_tensors(
    tensors: dict, vit_config: dict, config: ml_collections.ConfigDict
) -> dict[str, tuple[str, np.ndarray]]:
    """{HF GroupViT name: (the ViT/DeiT tensor's name, its value)}, the position embedding
    without its class entries and resized to the model's grid."""
    # Classification checkpoints prefix the backbone ("vit.", "deit.").
    prefix = next(
        (
            p
            for p in ("", "vit.", "deit.")
            if f"{p}embeddings.patch_embeddings.projection.weight" in tensors
        ),
        None,
    )
    if prefix is None:
        raise ValueError("not a ViT/DeiT checkpoint: no embeddings.patch_embeddings.projection")
    # A width or patch size that differs shows as a tensor of another shape (`_from_vit`).
    problems = []
    width, layers = vit_config.get("hidden_size"), vit_config.get("num_hidden_layers")
    if layers != sum(config.depths):
        problems.append(
            f"{layers} blocks != the model's {sum(config.depths)} (depths {tuple(config.depths)})"
        )
    if vit_config.get("num_attention_heads") != config.num_heads:
        problems.append(f"{vit_config.get('num_attention_heads')} heads != {config.num_heads}")
    if problems:
        raise ValueError("ViT checkpoint does not fit the model: " + "; ".join(problems))

    out = {}
    embed = "vision_model.embeddings"
    for suffix in ("weight", "bias"):
        name = f"{prefix}embeddings.patch_embeddings.projection.{suffix}"
        out[f"{embed}.patch_embeddings.projection.{suffix}"] = (name, tensors[name])
    grid = config.image_size // config.patch_size
    pos_name = f"{prefix}embeddings.position_embeddings"
    pos = tensors[pos_name][0]
    extra = pos.shape[0] - int(round(np.sqrt(pos.shape[0] - 1))) ** 2  # class (+ distillation)
    pos = pos[extra:]
    side = int(round(np.sqrt(pos.shape[0])))
    pos = pos.reshape(side, side, width)
    if side != grid:
        pos = np.asarray(resize.bicubic_resize(pos, (grid, grid)))
    out[f"{embed}.position_embeddings"] = (pos_name, pos.reshape(1, grid * grid, width))

    layer = 0
    for stage, depth in enumerate(config.depths):
        for j in range(depth):
            for vit_name, ours in _VIT_BLOCK.items():
                for suffix in ("weight", "bias"):
                    name = f"{prefix}encoder.layer.{layer}.{vit_name}.{suffix}"
                    ours_name = f"vision_model.encoder.stages.{stage}.layers.{j}.{ours}.{suffix}"
                    out[ours_name] = (name, tensors[name])
            layer += 1
    return out


def _from_vit(
    shapes: dict, folder: epath.Path, vit_config: dict, config: ml_collections.ConfigDict
) -> dict:
    tensors = model_files.read_safetensors(str(folder / "model.safetensors"))
    names = huggingface.hf_name_map(config)
    loaded = {}
    for hf_name, (vit_name, value) in _vit_as_groupvit_tensors(tensors, vit_config, config).items():
        path, (from_hf, to_hf) = names[hf_name]
        value = np.asarray(value, np.float32)
        needed = to_hf(np.zeros(shapes[path], np.float32)).shape
        if value.shape != needed:
            raise ValueError(
                f"model_init {folder}: {vit_name} has shape {value.shape}; the model needs "
                f"{needed} ({path})"
            )
        loaded[path] = from_hf(value)
    fresh = sorted({p.rsplit("/", 1)[0] for p in shapes if p not in loaded})
    logging.info(
        "model_init from ViT %s: loaded %d tensors (patch and position embedding, %d "
        "blocks); fresh: %s",
        folder,
        len(loaded),
        sum(config.depths),
        ", ".join(fresh),
    )
    return loaded


SCRATCH = ("", "none")  # `config.model_init` values that train from scratch


def check_source(source: str) -> None:
    """Fails with one line naming the flag when `config.model_init` names no existing path."""
    if source.lower() in SCRATCH or epath.Path(source).expanduser().exists():
        return
    raise FileNotFoundError(
        f"config.model_init: {source} does not exist; give a Hugging Face DeiT-S/16 folder "
        "(facebook/deit-small-patch16-224: config.json + model.safetensors), a checkpoint or a "
        "training workdir with --config.model_init=DIR, or --config.model_init=none to train "
        "from scratch"
    )


def load_initial_variables(
    source: str, shapes: dict[str, tuple], config: ml_collections.ConfigDict
) -> dict[str, np.ndarray]:
    """The tensors `source` provides, as {'params/...' or 'batch_stats/...': host array}.

    Args:
      source: see the module docstring.
      shapes: {flat path: shape} of the model's variables {'params', 'batch_stats'}.
      config: the model config.
    """
    folder = epath.Path(source).expanduser()
    hf_config_file = folder / "config.json"
    if hf_config_file.exists():
        hf_config = json.loads(hf_config_file.read_text())
        if hf_config.get("model_type") in _VIT_TYPES:
            if not (folder / "model.safetensors").exists():
                raise FileNotFoundError(
                    f"model_init {source}: a {hf_config['model_type']} folder without "
                    "model.safetensors (the weights are read without torch)"
                )
            return _from_vit(shapes, folder, hf_config, config)
    loaded = model_files.flatten_tree(checkpointing.load_variables(source)[0])
    model_files.check_shapes(
        {k: np.shape(v) for k, v in loaded.items()}, shapes, f"model_init {source}"
    )
    logging.info("model_init: all %d tensors from %s", len(loaded), source)
    return loaded


def initialize(
    state: dict,
    source: str,
    config: ml_collections.ConfigDict,
    state_sharding: dict,
    load: str = ".*",
) -> dict:
    """The train state with the model tensors that `source` provides replaced (same sharding).

    Only the tensors whose flat path `load` (a regex) fully matches are replaced, e.g.
    `BACKBONE` for the patch embedding and stage-1 blocks that configs/backbone.py pre-trains.
    """

    current = model_files.flatten_tree(train_step.model_variables(state))
    shardings = model_files.flatten_tree(train_step.model_variables(state_sharding))
    loaded = load_initial_variables(source, {k: v.shape for k, v in current.items()}, config)
    loaded = {k: v for k, v in loaded.items() if re.fullmatch(load, k)}
    if not loaded:
        raise ValueError(f"model_init_load {load!r} matches none of the tensors in {source}")
    logging.info(
        "model_init_load %r: %d of the model's %d tensors from %s",
        load,
        len(loaded),
        len(current),
        source,
    )
    current.update(
        {k: jax.device_put(v.astype(current[k].dtype), shardings[k]) for k, v in loaded.items()}
    )
    new = model_files.unflatten_tree(current)
    return dict(
        state, params=dict(state["params"], model=new["params"]), batch_stats=new["batch_stats"]
    )
