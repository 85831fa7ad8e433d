"""Patch mixing and restoration for MixReorg (docs/method.md sections 3-4, "Mixing plan").

The local batch of B images is split into consecutive groups of K images. Within a group, for
every s x s block of patches, a random permutation sigma of the K members decides which member's
token each mixed image takes: mixed image j takes, at position n, the token of member sigma_n(j)
at the SAME position n. Positions (and so position embeddings) never move, and every source token
lands in exactly one mixed image, so restoration is the exact inverse.

All indices that drive the gathers are IN-GROUP indices (0..K-1). The same `mix_tokens` is
therefore correct on the global batch and on any slice of it that holds whole groups, which is
what lets `mix_tokens_sharded` run per device with no cross-device traffic.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P


class MixingPlan(NamedTuple):
    """Index arrays of one mixing draw; every field is batch-major and shards along the batch.

    B images, N = h * w patch positions in row-major order, K images per group.

    Attributes:
        member: int32[B, N]. Mixed image b takes, at position n, the token of in-group member
            `member[b, n]` (0..K-1) of its group.
        inverse: int32[B, N]. The token of original image b at position n is held by in-group
            mixed image `inverse[b, n]` of its group, at position n.
        source: int32[B, N]. Batch index of the image (and so of the caption) that the token of
            mixed image b at position n came from: `(b // K) * K + member[b, n]`.
        group_captions: int32[B, K]. Batch indices of the K images (and captions) of b's group,
            in in-group order: `source[b, n] == group_captions[b, member[b, n]]`. Its shape
            carries K, so the gathers need no static argument; it also lists the candidate
            captions of each mixed image for a loss restricted to its group.
    """

    member: jax.Array
    inverse: jax.Array
    source: jax.Array
    group_captions: jax.Array

    @property
    def group_size(self) -> int:
        """K, a static Python int (from the shape of `group_captions`)."""
        return self.group_captions.shape[1]


def _block_of_position(grid: tuple[int, int], block_size: int) -> np.ndarray:
    """int32[N]: index of the s x s block (row-major over blocks) of each row-major position."""
    h, w = grid
    rows, cols = np.divmod(np.arange(h * w), w)
    return ((rows // block_size) * (w // block_size) + cols // block_size).astype(np.int32)


def _check_plan_arguments(batch_size, grid, group_size, block_size):
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"Patch grid must be positive, got {tuple(grid)}.")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}.")
    if batch_size < 1 or batch_size % group_size:
        raise ValueError(
            f"batch_size {batch_size} must be a positive multiple of group_size {group_size}."
        )
    if block_size < 1 or h % block_size or w % block_size:
        valid = [s for s in range(1, min(h, w) + 1) if h % s == 0 and w % s == 0]
        raise ValueError(
            f"block_size {block_size} does not divide the {h}x{w} patch grid; valid sizes: {valid}."
        )


def mixing_plan(
    rng: jax.Array, batch_size: int, grid: Sequence[int], group_size: int, block_size: int = 1
) -> MixingPlan:
    """Draws the mixing permutations for a batch; a pure function of `rng`.

    Args:
        rng: PRNG key.
        batch_size: B, a positive multiple of `group_size`.
        grid: (h, w) patch grid; N = h * w.
        group_size: K, images per mixing group.
        block_size: s; one permutation per s x s block of patches. Must divide h and w.

    Returns:
        MixingPlan: int32[B, N] `member`, `inverse`, `source`; int32[B, K] `group_captions`.
        Under jit the values do not depend on how the outputs are sharded (threefry is
        partitionable), so the plan can be drawn with a batch-sharded `out_shardings`.
    """
    h, w = grid
    _check_plan_arguments(batch_size, (h, w), group_size, block_size)
    num_groups, k = batch_size // group_size, group_size
    num_blocks = (h // block_size) * (w // block_size)

    # argsort of i.i.d. random keys is a uniform permutation; 32-bit keys make ties (which would
    # still give a valid, only slightly biased, permutation) practically impossible.
    noise = jax.random.bits(rng, (num_groups, k, num_blocks), jnp.uint32)
    member_per_block = jnp.argsort(noise, axis=1).astype(jnp.int32)  # [G, K(mixed j), blocks]
    # Inverse of a permutation is its argsort: [G, K(original i), blocks] -> mixed j.
    inverse_per_block = jnp.argsort(member_per_block, axis=1).astype(jnp.int32)

    block = _block_of_position((h, w), block_size)
    member = member_per_block[:, :, block].reshape(batch_size, h * w)
    inverse = inverse_per_block[:, :, block].reshape(batch_size, h * w)
    group_start = (jnp.arange(batch_size, dtype=jnp.int32) // k) * k
    source = group_start[:, None] + member
    group_captions = group_start[:, None] + jnp.arange(k, dtype=jnp.int32)
    return MixingPlan(member=member, inverse=inverse, source=source, group_captions=group_captions)


def _check_tokens(tokens: jax.Array, plan: MixingPlan):
    if tokens.ndim != 3 or tokens.shape[:2] != plan.member.shape:
        raise ValueError(
            f"tokens must be [B, N, C] with (B, N) = {plan.member.shape} as in "
            f"the plan, got {tokens.shape}."
        )


def _gather_in_group(tokens: jax.Array, index: jax.Array, group_size: int) -> jax.Array:
    """out[b, n] = tokens[(b // K) * K + index[b, n], n]; tokens [B, N, C], index int32[B, N]."""
    b, n, c = tokens.shape
    if b % group_size:
        raise ValueError(f"Batch {b} is not a whole number of groups of {group_size}.")
    grouped = tokens.reshape(b // group_size, group_size, n, c)
    index = index.reshape(b // group_size, group_size, n, 1)
    # The indices come from argsort, so they are in bounds; this skips clamping in the gather
    # and in its transpose (the scatter-add of the gradient).
    out = jnp.take_along_axis(grouped, index, axis=1, mode="promise_in_bounds")
    return out.reshape(b, n, c)


def mix_tokens(tokens: jax.Array, plan: MixingPlan) -> jax.Array:
    """Mixes the images of each group: [B, N, C] -> [B, N, C].

    out[b, n] = tokens[plan.source[b, n], n], computed from in-group indices so that it also holds
    on any slice of the batch made of whole groups.
    """
    _check_tokens(tokens, plan)
    return _gather_in_group(tokens, plan.member, plan.group_size)


def restore_tokens(mixed: jax.Array, plan: MixingPlan) -> jax.Array:
    """Returns mixed tokens to their source images: [B, N, C] -> [B, N, C].

    The exact inverse of `mix_tokens`: restore_tokens(mix_tokens(x, p), p) == x and
    mix_tokens(restore_tokens(x, p), p) == x.
    """
    _check_tokens(mixed, plan)
    return _gather_in_group(mixed, plan.inverse, plan.group_size)


def _per_device(
    op, tokens: jax.Array, plan: MixingPlan, mesh: jax.sharding.Mesh, batch_axes: Sequence[str]
) -> jax.Array:
    _check_tokens(tokens, plan)
    batch_axes = tuple(batch_axes)
    unknown = [a for a in batch_axes if a not in mesh.shape]
    if unknown:
        raise ValueError(f"Batch axes {unknown} are not in the mesh axes {tuple(mesh.shape)}.")
    num_shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
    batch, k = tokens.shape[0], plan.group_size
    if batch % num_shards or (batch // num_shards) % k:
        raise ValueError(
            f"Batch {batch} over {num_shards} devices (mesh axes {batch_axes}) must give each "
            f"device a whole number of groups of {k} images."
        )
    spec = P(batch_axes)
    plan_spec = MixingPlan(*(spec,) * len(MixingPlan._fields))
    return jax.shard_map(op, mesh=mesh, in_specs=(spec, plan_spec), out_specs=spec)(tokens, plan)


def mix_tokens_sharded(
    tokens: jax.Array,
    plan: MixingPlan,
    mesh: jax.sharding.Mesh,
    batch_axes: Sequence[str] = ("data",),
) -> jax.Array:
    """`mix_tokens` run per device on its slice of the batch, with no cross-device traffic.

    tokens [B, N, C] and the plan are split along the batch over the mesh axes `batch_axes`;
    each device's slice must hold whole groups (B / devices divisible by K), else ValueError.
    """
    return _per_device(mix_tokens, tokens, plan, mesh, batch_axes)


def restore_tokens_sharded(
    mixed: jax.Array,
    plan: MixingPlan,
    mesh: jax.sharding.Mesh,
    batch_axes: Sequence[str] = ("data",),
) -> jax.Array:
    """`restore_tokens` run per device; same layout and checks as `mix_tokens_sharded`."""
    return _per_device(restore_tokens, mixed, plan, mesh, batch_axes)
