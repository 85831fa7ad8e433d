"""Dense layers' matmuls in bfloat16 with float32 accumulation, forward and backward.

`dot_general` is a drop-in for `lax.dot_general` in `flax.linen.Dense(dot_general=...)`. For
bfloat16 operands it computes what a bfloat16 dot computes on XLA:CPU, TPU and GPU alike
(bfloat16 products summed in float32, the result rounded to bfloat16), and so do the two matmuls
of its backward pass; any other dot is `lax.dot_general` itself.

Why: XLA:CPU has no bfloat16 dot with a bfloat16 result. It rewrites one into converts around a
float32 dot, which runs at float32 speed after two extra passes over the operands. A dot of
bfloat16 operands with a float32 result (`preferred_element_type`) goes to YNNPACK's bfloat16
kernel, 2.2x faster on an AVX512-BF16 CPU (docs/performance.md). The backward pass needs its own
rule (`jax.custom_vjp`): JAX's transpose of that dot multiplies the float32 cotangent with a
bfloat16 operand, which XLA:CPU again runs as a float32 dot; here the cotangent is rounded to
bfloat16 first, as PyTorch's autocast does.
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
        return _dense(lhs, rhs, precision)
    return lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def _accumulated(lhs, rhs, lhs_axis: int, rhs_axis: int, precision):
    """lhs and rhs contracted over one axis each, products summed in float32."""
    return lax.dot_general(
        lhs,
        rhs,
        (((lhs_axis,), (rhs_axis,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x, kernel, precision):
    """x [..., K] @ kernel [K, N] -> [..., N], in x's dtype, accumulated in float32."""
    return _accumulated(x, kernel, x.ndim - 1, 0, precision).astype(x.dtype)


def _dense_forward(x, kernel, precision):
    return _dense(x, kernel, precision), (x, kernel)


def _dense_backward(precision, saved, grad):
    x, kernel = saved
    grad = grad.astype(x.dtype)
    grad_x = _accumulated(grad, kernel, grad.ndim - 1, 1, precision).astype(x.dtype)
    grad_kernel = _accumulated(
        x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1]), 0, 0, precision
    ).astype(kernel.dtype)
    return grad_x, grad_kernel


_dense.defvjp(_dense_forward, _dense_backward)
