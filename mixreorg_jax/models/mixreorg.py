"""MixReorg's image forward (docs/method.md §4), composed from GroupViT's pieces.

`image_forward` is the whole training-time image side: the original, mixed and restored branches,
their projections and the mixed branch's patch -> segment assignment chain. The trainer's
objective and the diagnostics both call it through `model.apply(..., method=...)`, so it shares
every weight with `GroupViT` and adds none: evaluation runs `GroupViT.encode_image` alone, which
is exactly GroupViT.

The mixing settings come in one form, the train config's `mix` (a `ConfigDict`, or a dict of its
keys): `enabled`, `group_size`, `block_size`, `contextual_depth`, `progressive_weight`,
`progressive_mode`.

The original and mixed branches go through each stage-1 block together as one batch of 2B, and
the three branches through the grouping stages as one batch of 3B: the same arithmetic as separate
calls, in fewer and larger matmuls.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mixreorg_jax.ops import mixing, segmentation

MixSettings = Mapping[str, Any]  # the train config's `mix`


def mixing_plan(
    rng: jax.Array, mix: MixSettings, batch_size: int, grid: tuple[int, int]
) -> mixing.MixingPlan:
    """The plan that mixes a batch of `batch_size` images of `grid` patches in groups of
    `mix["group_size"]`, one permutation per `mix["block_size"]`-square block of patches."""
    return mixing.mixing_plan(rng, batch_size, grid, mix["group_size"], mix["block_size"])


def image_forward(
    model,
    images: jnp.ndarray,
    plan: mixing.MixingPlan | None,
    mix: MixSettings,
    *,
    train: bool = True,
    mix_fns: tuple[Callable, Callable] = (mixing.mix_tokens, mixing.restore_tokens),
    segments: bool = False,
    restored: bool = True,
) -> dict:
    """The image side of a training step: GroupViT's without a plan, MixReorg's with one.

    Args:
        model: the bound `GroupViT` module.
        images: float[B, H, W, C], normalised.
        plan: the mixing plan of this batch (`mixing_plan`), or None for the original images only.
        mix: the mixing settings (module docstring); only read with a plan.
        train: training mode (gumbel assignment, drop-path, batch statistics).
        mix_fns: (mix, restore), each `(tokens[B, N, C], plan) -> [B, N, C]`; the trainer passes
            the per-device `jax.shard_map` versions when the batch is sharded.
        segments: also project the original branch's final segments.
        restored: run the restored branch (its grouping stages cost a third of the grouped
            tokens); off, e.g. when its loss has weight 0, there is no "restored_image".

    Returns:
        image: [B, D] L2-normalised projected embeddings of the original images (only they
            update the projector's running averages).
        soft_assignments: the original branch's token -> group softmax per grouping stage,
            float32 [B, N_in, G_out] each.
        segments: [B, G, D] the original branch's projected final segments (with `segments`).
        With a plan, also:
        mixed_segments: [B, G, D] the mixed images' projected final segments, normalised with
            the mixed branch's own batch statistics (docs/method.md §4, BatchNorm).
        mixed_assignment: {"hard", "soft"}: float32 [B, N, G], each mixed image's patch -> final
            segment assignment, the chain of the grouping stages' straight-through one-hot
            (gradients reach the assignment logits) or softmax assignments.
        restored_image: [B, D] projected embeddings of the restored images (with `restored`).
    """
    if plan is None:
        original = model.encode_image(images, train=train)
        out = {"image": original["embedding"], "soft_assignments": original["soft_assignments"]}
    else:
        branches = _branches(model, images, plan, mix, train, mix_fns, restored)
        original, mixed = branches["original"], branches["mixed"]
        # Each branch is normalised with its own batch statistics; only the original branch
        # moves the running averages used at evaluation.
        out = {
            "image": model.project_image(original["pooled"], train=train),
            "soft_assignments": original["soft_assignments"],
            "mixed_segments": model.project_segments(
                mixed["segments"], train=train, stats_from=mixed["pooled"]
            ),
            "mixed_assignment": {
                kind: segmentation.chain_assignments(mixed[f"{kind}_assignments"])
                for kind in ("hard", "soft")
            },
        }
        if restored:
            out["restored_image"] = model.project_image(
                branches["restored"]["pooled"], train=train, update_stats=False
            )
    if segments:
        out["segments"] = model.project_segments(
            original["segments"], train=train, stats_from=original["pooled"]
        )
    return out


def _branches(model, images, plan, mix, train, mix_fns, restored) -> dict[str, dict]:
    """{"original", "mixed"[, "restored"]}: each the dict of `VisionEncoder.group`
    (segments[B, G, C], pooled[B, C], soft/hard assignments per grouping stage)."""
    mix_fn, restore_fn = mix_fns
    contextual_depth = mix["contextual_depth"]
    progressive_weight, progressive_mode = mix["progressive_weight"], mix["progressive_mode"]
    if progressive_mode not in ("add", "average"):
        raise ValueError(
            f"mix.progressive_mode must be 'add' or 'average', got {progressive_mode!r}"
        )
    vision = model.vision
    depth = model.config.depths[0]
    if not 0 <= contextual_depth <= depth:
        raise ValueError(
            f"mix.contextual_depth={contextual_depth} must lie in [0, {depth}] (stage-1 depth)"
        )

    # (a) Contextual mixing: the first Lc blocks see the original images only.
    x = vision.embed(images)
    batch = x.shape[0]
    x, g = vision.stage1(
        x, vision.stage1_group_tokens(batch), blocks=slice(0, contextual_depth), train=train
    )
    # Mixed images start with the learned group tokens afresh, not with image-specific ones.
    x = jnp.concatenate([x, mix_fn(x, plan)])
    g = jnp.concatenate([g, vision.stage1_group_tokens(batch)])
    # (b) Progressive mixing: after each later block the original branch enhances the mixed one.
    for i in range(contextual_depth, depth):
        x, g = vision.stage1(x, g, blocks=slice(i, i + 1), train=train)
        if progressive_weight:
            x_orig, x_mixed = x[:batch], x[batch:]
            x_mixed = x_mixed + progressive_weight * mix_fn(x_orig, plan)
            if progressive_mode == "average":
                x_mixed = x_mixed / (1.0 + progressive_weight)
            x = jnp.concatenate([x_orig, x_mixed])

    # (c) Mixing restoration, then the grouping stages of all branches at once.
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
