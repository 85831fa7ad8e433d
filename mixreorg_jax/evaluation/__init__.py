"""In-loop evaluators, named in `config.evals` and built by one factory.

Each entry of `config.evals` is `name: {type, enabled, every_steps, ...}` (`type` defaults to the
name; `enabled=False` leaves the entry out). An evaluator module defines
`Evaluator(eval_config, *, model, mesh, config)` with `run(state) -> dict`: float scalars and,
where an evaluator makes pictures, uint8 [N, H, W, 3] arrays (image summaries);
`due(step, total_steps)` comes from `every_steps` (and the last step). The eval binary
(`offline.evaluate_checkpoint`) builds evaluators through the same factory, so in-loop and offline
numbers agree. The models' inference itself is `inference.py`, shared by all; the loop's shared
pieces are `loop.py`.
"""

import importlib

import ml_collections

# type -> module; imported only when a config names it.
KNOWN = {
    "classification": "mixreorg_jax.evaluation.classification",
    "retrieval": "mixreorg_jax.evaluation.retrieval",
    "segmentation": "mixreorg_jax.evaluation.segmentation",
}


class Schedule:
    """Runs every `every_steps` steps and at the last step (`every_steps <= 0`: last step only)."""

    def __init__(self, every_steps: int):
        self.every_steps = every_steps

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.every_steps > 0 and step % self.every_steps == 0)


def build(kind: str, eval_config: ml_collections.ConfigDict, **kwargs):
    """The evaluator of type `kind` (a `KNOWN` name) for `eval_config`."""
    if kind not in KNOWN:
        raise ValueError(f"unknown evaluator type {kind!r}; known: {', '.join(sorted(KNOWN))}")
    return importlib.import_module(KNOWN[kind]).Evaluator(eval_config, **kwargs)


def create(evals: ml_collections.ConfigDict, **kwargs) -> list[tuple[str, object]]:
    """[(name, evaluator)] for every enabled entry of `config.evals`, built before training.

    Raises ValueError for an unknown type or field, and FileNotFoundError, one line naming the
    missing data and the override that turns the entry off, when an entry's data is missing.
    """
    built = []
    for name, eval_config in evals.items():
        if not eval_config.get("enabled", True):
            continue
        try:
            built.append((name, build(eval_config.get("type", name), eval_config, **kwargs)))
        except ValueError as e:
            raise ValueError(f"config.evals.{name}: {e}") from e
        except FileNotFoundError as e:
            missing = " ".join(str(e).split()).rstrip(".")
            raise FileNotFoundError(
                f"config.evals.{name}: {missing}; to run without this evaluation: "
                f"--config.evals.{name}.enabled=False"
            ) from e
    return built
