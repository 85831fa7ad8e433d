"""PyTorch-compatible bicubic resizing (position-embedding interpolation, docs/method.md §1).

`torch.nn.functional.interpolate(mode='bicubic', align_corners=False)` uses the cubic convolution
kernel with a = -0.75 and clamps sample indices at the border; `jax.image.resize('bicubic')` uses
a = -0.5 (Keys) and renormalises at the edges, so it gives different position embeddings than
the PyTorch models the checkpoints come from.
"""

import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75  # PyTorch's (and OpenCV's) cubic convolution coefficient.


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional positions t: [n] -> [n, 4]."""
    a = _CUBIC_A
    near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1  # |d| <= 1
    far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The linear map of 1-D torch bicubic resizing (align_corners=False): float64[out, in].

    Output sample i reads the input at (i + 0.5) * in / out - 0.5 (not clamped, unlike
    bilinear); its 4 taps are clamped to [0, in - 1], so border taps add up on the edge sample.
    """
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    left = np.floor(src)
    weights = _cubic_weights(src - left)  # [out, 4]
    taps = np.clip(left[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
    matrix = np.zeros((out_size, in_size))
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return matrix


def bicubic_resize(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """Resizes the two spatial axes like torch bicubic interpolation with align_corners=False.

    Args:
        x: float[..., H, W, C] (channels last).
        size: (height, width) of the output.

    Returns:
        float[..., height, width, C], computed in float32 and cast back to x's dtype.
    """
    height, width = size
    rows = jnp.asarray(bicubic_matrix(x.shape[-3], height), jnp.float32)
    cols = jnp.asarray(bicubic_matrix(x.shape[-2], width), jnp.float32)
    out = jnp.einsum("hH,...HWc,wW->...hwc", rows, x.astype(jnp.float32), cols, precision="highest")
    return out.astype(x.dtype)
