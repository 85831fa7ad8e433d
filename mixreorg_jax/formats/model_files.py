"""Model checkpoints (params only, Orbax) and safetensors files.

A model checkpoint is a directory PATH that `save_model` writes and `load_model` reads; the
trainer's final export and `python -m mixreorg_jax.convert from-hf` write it, evaluation reads it:

    PATH/_CHECKPOINT_METADATA   Orbax step metadata
    PATH/variables/             Orbax StandardCheckpointHandler item:
                                {'params': ..., 'batch_stats': ...} of models.groupvit.GroupViT
    PATH/model_config/metadata  Orbax JsonCheckpointHandler item: the model ConfigDict
                                (models/presets.py fields) as JSON
    PATH/inference/metadata     Orbax JsonCheckpointHandler item: the zero-shot segmentation
                                protocol the model is run with by default (`INFERENCE_FIELDS`;
                                absent from checkpoints written before it was recorded, whose
                                protocol `read_inference` derives from the model config)

That is one step of an Orbax CompositeCheckpointHandler with the items 'variables',
'model_config' and 'inference': a CheckpointManager step directory with those item names has the
same layout. No optimiser state: training checkpoints live elsewhere (the trainer's
CheckpointManager).
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

from mixreorg_jax.models import groupvit

_VARIABLES = "variables"
_MODEL_CONFIG = "model_config"
_INFERENCE = "inference"
# The zero-shot protocol's sizes in pixels and its classes kept per window (docs/method.md §2):
# the fields of the 'inference' item, named as `evaluation.inference.segment`'s arguments.
INFERENCE_FIELDS = ("short_side", "max_long", "window", "stride", "top_k")
# GroupViT's released protocol for its 224-px, patch-16 models (docs/method.md §2, step 5).
GROUPVIT_PROTOCOL = dict(short_side=448, max_long=2048, window=448, stride=224, top_k=5)


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {'a/b/c': leaf}."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': leaf} -> nested dicts."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def check_shapes(got: Mapping[str, tuple], expected: Mapping[str, tuple], source: str) -> None:
    """Raises ValueError listing mismatched shapes, missing and unexpected names (if any).

    Args:
        got, expected: {name: shape}.
        source: what `got` came from, for the message (a path).
    """
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(
        name for name in set(got) & set(expected) if tuple(got[name]) != tuple(expected[name])
    )
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source} does not match the model:"]
    lines += [
        f"  shape mismatch {name}: expected {tuple(expected[name])}, got {tuple(got[name])}"
        for name in mismatched
    ]
    lines += [f"  missing {name} (expected shape {tuple(expected[name])})" for name in missing]
    lines += [f"  unexpected {name} (shape {tuple(got[name])})" for name in unexpected]
    raise ValueError("\n".join(lines))


def abstract_variables(config: ml_collections.ConfigDict) -> dict:
    """The ShapeDtypeStructs of GroupViT(config)'s variables, without computing them."""
    return jax.eval_shape(lambda key: groupvit.init_variables(config, key), jax.random.key(0))


def config_from_json_dict(values: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """JSON turns tuples into lists; the model config keeps tuples (hashable, comparable)."""
    return ml_collections.ConfigDict(
        {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    )


def default_inference(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The protocol a model is run with when its checkpoint records none.

    A 224-px model with 16-px patches (GroupViT-S, the Hugging Face GroupViTs) gets GroupViT's
    published protocol, `GROUPVIT_PROTOCOL`; any other model its training resolution: window and
    short side = image_size, stride = window // 2 (as the synthetic evaluation, docs/method.md
    §2), with the published max_long and top_k.
    """
    if (config.image_size, config.patch_size) == (224, 16):
        return dict(GROUPVIT_PROTOCOL)
    size = config.image_size
    return dict(GROUPVIT_PROTOCOL, short_side=size, window=size, stride=max(size // 2, 1))


def check_inference(inference: Mapping[str, Any], source: str) -> dict[str, int]:
    """`inference` as a protocol: exactly `INFERENCE_FIELDS`, each a positive int; raises
    ValueError naming `source` otherwise."""
    if set(inference) != set(INFERENCE_FIELDS):
        raise ValueError(
            f"{source}: an inference protocol has the fields {', '.join(INFERENCE_FIELDS)}, "
            f"got {', '.join(sorted(inference))}"
        )
    for name, value in inference.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(
                f"{source}: inference {name} must be a positive integer, got {value!r}"
            )
    return {name: int(inference[name]) for name in INFERENCE_FIELDS}


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(
            **{
                _VARIABLES: ocp.StandardCheckpointHandler(),
                _MODEL_CONFIG: ocp.JsonCheckpointHandler(),
                _INFERENCE: ocp.JsonCheckpointHandler(),
            }
        )
    )


def save_model(
    path: str,
    variables: Mapping[str, Any],
    config: ml_collections.ConfigDict,
    *,
    inference: Mapping[str, int] | None = None,
    overwrite: bool = False,
) -> None:
    """Writes {'params', 'batch_stats'}, the model config and the inference protocol to the
    directory `path` (see module doc).

    Args:
        inference: the protocol to record (`INFERENCE_FIELDS`); default `default_inference(config)`.

    Checks the variables against GroupViT(config) first, so a checkpoint always loads.
    """
    inference = check_inference(
        default_inference(config) if inference is None else inference, "save_model"
    )
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    expected = flatten_tree(abstract_variables(config))
    check_shapes(
        {k: np.shape(v) for k, v in flatten_tree(variables).items()},
        {k: v.shape for k, v in expected.items()},
        "variables to save",
    )
    _checkpointer().save(
        path,
        args=ocp.args.Composite(
            **{
                _VARIABLES: ocp.args.StandardSave(variables),
                _MODEL_CONFIG: ocp.args.JsonSave(json.loads(config.to_json())),
                _INFERENCE: ocp.args.JsonSave(inference),
            }
        ),
        force=overwrite,
    )


def read_model_config(path: str) -> ml_collections.ConfigDict:
    """The model config stored in the checkpoint directory `path`."""
    path = os.path.abspath(path)
    config_file = os.path.join(path, _MODEL_CONFIG, "metadata")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No model checkpoint directory at {path}")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"{path} is not a model checkpoint: {config_file} is missing "
            "(written by mixreorg_jax.formats.model_files.save_model)"
        )
    with open(config_file) as f:
        return config_from_json_dict(json.load(f))


def read_inference(path: str) -> dict[str, int]:
    """The inference protocol the checkpoint directory `path` records, or, for one written before
    protocols were recorded, `default_inference` of its model config."""
    path = os.path.abspath(path)
    config = read_model_config(path)
    inference_file = os.path.join(path, _INFERENCE, "metadata")
    if not os.path.isfile(inference_file):
        return default_inference(config)
    with open(inference_file) as f:
        return check_inference(json.load(f), f"checkpoint {path}")


def load_model(
    path: str, config: ml_collections.ConfigDict | None = None
) -> tuple[dict, ml_collections.ConfigDict]:
    """Reads a checkpoint written by `save_model`.

    Args:
        path: the checkpoint directory.
        config: the model to load into (e.g. the stored one with another dtype or remat);
            default the stored config. Parameter shapes must match it.

    Returns:
        (variables {'params', 'batch_stats'} as host numpy arrays, the model config).
    """
    path = os.path.abspath(path)
    stored_config = read_model_config(path)
    config = stored_config if config is None else config
    if not os.path.isdir(os.path.join(path, _VARIABLES)):
        raise FileNotFoundError(f"{path} is not a model checkpoint: {path}/{_VARIABLES} is missing")
    checkpointer = _checkpointer()
    stored = checkpointer.metadata(path).item_metadata[_VARIABLES].tree
    expected = abstract_variables(config)
    check_shapes(
        {k: tuple(v.shape) for k, v in flatten_tree(stored).items()},
        {k: v.shape for k, v in flatten_tree(expected).items()},
        f"checkpoint {path}",
    )
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), expected
    )
    restored = checkpointer.restore(
        path, args=ocp.args.Composite(**{_VARIABLES: ocp.args.StandardRestore(target)})
    )[_VARIABLES]
    return jax.device_get(restored), config


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy arrays (no torch needed)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No safetensors file at {path}")
    return safetensors.numpy.load_file(path)


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes tensors with the {'format': 'pt'} metadata that transformers' from_pretrained needs."""
    safetensors.numpy.save_file(
        {k: np.asarray(v, order="C") for k, v in tensors.items()}, path, metadata={"format": "pt"}
    )
