"""MixReorg's three-branch image forward (method.md §4), composed from GroupViT's pieces.

Called through `model.apply(variables, images, plan, ..., method=mixreorg_image_forward)`, so it
shares every weight with `GroupViT` and adds none: evaluation runs `GroupViT.encode_image` alone,
which is exactly GroupViT.

The original and mixed branches go through each stage-1 block together as one batch of 2B, and
the three branches through the grouping stages as one batch of 3B: the same arithmetic as separate
calls, in fewer and larger matmuls.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mixreorg_jax.ops import mixing


def mixreorg_image_forward(
    model,
    images: jnp.ndarray,
    plan: mixing.MixingPlan,
    *,
    contextual_depth: int = 1,
    progressive_weight: float = 1.0,
    progressive_mode: str = "add",
    train: bool = True,
    mix_fn: Callable = mixing.mix_tokens,
    restore_fn: Callable = mixing.restore_tokens,
    restored: bool = True,
) -> dict[str, dict]:
    """Runs the original, mixed and restored branches of the image encoder.

    Args:
        model: the bound `GroupViT` module.
        images: float[B, H, W, C], normalised.
        plan: the mixing plan for this batch (B images, the model's patch grid).
        contextual_depth: Lc, the stage-1 blocks run on the original images before mixing.
        progressive_weight: lambda; after each later stage-1 block the mixed branch gets
            lambda * mix(original patch tokens). 0 turns progressive mixing off.
        progressive_mode: "add" (M <- Block(M) + lambda mix(O)) or "average" (divided by 1 + lambda).
        train: training mode (gumbel assignment, drop-path, batch statistics).
        mix_fn, restore_fn: `(tokens[B, N, C], plan) -> [B, N, C]`; the trainer passes the
            per-device `jax.shard_map` versions when the batch is sharded.
        restored: whether to run the restored branch (its grouping stages cost a third of the
            grouped tokens); off, e.g. when its loss has weight 0, the result has no "restored".

    Returns:
        {"original", "mixed", "restored"}: each the dict of `VisionEncoder.group`
        (segments[B, G, C], pooled[B, C], soft/hard assignments per grouping stage).
    """
    if progressive_mode not in ("add", "average"):
        raise ValueError(f"progressive_mode must be 'add' or 'average', got {progressive_mode!r}")
    vision = model.vision
    depth = model.config.depths[0]
    if not 0 <= contextual_depth <= depth:
        raise ValueError(
            f"contextual_depth={contextual_depth} must lie in [0, {depth}] (stage-1 depth)"
        )

    x = vision.embed(images)
    batch = x.shape[0]
    x, g = vision.stage1(
        x, vision.stage1_group_tokens(batch), blocks=slice(0, contextual_depth), train=train
    )
    # Mixed images start with the learned group tokens afresh, not with image-specific ones.
    x = jnp.concatenate([x, mix_fn(x, plan)])
    g = jnp.concatenate([g, vision.stage1_group_tokens(batch)])
    for i in range(contextual_depth, depth):
        x, g = vision.stage1(x, g, blocks=slice(i, i + 1), train=train)
        if progressive_weight:
            x_orig, x_mixed = x[:batch], x[batch:]
            x_mixed = x_mixed + progressive_weight * mix_fn(x_orig, plan)
            if progressive_mode == "average":
                x_mixed = x_mixed / (1.0 + progressive_weight)
            x = jnp.concatenate([x_orig, x_mixed])

    x_orig, x_mixed = x[:batch], x[batch:]
    g_orig, g_mixed = g[:batch], g[batch:]
    names, xs, gs = ["original", "mixed"], [x_orig, x_mixed], [g_orig, g_mixed]
    if restored:
        names.append("restored")
        xs.append(restore_fn(x_mixed, plan))
        gs.append(g_orig)
    out = vision.group(jnp.concatenate(xs), jnp.concatenate(gs), train=train)
    return {
        name: jax.tree.map(lambda a, i=i: a[i * batch : (i + 1) * batch], out)
        for i, name in enumerate(names)
    }
