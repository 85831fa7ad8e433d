"""In-loop evaluators, named in `config.evals` and built by one factory.

Each entry of `config.evals` is `name: {type, every_steps, ...}` (`type` defaults to the name).
An evaluator module defines `Evaluator(eval_config, *, model, mesh, config)` with `run(state) ->
dict[str, float]`; `due(step, total_steps)` comes from `every_steps` (and the last step). The
eval binary (`offline.evaluate_checkpoint`) builds evaluators through the same factory, so in-loop
and offline numbers agree. The models' inference itself is `inference.py`, shared by all.
"""

import importlib

import ml_collections

# type -> module; imported only when a config names it.
KNOWN = {
    "segmentation": "mixreorg_jax.evaluation.segmentation",
}


class Schedule:
    """Runs every `every_steps` steps and at the last step (`every_steps <= 0`: last step only)."""

    def __init__(self, every_steps: int):
        self.every_steps = every_steps

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.every_steps > 0 and step % self.every_steps == 0)


def create(evals: ml_collections.ConfigDict, **kwargs) -> list[tuple[str, object]]:
    """[(name, evaluator)] for every entry of `config.evals`."""
    built = []
    for name, eval_config in evals.items():
        kind = eval_config.get("type", name)
        if kind not in KNOWN:
            raise ValueError(
                f"config.evals.{name}: unknown evaluator type {kind!r}; "
                f"known: {', '.join(sorted(KNOWN))}"
            )
        module = importlib.import_module(KNOWN[kind])
        built.append((name, module.Evaluator(eval_config, **kwargs)))
    return built
