"""Dense layers' and attention's matmuls in bfloat16 with float32 accumulation, forward and
backward.

`dense` is a dense layer's x @ kernel + bias; `dot_general` is a drop-in for `lax.dot_general`
in `flax.linen.Dense(dot_general=...)`, the same product without the bias; `attention` is
softmax(q k^T) v with its two batched products computed the same way; `activation` is an
elementwise function (the GELUs) of bfloat16 values computed in float32 and rounded once. For
bfloat16 operands it computes what a bfloat16 dot computes on XLA:CPU, TPU and GPU alike
(bfloat16 products summed in float32, the result rounded to bfloat16), and so do the two matmuls
of its backward pass; any other dot is `lax.dot_general` itself.

Why: XLA:CPU has no bfloat16 dot with a bfloat16 result. It rewrites one into converts around a
float32 dot, which runs at float32 speed after two extra passes over the operands. A dot of
bfloat16 operands with a float32 result (`preferred_element_type`) goes to YNNPACK's bfloat16
kernel, 2.2x faster on an AVX512-BF16 CPU (docs/performance.md). The backward pass needs its own
rule (`jax.custom_vjp`): JAX's transpose of that dot multiplies the float32 cotangent with a
bfloat16 operand, which XLA:CPU again runs as a float32 dot; here the cotangent is rounded to
bfloat16 first, as PyTorch's autocast does. The bias joins the rule: JAX's own gradient of a
bfloat16 bias add sums the cotangent over the batch axes in bfloat16, which XLA:CPU compiles to a
float32 copy and a tree of reduce-windows, ~20% of a bfloat16 MLP's forward and backward; here it
is one float32 sum over the rows. Attention's heads, transposes of a dense layer's output, are
padded on CPU so that XLA:CPU keeps its products in bfloat16 (`_HEAD_PADDING`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general`; a bfloat16 dense-layer product ([..., K] x [K, N]) through `_dense`."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    dense = (
        tuple(lhs_contract) == (lhs.ndim - 1,)
        and tuple(rhs_contract) == (0,)
        and rhs.ndim == 2
        and not lhs_batch
        and not rhs_batch
    )
    if dense and lhs.dtype == rhs.dtype == jnp.bfloat16 and preferred_element_type is None:
        return _dense(lhs, rhs, None, precision)
    return lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def dense(x, kernel, bias=None, precision=None):
    """x [..., K] @ kernel [K, N] (+ bias [N]) -> [..., N], in x's dtype.

    bfloat16 x and kernel: products summed in float32, the bias (in its own dtype, float32 master
    weights) added to the sums before the one rounding; its gradient comes back in bias's dtype.
    Other dtypes: the plain expression.
    """
    if x.dtype == kernel.dtype == jnp.bfloat16:
        return _dense(x, kernel, bias, precision)
    product = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
    return product if bias is None else product + bias.astype(product.dtype)


def _accumulated(lhs, rhs, lhs_axis: int, rhs_axis: int, precision, batch: int = 0):
    """lhs and rhs contracted over one axis each, batched over their first `batch` axes, products
    summed in float32."""
    batch_axes = tuple(range(batch))
    return lax.dot_general(
        lhs,
        rhs,
        (((lhs_axis % lhs.ndim,), (rhs_axis % rhs.ndim,)), (batch_axes, batch_axes)),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def _transposed_product(a, b, precision):
    """a [..., M, X], b [..., M, Y] -> a^T @ b [..., X, Y] in float32, batched over the leading
    axes (the kernel's gradient x^T @ grad; attention's weights^T @ grad and grad_logits^T @ q).

    YNNPACK takes a bfloat16 dot only with its lhs row-major and contracted over its last axis,
    and XLA:CPU folds a transpose written before the dot back into its dimension numbers; the
    dot then runs in Eigen at float32 speed after converting both operands. A transpose padded
    with one zero row is not folded away, so on CPU the narrower operand of a bfloat16 product is
    transposed and padded, and the product's extra row dropped: about 2x faster at GroupViT-S's
    shapes (docs/performance.md). Other dtypes and platforms take the contraction as it is.
    """
    batch = a.ndim - 2
    plain = lambda a, b: _accumulated(a, b, -2, -2, precision, batch)
    if a.dtype != jnp.bfloat16:
        return plain(a, b)

    def on_cpu(a, b):
        padded = lambda y: jnp.pad(jnp.swapaxes(y, -1, -2), ((0, 0),) * batch + ((0, 1), (0, 0)))
        if a.shape[-1] <= b.shape[-1]:
            return _accumulated(padded(a), b, -1, -2, precision, batch)[..., :-1, :]
        product = _accumulated(padded(b), a, -1, -2, precision, batch)[..., :-1, :]
        return jnp.swapaxes(product, -1, -2)

    return lax.platform_dependent(a, b, cpu=on_cpu, default=plain)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dense(x, kernel, bias, precision):
    """x [..., K] @ kernel [K, N] (+ bias [N], or None) -> [..., N] in x's dtype, accumulated
    in float32."""
    out = _accumulated(x, kernel, x.ndim - 1, 0, precision)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(x.dtype)


def _dense_forward(x, kernel, bias, precision):
    return _dense(x, kernel, bias, precision), (x, kernel, bias)


def _dense_backward(precision, saved, grad):
    x, kernel, bias = saved
    grad = grad.astype(x.dtype)
    rows = grad.reshape(-1, grad.shape[-1])
    grad_x = _accumulated(grad, kernel, grad.ndim - 1, 1, precision).astype(x.dtype)
    grad_kernel = _transposed_product(x.reshape(-1, x.shape[-1]), rows, precision)
    grad_bias = None
    if bias is not None:
        grad_bias = jnp.sum(rows.astype(jnp.float32), axis=0).astype(bias.dtype)
    return grad_x, grad_kernel.astype(kernel.dtype), grad_bias


_dense.defvjp(_dense_forward, _dense_backward)


def attention(q, k, v, causal: bool = False):
    """softmax(q @ k^T) @ v over the last two axes, batched over the others: q [..., T, D] (scaled
    already), k and v [..., S, D] -> [..., T, D] in q's dtype; `causal` keeps s <= t.

    The logits and the softmax in float32; the two products as `dense`'s, in q's dtype with
    float32 sums, the logits and the softmax's weights rounded to that dtype as a bfloat16 einsum
    rounds them (and PyTorch's autocast). The backward pass (`jax.custom_vjp`) reads the saved
    softmax output, p * (g - sum(g * p)) as PyTorch's, where autodiff recomputes it from a
    broadcast of 1 / sum that XLA:CPU writes out in full; its four products take bfloat16
    operands and give float32 sums, the two contracting their lhs over its first axis through
    `_transposed_product`. The same function and gradient as the einsums' (docs/performance.md).
    """
    plain = lambda q, k, v: _attention(q, k, v, causal)
    if q.dtype != jnp.bfloat16:
        return plain(q, k, v)

    def on_cpu(q, k, v):
        padded = lambda a: jnp.pad(a, ((0, 0),) * (a.ndim - 1) + ((0, _HEAD_PADDING),))
        return _attention(padded(q), padded(k), padded(v), causal)[..., :-_HEAD_PADDING]

    return lax.platform_dependent(q, k, v, cpu=on_cpu, default=plain)


# Zero columns appended to bfloat16 heads on CPU. Heads split off a dense layer's output are
# transposes, which XLA:CPU folds into the attention's dots; it then gives those dots float32
# operands (a float32 copy of each head) where YNNPACK took bfloat16 ones. Padded, the heads are
# materialised in bfloat16, and the zeros add nothing to the sums (two keep the width even).
_HEAD_PADDING = 2


def _rounded(x, dtype):
    """float32 x rounded to `dtype` (a no-op for float32), back in float32."""
    return x.astype(dtype).astype(jnp.float32)


def _attention_probs(q, k, causal):
    logits = _rounded(_accumulated(q, k, -1, -1, None, q.ndim - 2), q.dtype)
    if causal:
        logits = jnp.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, causal):
    return _attention_forward(q, k, v, causal)[0]


def _attention_forward(q, k, v, causal):
    probs = _attention_probs(q, k, causal)
    out = _accumulated(probs.astype(v.dtype), v, -1, -2, None, q.ndim - 2).astype(q.dtype)
    return out, (q, k, v, probs)


def _attention_backward(causal, saved, grad):
    del causal  # masked weights are 0, and so are their logits' gradients
    q, k, v, probs = saved
    batch = q.ndim - 2
    grad = grad.astype(q.dtype)
    grad_v = _transposed_product(probs.astype(v.dtype), grad, None).astype(v.dtype)
    grad_weights = _rounded(_accumulated(grad, v, -1, -1, None, batch), v.dtype)
    grad_logits = probs * (grad_weights - jnp.sum(grad_weights * probs, axis=-1, keepdims=True))
    grad_logits = grad_logits.astype(q.dtype)
    grad_q = _accumulated(grad_logits, k, -1, -2, None, batch).astype(q.dtype)
    grad_k = _transposed_product(grad_logits, q, None).astype(k.dtype)
    return grad_q, grad_k, grad_v


_attention.defvjp(_attention_forward, _attention_backward)


def activation(fn, x):
    """fn(x) for an elementwise fn (a hashable one: a module-level function); bfloat16 x: fn in
    float32, rounded to bfloat16 once, forward and backward.

    As PyTorch's kernels compute an activation of bfloat16 tensors: the gradient is fn's float32
    derivative at x times the cotangent, rounded once, recomputed from the saved input alone.
    Autodiff of fn in bfloat16 rounds after every operation and saves an intermediate for each,
    and XLA:CPU's bfloat16 elementwise code (a convert pair per rounding) ran the GroupViT-S
    GELU's forward and backward 2.4x slower than this (docs/performance.md). Other dtypes: fn(x).
    """
    return _activation(fn, x) if x.dtype == jnp.bfloat16 else fn(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _activation(fn, x):
    return fn(x.astype(jnp.float32)).astype(x.dtype)


def _activation_forward(fn, x):
    return _activation(fn, x), x


def _activation_backward(fn, x, grad):
    _, vjp = jax.vjp(fn, x.astype(jnp.float32))
    return (vjp(grad.astype(jnp.float32))[0].astype(x.dtype),)


_activation.defvjp(_activation_forward, _activation_backward)
