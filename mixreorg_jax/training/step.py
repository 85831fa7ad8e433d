"""The train state and the jitted update step, shared by the trainer and the benchmark.

The state is a dict pytree: `step`, `params` ({"model", "multi_label_logit_scale"}),
`batch_stats` and `opt_state`. Its layout on the mesh comes from `sharding.fsdp_sharding`.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mixreorg_jax.models import groupvit
from mixreorg_jax.ops import mixing
from mixreorg_jax.training import objective, optim, sharding


def make_init_fn(model, config: ml_collections.ConfigDict, tx: optax.GradientTransformation):
    """`init(rng) -> state`, for `jax.eval_shape` and a jitted, already-sharded init."""

    def init(rng):
        size = config.model.image_size
        variables = model.init(
            {"params": rng, "gumbel": rng, "dropout": rng},
            jnp.zeros((1, size, size, config.model.num_channels), jnp.float32),
            jnp.zeros((1, config.model.context_length), jnp.int32),
        )
        params = {
            "model": variables["params"],
            **objective.init_extra_params(config),
        }
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "batch_stats": variables["batch_stats"],
            "opt_state": tx.init(params),
        }

    return init


def model_variables(state: dict) -> dict:
    """The model's part of a train state (or of its shardings): {'params', 'batch_stats'}, what
    the model applies, exports and evaluates; the rest is the objective's and the optimiser's."""
    return {"params": state["params"]["model"], "batch_stats": state["batch_stats"]}


def abstract_state(init_fn, rng, mesh: jax.sharding.Mesh):
    """(shape/dtype/sharding structs of the state, its shardings), without allocating it."""
    shapes = jax.eval_shape(init_fn, rng)
    shardings = sharding.fsdp_sharding(shapes, mesh)
    structs = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
    return structs, shardings


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """Fails early, in words, on a batch that cannot be split over devices or mixing groups."""
    batch, devices = config.data.batch_size, mesh.size
    if batch % devices:
        raise ValueError(f"data.batch_size={batch} is not divisible by the {devices} devices")
    if config.mix.enabled and (batch // devices) % config.mix.group_size:
        raise ValueError(
            f"the per-device batch {batch // devices} is not divisible by "
            f"mix.group_size={config.mix.group_size}"
        )


def make_update_fn(
    model, config: ml_collections.ConfigDict, tx, schedule, mesh, state_shardings, base_rng
):
    """A jitted `update(state, batch) -> (state, metrics)` that donates the old state.

    The step's randomness is `fold_in(base_rng, step)`, so a resumed run draws what an
    uninterrupted one would. Mixing runs per device (`jax.shard_map`): each device mixes within
    its own slice of the batch.
    """
    mix_fns = (
        functools.partial(mixing.mix_tokens_sharded, mesh=mesh, batch_axes=sharding.BATCH_AXES),
        functools.partial(mixing.restore_tokens_sharded, mesh=mesh, batch_axes=sharding.BATCH_AXES),
    )
    loss_fn = functools.partial(objective.loss_fn, model=model, config=config, mix_fns=mix_fns)

    @functools.partial(
        jax.jit, donate_argnums=0, out_shardings=(state_shardings, sharding.replicated(mesh))
    )
    def update_fn(state, batch):
        rng = jax.random.fold_in(base_rng, state["step"])
        (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], batch, rng
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            **metrics,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": schedule(state["step"]),
        }
        return {
            "step": state["step"] + 1,
            "params": params,
            "batch_stats": batch_stats,
            "opt_state": opt_state,
        }, metrics

    return update_fn


class TrainStep(NamedTuple):
    """Everything the trainer and the benchmark build from a config before the first step."""

    model: groupvit.GroupViT
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    init: Callable  # rng -> state
    abstract_state: Any  # ShapeDtypeStructs with shardings
    state_sharding: Any
    update: Callable  # (state, batch) -> (state, metrics), jitted, donating the state


def build(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    total_steps: int,
    warmup_steps: int,
) -> TrainStep:
    """The model, optimiser, state layout and jitted update step of a train config."""
    check_batch(config, mesh)
    model = groupvit.GroupViT(config.model)
    schedule = optim.make_schedule(config.optim, total_steps, warmup_steps, config.data.batch_size)
    tx = optim.make_optimizer(config.optim, schedule)
    base_rng = jax.random.key(config.seed)
    init = make_init_fn(model, config, tx)
    abstract, shardings = abstract_state(init, base_rng, mesh)
    update = make_update_fn(model, config, tx, schedule, mesh, shardings, base_rng)
    return TrainStep(model, schedule, tx, init, abstract, shardings, update)
