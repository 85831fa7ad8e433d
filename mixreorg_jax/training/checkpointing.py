"""Train checkpoints: one Orbax `CheckpointManager` holding the train state and the data iterator.

Layout of a workdir's `checkpoints/<step>/`: `state/` (step, params, opt_state, batch_stats, as
sharded arrays) and `data/` (each process's grain iterator state). Saves are asynchronous; a
SIGTERM (preemption) makes every process save at the same next step and stop cleanly.
"""

import json
import os
import signal
import threading

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mixreorg_jax.formats import huggingface, model_files
from mixreorg_jax.training import step as train_step


def _absolute(path: str) -> epath.Path:
    """`path` with `~` expanded and, on the local file system, made absolute: Orbax reads and
    writes absolute paths only (a relative one fails deep in a save or restore)."""
    path = epath.Path(path).expanduser()
    return path if "://" in str(path) else epath.Path(os.path.abspath(path))


def make_manager(workdir: str, ckpt: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt.max_to_keep,
        enable_async_checkpointing=ckpt.get("async_save", True),
        create=True,
        cleanup_tmp_directories=True,
    )
    manager = ocp.CheckpointManager(
        _absolute(workdir) / "checkpoints", options=options, item_names=("state", "data")
    )
    # The manager removes a crashed run's unfinished checkpoints in a background thread, which
    # neither close() nor wait_until_finished() waits for: a run that stops right after start-up
    # (a bad flag) would exit under it. It is a directory listing: wait for it here.
    getattr(manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
    return manager


def checkpoints_dir(path: str) -> str:
    """A run's `checkpoints/` folder, given the run's workdir or that folder itself."""
    path = _absolute(path)
    return str(path / "checkpoints" if (path / "checkpoints").exists() else path)


def save(
    manager: ocp.CheckpointManager, step: int, state, data_iterator=None, force: bool = False
) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(
    source: str | ocp.CheckpointManager,
    abstract_state=None,
    data_iterator=None,
    step: int | None = None,
):
    """Reads a train state: the one reader of `checkpoints/` folders.

    Args:
      source: a workdir's `checkpoints/` folder (or the workdir), or the run's own open manager.
      abstract_state: ShapeDtypeStructs with shardings to restore into; None reads the state as
        host numpy arrays, whatever devices wrote it (for inference and `model_init`).
      data_iterator: a grain iterator whose position is restored too.
      step: the step to read; default the latest.

    Returns:
      (state, step).
    """
    own = not isinstance(source, ocp.CheckpointManager)
    if own:
        source = ocp.CheckpointManager(
            epath.Path(checkpoints_dir(source)),
            item_names=("state", "data"),
            options=ocp.CheckpointManagerOptions(read_only=True),
        )
    manager, directory = source, source.directory
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {directory}")
    if abstract_state is None:
        metadata = manager.item_metadata(step)["state"]
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        items = {"state": ocp.args.PyTreeRestore(restore_args=restore_args)}
    else:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"checkpoint {directory}/{step} does not fit this model/optimiser (another model "
            f"shape or config?): {str(e).splitlines()[0][:500]}"
        ) from None
    if own:
        manager.close()
    return restored["state"], step


def load_variables(path: str) -> tuple[dict, ml_collections.ConfigDict]:
    """(variables {'params', 'batch_stats'} as host arrays, model config) from any model location.

    `path` may be a model checkpoint (`model_files.save_model`, `convert from-hf`), a training
    workdir (its `export/` when training finished, else its latest checkpoint), or a Hugging Face
    GroupViT folder (config.json + model.safetensors).
    """
    root = epath.Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"no model at {root}")
    if (root / "export").exists():
        return model_files.load_model(str(root / "export"))
    if (root / "checkpoints").exists():
        config_file = root / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{root} has checkpoints but no config.json")
        config = model_files.config_from_json_dict(json.loads(config_file.read_text())["model"])
        state, _ = restore(str(root / "checkpoints"))
        return train_step.model_variables(state), config
    if (root / "config.json").exists() and (root / "model.safetensors").exists():
        tensors, hf_config = huggingface.read_hf_folder(str(root))
        config = huggingface.hf_config_to_model_config(hf_config)
        return huggingface.params_from_hf(tensors, config), config
    return model_files.load_model(str(root))


class PreemptionWatch:
    """Turns SIGTERM into a request to checkpoint and stop at a step all processes agree on."""

    def __init__(self):
        self._requested = threading.Event()
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self._requested.set()

    def should_stop(self) -> bool:
        """True on every process once any process got SIGTERM (a collective when multi-host)."""
        local = self._requested.is_set()
        if jax.process_count() == 1:
            return local
        flags = multihost_utils.process_allgather(np.asarray(local))
        return bool(np.any(flags))

    def close(self):
        signal.signal(signal.SIGTERM, self._previous)
