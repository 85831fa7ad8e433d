"""The optimiser: AdamW with GroupViT's weight-decay mask, warm-up + cosine, gradient clipping."""

import jax
import ml_collections
import optax

# GroupViT's learning rates are given for a global batch of 4096 and scaled linearly.
REFERENCE_BATCH = 4096


def decay_mask(params):
    """True where weight decay applies: everything but 1-D parameters and biases.

    The 0-D logit scales, the position embedding and the group tokens are decayed, as in
    GroupViT's released training code.
    """

    def decayed(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        return leaf.ndim != 1 and name != "bias"

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_schedule(
    optim: ml_collections.ConfigDict, total_steps: int, warmup_steps: int, global_batch: int
) -> optax.Schedule:
    """Linear warm-up from `warmup_lr` to `lr`, then per-step cosine down to `min_lr`."""
    scale = global_batch / REFERENCE_BATCH if optim.scale_lr_by_batch else 1.0
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps={total_steps} must exceed warmup_steps={warmup_steps}")
    return optax.warmup_cosine_decay_schedule(
        init_value=optim.warmup_lr * scale,
        peak_value=optim.lr * scale,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=optim.min_lr * scale,
    )


def make_optimizer(
    optim: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """Clips the global gradient norm, then AdamW with the masked weight decay."""
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip else optax.identity(),
        optax.adamw(
            schedule,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=decay_mask,
        ),
    )
