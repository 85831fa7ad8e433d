"""Tests for ops/mixing.py: plan invariants, exact restoration, jit, and the per-device path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mixreorg_jax.ops import mixing

# Every valid block size of a few small grids (a 14x14 grid is ViT-S/16 at 224 px).
VALID_BLOCK_SIZES = {(2, 2): (1, 2), (4, 4): (1, 2, 4), (6, 4): (1, 2), (14, 14): (1, 2, 7, 14)}


def _sweep():
    """(batch_size, grid, group_size, block_size): every valid block size of every grid, K
    cycling through 2..4 (each K meets every grid), and a batch size (a multiple of K up to 16)
    drawn by a seeded generator."""
    rng = np.random.default_rng(0)
    cases = []
    for i, (grid, block_size) in enumerate(
        (g, s) for g, sizes in VALID_BLOCK_SIZES.items() for s in sizes
    ):
        k = 2 + i % 3
        cases.append((k * int(rng.integers(1, 16 // k + 1)), grid, k, block_size))
    return cases


# One compiled draw per distinct (batch, grid, K, s): XLA:CPU takes ~1 s to compile threefry.
_draw = jax.jit(mixing.mixing_plan, static_argnums=(1, 2, 3, 4))


def _plan(seed, batch_size, grid, group_size, block_size, impl="threefry2x32"):
    """The plan for `seed`. Tests of the index bookkeeping (not of the random numbers) use
    impl="rbg", which compiles faster; sharding and determinism tests use the default."""
    return _draw(jax.random.key(seed, impl=impl), batch_size, tuple(grid), group_size, block_size)


def _plan_shapes(batch_size, grid, group_size, block_size):
    """The plan's array shapes only (nothing compiled): enough for tests of argument checks."""
    return jax.eval_shape(
        lambda key: mixing.mixing_plan(key, batch_size, grid, group_size, block_size),
        jax.random.key(0),
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _plan_mix_restore(key, batch_size, grid, group_size, block_size, tokens):
    """One compile per case: the plan, mix(tokens), restore(mix(tokens)), mix(restore(tokens))."""
    plan = mixing.mixing_plan(key, batch_size, grid, group_size, block_size)
    mixed = mixing.mix_tokens(tokens, plan)
    return (
        plan,
        mixed,
        mixing.restore_tokens(mixed, plan),
        mixing.mix_tokens(mixing.restore_tokens(tokens, plan), plan),
    )


@pytest.mark.parametrize("batch_size,grid,group_size,block_size", _sweep())
def test_plan_and_mixing_invariants(batch_size, grid, group_size, block_size):
    h, w = grid
    n, k, s = h * w, group_size, block_size
    image = np.arange(batch_size)[:, None]
    position = np.arange(n)[None, :]
    group_start = (image // k) * k
    # Channel 0: a unique id b * N + n per (image, position) (exact in float32); channel 1 its
    # negation (a gather that mixed up channels would show); channel 2: arbitrary floats.
    ids = image * n + position
    noise = np.random.default_rng(batch_size).normal(size=(batch_size, n))
    tokens = np.stack([ids, -ids, noise], axis=-1).astype(np.float32)

    key = jax.random.key(batch_size, impl="rbg")
    plan, mixed, restored, mixed_restored = jax.tree.map(
        np.asarray, _plan_mix_restore(key, batch_size, grid, group_size, block_size, tokens)
    )
    member, inverse, source, group_captions = plan
    for a in (member, inverse, source):
        assert a.shape == (batch_size, n) and a.dtype == np.int32
    assert group_captions.shape == (batch_size, k) and group_captions.dtype == np.int32
    assert plan.group_size == k

    assert member.min() >= 0 and member.max() < k
    np.testing.assert_array_equal(source, group_start + member)
    np.testing.assert_array_equal(group_captions, group_start + np.arange(k))
    np.testing.assert_array_equal(np.take_along_axis(group_captions, member, axis=1), source)

    mixed_ids = mixed[..., 0].astype(np.int64)
    np.testing.assert_array_equal(mixed[..., 1], -mixed[..., 0])
    # Positions never move, and `source` names the image (caption) each mixed token came from.
    np.testing.assert_array_equal(mixed_ids % n, np.broadcast_to(position, mixed_ids.shape))
    np.testing.assert_array_equal(mixed_ids // n, source)
    # Every source token lands in exactly one mixed image, whole (all channels).
    np.testing.assert_array_equal(np.sort(mixed_ids, axis=None), np.arange(batch_size * n))
    np.testing.assert_array_equal(mixed[..., 2], noise.astype(np.float32)[source, position])
    # `inverse` names the mixed image of the group that holds each original token.
    np.testing.assert_array_equal(mixed_ids[group_start + inverse, position], ids)

    # Restoration is the exact inverse, both ways round.
    np.testing.assert_array_equal(restored, tokens)
    np.testing.assert_array_equal(mixed_restored, tokens)

    # One permutation per s x s block: `member` is constant inside each block.
    blocks = member.reshape(batch_size, h // s, s, w // s, s)
    np.testing.assert_array_equal(blocks, np.broadcast_to(blocks[:, :, :1, :, :1], blocks.shape))


def test_plan_is_deterministic_per_key_and_differs_across_keys():
    args = (16, (4, 4), 2, 1)  # as in the sharding tests, so the compiled draw is shared
    first, again, other = _plan(0, *args), _plan(0, *args), _plan(1, *args)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    # 8 groups x 16 blocks of 2 members: equal plans from two keys would have chance 2^-128.
    assert not np.array_equal(first.member, other.member)


def test_permutations_are_uniform_and_really_mix():
    k, grid = 3, (14, 14)
    plan = _plan(3, 48, grid, k, 1, impl="rbg")
    member = np.asarray(plan.member).reshape(48 // k, k, -1)  # [G, mixed j, position]
    # Encode each drawn permutation (sigma(0), sigma(1), sigma(2)) as one base-K number.
    codes = (member * (k ** np.arange(k))[None, :, None]).sum(axis=1).ravel()
    counts = np.unique(codes, return_counts=True)[1]
    expected = codes.size / 6  # 3! permutations, ~523 draws each; 20% is > 4 sigma.
    assert len(counts) == 6
    assert np.all(np.abs(counts - expected) < 0.2 * expected), counts
    # Each mixed image takes tokens from every member of its group.
    for j in range(k):
        assert all(len(np.unique(member[g, j])) == k for g in range(member.shape[0]))


@pytest.mark.parametrize(
    "grid,block_size,valid",
    [
        ((4, 4), 3, "[1, 2, 4]"),
        ((14, 14), 4, "[1, 2, 7, 14]"),
        ((6, 4), 3, "[1, 2]"),
        ((4, 4), 0, "[1, 2, 4]"),
    ],
)
def test_invalid_block_size_names_the_valid_ones(grid, block_size, valid):
    with pytest.raises(ValueError, match=f"valid sizes: {valid}".replace("[", r"\[")):
        _plan(0, 8, grid, 2, block_size)


@pytest.mark.parametrize("batch_size,group_size", [(6, 4), (5, 2), (0, 2)])
def test_batch_not_divisible_by_group_size_raises(batch_size, group_size):
    with pytest.raises(ValueError, match="multiple of group_size"):
        _plan(0, batch_size, (4, 4), group_size, 1)


def test_tokens_that_do_not_match_the_plan_raise():
    plan = _plan_shapes(8, (4, 4), 2, 1)
    with pytest.raises(ValueError, match="must be"):
        mixing.mix_tokens(np.zeros((8, 15, 3)), plan)
    with pytest.raises(ValueError, match="must be"):
        mixing.restore_tokens(np.zeros((8, 16)), plan)


def test_under_jit_and_gradient_is_the_inverse_permutation():
    args = (12, (6, 4), 3, 2)
    plan = mixing.mixing_plan(jax.random.key(4, impl="rbg"), *args)
    for a, b in zip(plan, _plan(4, *args, impl="rbg")):
        np.testing.assert_array_equal(a, b)

    rng = np.random.default_rng(5)
    x = rng.normal(size=(12, 24, 4)).astype(np.float32)
    mixed = jax.jit(mixing.mix_tokens)(x, plan)
    np.testing.assert_array_equal(mixed, mixing.mix_tokens(x, plan))
    np.testing.assert_array_equal(jax.jit(mixing.restore_tokens)(mixed, plan), x)
    # mix is a permutation of tokens, so its transpose (the gradient) is restoration.
    weights = rng.normal(size=x.shape).astype(np.float32)
    grad = jax.jit(jax.grad(lambda t: jnp.sum(weights * mixing.mix_tokens(t, plan))))(x)
    np.testing.assert_array_equal(grad, mixing.restore_tokens(weights, plan))


def _collectives(hlo_text):
    names = ("all-gather", "all-to-all", "all-reduce", "collective-permute", "reduce-scatter")
    return [name for name in names if name in hlo_text]


@pytest.mark.parametrize("mesh_shape,axes", [((8,), ("data",)), ((4, 2), ("data", "fsdp"))])
def test_sharded_path_matches_single_device(mesh_shape, axes):
    mesh = jax.make_mesh(mesh_shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes))
    batch_sharding = NamedSharding(mesh, P(axes))
    args = (16, (4, 4), 2, 1)  # 2 images (one group) per device
    plan = _plan(0, *args)
    x = np.random.default_rng(8).normal(size=(16, 16, 3)).astype(np.float32)

    # The plan drawn under jit straight into batch-sharded arrays equals the unsharded draw.
    draw = jax.jit(mixing.mixing_plan, static_argnums=(1, 2, 3, 4), out_shardings=batch_sharding)
    sharded_plan = draw(jax.random.key(0), *args)
    for a, b in zip(sharded_plan, plan):
        assert a.sharding.is_equivalent_to(batch_sharding, a.ndim)
        np.testing.assert_array_equal(a, b)

    x_sharded = jax.device_put(x, batch_sharding)
    mix = jax.jit(lambda t, p: mixing.mix_tokens_sharded(t, p, mesh, axes))
    restore = jax.jit(lambda t, p: mixing.restore_tokens_sharded(t, p, mesh, axes))
    compiled_mix = mix.lower(x_sharded, sharded_plan).compile()
    # Each device mixes its own slice: no communication in the compiled step.
    assert not _collectives(compiled_mix.as_text()), _collectives(compiled_mix.as_text())
    mixed = compiled_mix(x_sharded, sharded_plan)
    assert mixed.sharding.is_equivalent_to(batch_sharding, mixed.ndim)
    np.testing.assert_array_equal(mixed, mixing.mix_tokens(x, plan))
    np.testing.assert_array_equal(restore(mixed, sharded_plan), x)


def test_sharded_path_rejects_slices_that_split_groups():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    # 1 image per device: groups of 2 would straddle devices.
    plan = _plan_shapes(8, (4, 4), 2, 1)
    with pytest.raises(ValueError, match="whole number of groups of 2"):
        mixing.mix_tokens_sharded(np.zeros((8, 16, 3)), plan, mesh)
    plan = _plan_shapes(12, (4, 4), 2, 1)  # 12 images do not split over 8 devices.
    with pytest.raises(ValueError, match="whole number of groups"):
        mixing.restore_tokens_sharded(np.zeros((12, 16, 3)), plan, mesh)
    plan = _plan_shapes(16, (4, 4), 2, 1)
    with pytest.raises(ValueError, match="not in the mesh axes"):
        mixing.mix_tokens_sharded(np.zeros((16, 16, 3)), plan, mesh, ("batch",))
