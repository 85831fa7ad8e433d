"""ops/mixed_precision.py: bfloat16 dense products accumulated in float32, forward and backward."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixreorg_jax.models import groupvit
from mixreorg_jax.ops import mixed_precision

DENSE = (((2,), (0,)), ((), ()))  # [B, T, K] x [K, N], as flax.linen.Dense contracts


def operands(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 48)), dtype)
    w = jnp.asarray(rng.standard_normal((48, 24)) / 7, dtype)
    return x, w


def reference(x, w):
    """The product in float32 of the bfloat16 operands, rounded to bfloat16 at the end."""
    return (x.astype(jnp.float32) @ w.astype(jnp.float32)).astype(x.dtype)


def test_bfloat16_forward_is_the_float32_accumulated_product_rounded_once():
    x, w = operands(jnp.bfloat16)
    out = mixed_precision.dot_general(x, w, DENSE)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.float32(out), np.float32(reference(x, w)))


def test_bfloat16_gradients_are_the_float32_ones_within_bfloat16_rounding():
    x, w = operands(jnp.bfloat16)
    probe = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 24)), jnp.float32)

    def loss(dot, x, w):
        return jnp.sum(dot(x, w).astype(jnp.float32) * probe)

    ours = jax.grad(
        lambda x, w: loss(lambda a, b: mixed_precision.dot_general(a, b, DENSE), x, w),
        argnums=(0, 1),
    )(x, w)
    exact = jax.grad(lambda x, w: loss(lambda a, b: a @ b, x, w), argnums=(0, 1))(
        x.astype(jnp.float32), w.astype(jnp.float32)
    )
    for got, want in zip(ours, exact):
        assert got.dtype == jnp.bfloat16
        # The cotangent is rounded to bfloat16 first, as autocast does: relative error ~2^-8.
        np.testing.assert_allclose(np.float32(got), want, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("dims", [DENSE, (((1,), (1,)), ((0,), (0,)))])
def test_other_dtypes_and_dimension_numbers_are_lax_dot_general(dims):
    x, w = operands(jnp.float32)
    if dims != DENSE:
        w = jnp.ones((2, 5, 7), jnp.float32)
    np.testing.assert_array_equal(
        mixed_precision.dot_general(x, w, dims), jax.lax.dot_general(x, w, dims)
    )


def test_every_matmul_of_a_bfloat16_dense_layers_step_takes_bfloat16_and_gives_float32():
    """Forward and both backward products: what XLA:CPU runs as a native bfloat16 dot."""
    layer = nn.Dense(24, dtype=jnp.bfloat16, dot_general=mixed_precision.dot_general)
    x, _ = operands(jnp.float32)
    params = layer.init(jax.random.key(0), x)

    def step(params, x):
        out, pullback = jax.vjp(layer.apply, params, x)
        return out, pullback(jnp.ones_like(out))

    text = jax.jit(step).lower(params, x).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) == 3, dots
    for line in dots:
        assert re.search(
            r": \(tensor<[0-9x]+xbf16>, tensor<[0-9x]+xbf16>\) -> tensor<[0-9x]+xf32>", line
        )
    _, (grads, _) = jax.jit(step)(params, x)
    assert grads["params"]["kernel"].dtype == jnp.float32  # the float32 master weights


def test_dense_with_bias_in_bfloat16_adds_the_bias_before_the_one_rounding():
    x, w = operands(jnp.bfloat16)
    bias = jnp.linspace(-1, 1, 24, dtype=jnp.float32)
    out = mixed_precision.dense(x, w, bias)
    assert out.dtype == jnp.bfloat16
    want = (x.astype(jnp.float32) @ w.astype(jnp.float32) + bias).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.float32(out), np.float32(want))


def test_dense_in_float32_is_the_plain_expression():
    x, w = operands(jnp.float32)
    bias = jnp.linspace(-1, 1, 24, dtype=jnp.float32)
    np.testing.assert_array_equal(mixed_precision.dense(x, w, bias), x @ w + bias)


def test_dense_bias_gradient_is_the_float32_sum_of_the_rounded_cotangent():
    x, w = operands(jnp.bfloat16)
    bias = jnp.zeros(24, jnp.float32)
    probe = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 24)), jnp.float32)
    loss = lambda x, w, b: jnp.sum(mixed_precision.dense(x, w, b).astype(jnp.float32) * probe)
    grad_x, grad_w, grad_b = jax.grad(loss, argnums=(0, 1, 2))(x, w, bias)
    assert (grad_x.dtype, grad_w.dtype, grad_b.dtype) == (jnp.bfloat16,) * 2 + (jnp.float32,)
    rounded = np.float32(probe.astype(jnp.bfloat16)).reshape(-1, 24)
    np.testing.assert_allclose(np.asarray(grad_b), rounded.sum(0), rtol=1e-6, atol=1e-6)
    # The products' gradients are dot_general's.
    product = lambda x, w: jnp.sum(
        mixed_precision.dot_general(x, w, DENSE).astype(jnp.float32) * probe
    )
    for got, want in zip((grad_x, grad_w), jax.grad(product, argnums=(0, 1))(x, w)):
        np.testing.assert_array_equal(np.float32(got), np.float32(want))


def test_a_bfloat16_bias_gradient_compiles_to_a_reduce_not_reduce_windows():
    """Why `dense` owns the bias: autodiff's bfloat16 bias sum becomes reduce-window trees."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64, 32)), jnp.bfloat16)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((32, 48)), jnp.bfloat16)
    bias = jnp.zeros(48, jnp.float32)

    def compiled(dense):
        loss = lambda x, w, b: jnp.sum(jax.nn.gelu(dense(x, w, b)).astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(1, 2))).lower(x, w, bias).compile().as_text()

    autodiff = lambda x, w, b: mixed_precision.dot_general(x, w, DENSE) + b.astype(x.dtype)
    assert "reduce-window" in compiled(autodiff)  # what XLA:CPU does without it
    assert "reduce-window" not in compiled(mixed_precision.dense)


@pytest.mark.parametrize("features", [24, 96])  # the kernel's gradient both ways round
def test_bfloat16_kernel_gradient_is_the_float32_product_of_its_operands(features):
    x, _ = operands(jnp.bfloat16)
    w = jnp.zeros((48, features), jnp.bfloat16)
    probe = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, features)), jnp.float32)
    loss = lambda w: jnp.sum(mixed_precision.dense(x, w, None).astype(jnp.float32) * probe)
    grad = jax.grad(loss)(w)
    want = np.float32(x).reshape(-1, 48).T @ np.float32(probe.astype(jnp.bfloat16)).reshape(
        -1, features
    )
    np.testing.assert_allclose(np.float32(grad), want, rtol=0.01, atol=0.01)


def test_every_product_of_a_bfloat16_dense_step_is_a_ynnpack_fusion_on_cpu():
    """No Eigen dot in float32 after converting the operands: the kernel's gradient included."""
    rng = np.random.default_rng(0)
    for width, features in ((32, 48), (48, 32)):
        x = jnp.asarray(rng.standard_normal((4, 64, width)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((width, features)), jnp.bfloat16)
        loss = lambda x, w, b: jnp.sum(jax.nn.gelu(mixed_precision.dense(x, w, b)))
        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        text = step.lower(x, w, jnp.zeros(features, jnp.float32)).compile().as_text()
        entry = text[text.index("\nENTRY ") :]
        assert " dot(" not in entry
        dots = [
            line for line in entry.splitlines() if "__ynn_fusion" in line and "dot_general" in line
        ]
        assert len(dots) == 3, dots


def attention_operands(dtype, tokens=(6, 6)):
    rng = np.random.default_rng(3)
    t, s = tokens
    q, k, v = (rng.standard_normal((2, 3, n, 8)) for n in (t, s, s))
    return tuple(jnp.asarray(a, dtype) for a in (q / 3, k, v))


def einsum_attention(q, k, v, causal):
    """The expression `attention` replaces: einsums in the operands' dtype, jax.nn.softmax in f32."""
    logits = jnp.einsum("bhtd,bhsd->bhts", q, k).astype(jnp.float32)
    if causal:
        logits = jnp.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bhsd->bhtd", weights, v)


@pytest.mark.parametrize("tokens,causal", [((6, 6), False), ((6, 6), True), ((4, 9), False)])
def test_attention_in_float32_is_the_einsums_forward_and_backward(tokens, causal):
    q, k, v = attention_operands(jnp.float32, tokens)
    probe = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)
    ours, ours_vjp = jax.vjp(lambda *a: mixed_precision.attention(*a, causal), q, k, v)
    want, want_vjp = jax.vjp(lambda *a: einsum_attention(*a, causal), q, k, v)
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)
    for got, expected in zip(ours_vjp(probe), want_vjp(probe)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    if causal:  # nothing flows to the keys a query does not see: the last key only from the last
        grad_k = jax.grad(lambda k: jnp.sum(mixed_precision.attention(q, k, v, True)[..., :-1, :]))
        np.testing.assert_array_equal(grad_k(k)[..., -1, :], 0)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_in_bfloat16_rounds_as_the_bfloat16_einsums_do(causal):
    q, k, v = attention_operands(jnp.bfloat16, (12, 12))
    probe = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.bfloat16)
    ours, ours_vjp = jax.vjp(lambda *a: mixed_precision.attention(*a, causal), q, k, v)
    want, want_vjp = jax.vjp(lambda *a: einsum_attention(*a, causal), q, k, v)
    assert ours.dtype == jnp.bfloat16
    # Both sum in float32 and round to bfloat16 at the same places; the order of the float32
    # sums may differ, which moves a rounding by one bfloat16 step (2^-8 relative) at most.
    np.testing.assert_allclose(np.float32(ours), np.float32(want), rtol=2**-7, atol=2**-7)
    for got, expected in zip(ours_vjp(probe), want_vjp(probe)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(got), np.float32(expected), rtol=0.02, atol=0.02)


def test_every_product_of_a_bfloat16_attention_step_is_a_ynnpack_fusion_on_cpu():
    """The forward's two products and the backward's four, none an Eigen dot in float32 and
    none with float32 operands, with heads split off [B, T, C] arrays as a model splits them."""
    q, k, v = (
        jnp.swapaxes(a, 1, 2).reshape(2, 40, 24) for a in attention_operands(jnp.bfloat16, (40, 40))
    )
    heads = lambda a: jnp.swapaxes(a.reshape(2, 40, 3, 8), 1, 2)

    def loss(q, k, v):
        out = mixed_precision.attention(heads(q), heads(k), heads(v))
        return jnp.sum(out.astype(jnp.float32) ** 2)

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    entry = text[text.index("\nENTRY ") :]
    assert " dot(" not in entry
    # Each YNNPACK fusion's operands and computation; some hold the softmax's reductions beside
    # their dot, and read the reductions' float32 init values before the dot's operands.
    fusions = re.findall(
        r"fusion\(([^)]*)\), kind=kCustom, calls=(%[\w.]+),[^\n]*__ynn_fusion", entry
    )
    assert len(fusions) == entry.count("__ynn_fusion"), fusions
    types = dict(re.findall(r"\n\s*(?:ROOT )?(%[\w.]+) = (\w+)\[", entry))
    with_dots = 0
    for operands, name in fusions:
        if " dot(" in text[text.index(f"\n{name} ") :].split("\n}", 1)[0]:
            with_dots += 1
            dtypes = [types[operand.strip()] for operand in operands.split(",")]
            assert dtypes[-2:] == ["bf16", "bf16"], (name, operands)
    assert with_dots == 6, fusions


_gelu = groupvit._exact_gelu  # what the model passes


def test_activation_in_float32_is_the_function_itself():
    x = jnp.linspace(-4.0, 4.0, 33)
    probe = jnp.cos(x)
    ours, ours_vjp = jax.vjp(lambda x: mixed_precision.activation(_gelu, x), x)
    want, want_vjp = jax.vjp(_gelu, x)
    np.testing.assert_array_equal(ours, want)
    np.testing.assert_array_equal(ours_vjp(probe)[0], want_vjp(probe)[0])


def test_activation_in_bfloat16_is_the_float32_one_rounded_once_forward_and_backward():
    x = jnp.linspace(-4.0, 4.0, 257).astype(jnp.bfloat16)
    probe = jnp.cos(jnp.arange(257.0)).astype(jnp.bfloat16)
    ours, ours_vjp = jax.vjp(lambda x: mixed_precision.activation(_gelu, x), x)
    (grad,) = ours_vjp(probe)
    assert ours.dtype == grad.dtype == jnp.bfloat16
    x32, probe32 = x.astype(jnp.float32), probe.astype(jnp.float32)
    value32, vjp32 = jax.vjp(_gelu, x32)
    np.testing.assert_array_equal(ours, value32.astype(jnp.bfloat16))
    np.testing.assert_array_equal(grad, vjp32(probe32)[0].astype(jnp.bfloat16))
    # Autodiff of the same expression in bfloat16 rounds at every step and differs.
    assert _gelu(x).dtype == jnp.bfloat16
    assert np.any(np.asarray(_gelu(x)) != np.asarray(ours))


def test_activation_saves_only_its_input_for_the_backward_pass():
    x = jnp.ones((4, 8), jnp.bfloat16)
    saved = jax.linearize(lambda x: mixed_precision.activation(_gelu, x), x)
    residuals = [
        leaf for leaf in jax.tree.leaves(saved[1]) if isinstance(leaf, jax.Array) and leaf.size > 1
    ]
    assert [r.shape for r in residuals] == [(4, 8)], [r.shape for r in residuals]
