"""Model configs for GroupViT (docs/method.md §1): `get_model_config(name)`.

Fields (all read by `mixreorg_jax.models.groupvit`):
  image_size, patch_size, num_channels: the input the model is made for; other sizes that are a
      multiple of patch_size also run (the position embedding is resized bicubically).
  width, num_heads, mlp_ratio: the vision transformer.
  depths, num_group_tokens, num_output_groups: per stage; a stage with 0 group tokens does no
      grouping. Stage i > 0 with group tokens derives them from stage i-1's group tokens, so stage
      i-1 must output as many groups as it has group tokens.
  assign_mlp_ratio: (token-mixing hidden / width, channel MLP hidden / width) of the grouping blocks.
  assign_eps: added to each group's token count when averaging its tokens' values (1.0).
  drop_path_rate: stochastic depth, rising linearly from 0 over all vision blocks (training only).
  layer_norm_eps: every LayerNorm, vision and text.
  text_width, text_layers, text_heads, text_mlp_ratio, vocab_size, context_length: the causal
      text transformer (CLIP BPE ids; the end-of-text id must be the largest id in a sequence).
  projection_dim, projection_hidden: the two projectors (in -> hidden -> BatchNorm -> ReLU -> out).
  logit_scale_init: initial log of the image-text logit scale.
  weight_init: 'groupvit' (truncated normal, std 0.02, as GroupViT and HF) or 'lecun_normal'
      (std 1/sqrt(fan_in), larger at small widths; see groupvit.weight_init).
  dtype: compute dtype, 'float32' or 'bfloat16' (parameters are always float32).
  remat: rematerialise the transformer and grouping blocks in the backward pass (saves
      activation memory; `python -m mixreorg_jax.benchmark --memory_only` measures it).
"""

import math

import ml_collections


def _groupvit_s() -> ml_collections.ConfigDict:
    """GroupViT-S, the paper-scale model, 55.7M parameters (Xu et al. 2022; HF nvidia/groupvit-gcc-*)."""
    return ml_collections.ConfigDict(
        dict(
            image_size=224,
            patch_size=16,
            num_channels=3,
            width=384,
            num_heads=6,
            mlp_ratio=4.0,
            depths=(6, 3, 3),
            num_group_tokens=(64, 8, 0),
            num_output_groups=(64, 8, 8),
            assign_mlp_ratio=(0.5, 4.0),
            assign_eps=1.0,
            drop_path_rate=0.1,
            layer_norm_eps=1e-5,
            text_width=256,
            text_layers=12,
            text_heads=4,
            text_mlp_ratio=4.0,
            vocab_size=49408,
            context_length=77,
            projection_dim=256,
            projection_hidden=4096,
            logit_scale_init=math.log(1 / 0.07),
            weight_init="groupvit",
            dtype="float32",
            remat=False,
        )
    )


def _tiny() -> ml_collections.ConfigDict:
    """0.14M parameters (plus the 1.6M-entry CLIP token table) for CPU unit tests."""
    config = _groupvit_s()
    config.update(
        dict(
            image_size=32,
            patch_size=4,
            width=32,
            num_heads=2,
            depths=(2, 1, 1),
            num_group_tokens=(8, 4, 0),
            num_output_groups=(8, 4, 4),
            drop_path_rate=0.0,
            text_width=32,
            text_layers=2,
            text_heads=2,
            context_length=16,
            projection_dim=32,
            projection_hidden=64,
        )
    )
    return config


def _demo() -> ml_collections.ConfigDict:
    """A small model that trains on two CPU cores in minutes (the synthetic world, 32 px)."""
    config = _groupvit_s()
    config.update(
        dict(
            image_size=32,
            patch_size=4,
            width=64,
            num_heads=2,
            depths=(3, 1, 1),
            num_group_tokens=(16, 8, 0),
            num_output_groups=(16, 8, 8),
            drop_path_rate=0.0,
            text_width=64,
            text_layers=2,
            text_heads=2,
            context_length=24,
            projection_dim=64,
            projection_hidden=256,
        )
    )
    return config


_PRESETS = {"groupvit_s": _groupvit_s, "tiny": _tiny, "demo": _demo}


def get_model_config(name: str) -> ml_collections.ConfigDict:
    """Returns a fresh (unlocked) copy of the preset `name`: 'groupvit_s', 'tiny' or 'demo'."""
    if name not in _PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; known presets: {sorted(_PRESETS)}")
    return _PRESETS[name]()
