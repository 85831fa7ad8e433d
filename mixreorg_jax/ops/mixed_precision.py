"""Dense layers' matmuls in bfloat16 with float32 accumulation, forward and backward.

`dense` is a dense layer's x @ kernel + bias; `dot_general` is a drop-in for `lax.dot_general`
in `flax.linen.Dense(dot_general=...)`, the same product without the bias. For
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
is one float32 sum over the rows.
"""

import functools

import jax
import jax.numpy as jnp
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


def _accumulated(lhs, rhs, lhs_axis: int, rhs_axis: int, precision):
    """lhs and rhs contracted over one axis each, products summed in float32."""
    return lax.dot_general(
        lhs,
        rhs,
        (((lhs_axis,), (rhs_axis,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def _weight_gradient(x, grad, precision):
    """x [M, K], grad [M, N] -> x^T @ grad [K, N] in float32 (the kernel's gradient).

    YNNPACK takes a bfloat16 dot only with its lhs row-major and contracted over its last axis,
    and XLA:CPU folds a transpose written before the dot back into its dimension numbers; the
    dot then runs in Eigen at float32 speed after converting both operands. A transpose padded
    with one zero row is not folded away, so on CPU the narrower operand is transposed and
    padded, and the product's extra row dropped: about 2x faster at GroupViT-S's shapes
    (docs/performance.md). Other platforms take the contraction as it is.
    """

    def on_cpu(x, grad):
        if x.shape[1] <= grad.shape[1]:
            padded = jnp.pad(x.T, ((0, 1), (0, 0)))
            return _accumulated(padded, grad, 1, 0, precision)[:-1]
        padded = jnp.pad(grad.T, ((0, 1), (0, 0)))
        return _accumulated(padded, x, 1, 0, precision)[:-1].T

    return lax.platform_dependent(
        x, grad, cpu=on_cpu, default=lambda x, grad: _accumulated(x, grad, 0, 0, precision)
    )


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
    grad_kernel = _weight_gradient(x.reshape(-1, x.shape[-1]), rows, precision)
    grad_bias = None
    if bias is not None:
        grad_bias = jnp.sum(rows.astype(jnp.float32), axis=0).astype(bias.dtype)
    return grad_x, grad_kernel.astype(kernel.dtype), grad_bias


_dense.defvjp(_dense_forward, _dense_backward)
