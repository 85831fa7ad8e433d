"""GroupViT (Xu et al. 2022; docs/method.md §1) in flax.linen.

Numerically the same network as `transformers.GroupViTModel` in eval mode (tests/test_convert.py
checks it); `mixreorg_jax.convert` maps its checkpoints both ways.

Variables: `params` (float32 whatever the compute dtype) and `batch_stats` (the projectors'
BatchNorm running averages). Random streams: 'dropout' (drop-path) and 'gumbel' (the grouping
noise), both only with `train=True`.

The modules are setup()-style so that a caller can run pieces of the image encoder through
`model.apply(..., method=...)`: MixReorg's forward (models/mixreorg.py) runs
`vision.embed`, `vision.stage1` over a slice of the stage-1 blocks, and `vision.group`.

Assignment maps are token -> group, [B, N, G] (softmax over G), the transpose of HF's
`attentions` [B, G, N].
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mixreorg_jax.ops import mixed_precision, resize

_kernel_init = nn.initializers.truncated_normal(0.02)
WEIGHT_INITS = ("groupvit", "lecun_normal")


def weight_init(config: ml_collections.ConfigDict) -> Callable:
    """The initialiser of kernels, position embeddings and group tokens (`config.weight_init`).

    'groupvit': truncated normal, std 0.02, as GroupViT and HF (made for width 384). 'lecun_normal':
    std 1/sqrt(fan_in), larger at small widths such as the demo's 64 (see
    docs/results.md 3.1, 3.3).
    """
    name = config.get("weight_init", "groupvit")
    if name not in WEIGHT_INITS:
        raise ValueError(f"config.weight_init must be one of {WEIGHT_INITS}, got {name!r}")
    return _kernel_init if name == "groupvit" else nn.initializers.lecun_normal()


def quick_gelu(x: jnp.ndarray) -> jnp.ndarray:
    """CLIP's GELU approximation, x * sigmoid(1.702 x): the text tower's activation.

    bfloat16 x: computed in float32 and rounded once, as PyTorch's kernel does
    (`mixed_precision.activation`).
    """
    return mixed_precision.activation(_quick_gelu, x)


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jnp.ndarray) -> jnp.ndarray:
    """The erf GELU of torch.nn.GELU(), 0.5 x (1 + erf(x / sqrt 2)): the vision tower's activation.

    Written with erf, as PyTorch computes it: `jax.nn.gelu(approximate=False)` goes through erfc,
    whose XLA:CPU expansion (exponentials and selects) made the forward and backward pass 2x
    slower at GroupViT-S's MLP shapes (docs/performance.md). bfloat16 x: computed in float32 and
    rounded once, as PyTorch's kernel does (`mixed_precision.activation`).
    """
    return mixed_precision.activation(_exact_gelu, x)


def _exact_gelu(x):
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(2**-0.5, x.dtype)))


def l2_normalize(x: jnp.ndarray, axis: int = -1, eps: float = 1e-12) -> jnp.ndarray:
    """x / max(|x|, eps) along `axis`, in float32 (torch.nn.functional.normalize)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def straight_through_one_hot(probs: jnp.ndarray) -> jnp.ndarray:
    """One-hot of argmax over the last axis, with the gradient of `probs` (straight-through).

    Args:
        probs: float[..., G].
    Returns:
        float[..., G]: exactly the one-hot (p - p is exactly 0; HF's hard - p + p is one-hot
        only up to rounding), with gradient d/dprobs = identity.
    """
    hard = jax.nn.one_hot(jnp.argmax(probs, axis=-1), probs.shape[-1], dtype=probs.dtype)
    return hard + (probs - jax.lax.stop_gradient(probs))


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field when `config` does not describe a GroupViT."""
    weight_init(config)  # Raises for an unknown name.
    if config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.dtype must be 'float32' or 'bfloat16', got {config.dtype!r}")
    if config.width % config.num_heads:
        raise ValueError(
            f"config.width={config.width} is not divisible by num_heads={config.num_heads}"
        )
    if config.text_width % config.text_heads:
        raise ValueError(
            f"config.text_width={config.text_width} is not divisible by "
            f"text_heads={config.text_heads}"
        )
    if config.image_size % config.patch_size:
        raise ValueError(
            f"config.image_size={config.image_size} is not a multiple of "
            f"patch_size={config.patch_size}"
        )
    stages = (len(config.depths), len(config.num_group_tokens), len(config.num_output_groups))
    if len(set(stages)) != 1:
        raise ValueError(
            "config.depths, num_group_tokens and num_output_groups must have one entry "
            f"per stage, got lengths {stages}"
        )
    if config.num_group_tokens[0] <= 0:
        raise ValueError("config.num_group_tokens[0] must be positive (stage 1 groups the patches)")
    for i in range(1, len(config.depths)):
        prev_tokens, prev_groups = config.num_group_tokens[i - 1], config.num_output_groups[i - 1]
        if config.num_group_tokens[i] and (prev_tokens <= 0 or prev_tokens != prev_groups):
            raise ValueError(
                f"stage {i} has group tokens, which are derived from stage {i - 1}'s: stage {i - 1} "
                f"needs num_group_tokens == num_output_groups > 0, got {prev_tokens} and {prev_groups}"
            )


class DropPath(nn.Module):
    """Stochastic depth: zeroes a sample's residual branch with probability `rate` (train only)."""

    rate: float

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(
            self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1)
        )
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Dense(nn.Module):
    """nn.Dense's parameters (float32 kernel [in, features] and bias) and result, computed by
    `mixed_precision.dense`: in bfloat16, float32 sums forward and backward, bias included."""

    features: int
    dtype: jnp.dtype
    kernel_init: Callable = _kernel_init

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return mixed_precision.dense(x.astype(self.dtype), kernel.astype(self.dtype), bias)


class Mlp(nn.Module):
    """Dense(hidden) -> activation -> Dense(out) over the last axis."""

    hidden: int
    out: int
    activation: Callable
    dtype: jnp.dtype
    kernel_init: Callable = _kernel_init

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dense = lambda features, name: Dense(features, self.dtype, self.kernel_init, name=name)
        return dense(self.out, "fc2")(self.activation(dense(self.hidden, "fc1")(x)))


class TokenMlp(nn.Module):
    """An Mlp across tokens (MLP-Mixer's token mixing): [B, T, C] -> [B, out, C]."""

    hidden: int
    out: int
    activation: Callable
    dtype: jnp.dtype
    kernel_init: Callable = _kernel_init

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        mlp = Mlp(self.hidden, self.out, self.activation, self.dtype, self.kernel_init, name="mlp")
        return jnp.swapaxes(mlp(jnp.swapaxes(x, 1, 2)), 1, 2)


class Attention(nn.Module):
    """Multi-head (cross-)attention with qkv bias; softmax in float32."""

    num_heads: int
    dtype: jnp.dtype
    kernel_init: Callable = _kernel_init

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, context: jnp.ndarray | None = None, *, causal: bool = False
    ) -> jnp.ndarray:
        """x: [B, T, C] queries; context: [B, S, C] keys/values (default x) -> [B, T, C]."""
        context = x if context is None else context
        width = x.shape[-1]
        head_dim = width // self.num_heads
        dense = lambda name: Dense(width, self.dtype, self.kernel_init, name=name)
        # [B, T, C] -> [B, H, T, D]: each head's matrices contiguous for the two products.
        heads = lambda y: jnp.swapaxes(y.reshape(y.shape[:2] + (self.num_heads, head_dim)), 1, 2)
        q = heads(dense("query")(x) * np.asarray(head_dim**-0.5, self.dtype))  # HF scales q too
        k, v = heads(dense("key")(context)), heads(dense("value")(context))
        out = jnp.swapaxes(mixed_precision.attention(q, k, v, causal), 1, 2)
        out = out.reshape(x.shape[:2] + (width,))
        return dense("out")(out)


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth."""

    num_heads: int
    mlp_hidden: int
    activation: Callable
    layer_norm_eps: float
    dtype: jnp.dtype
    drop_path: float = 0.0
    causal: bool = False
    kernel_init: Callable = _kernel_init

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name=name)
        y = Attention(self.num_heads, self.dtype, self.kernel_init, name="attn")(
            norm("norm1")(x), causal=self.causal
        )
        x = x + DropPath(self.drop_path, name="drop_path_attn")(y, train)
        y = Mlp(
            self.mlp_hidden, x.shape[-1], self.activation, self.dtype, self.kernel_init, name="mlp"
        )(norm("norm2")(x))
        return x + DropPath(self.drop_path, name="drop_path_mlp")(y, train)


def _maybe_remat(module_class, config: ml_collections.ConfigDict, train_argnum: int):
    """`module_class`, rematerialised in the backward pass when `config.remat`.

    `train_argnum` (counting self) is the position of `train`, a Python bool that decides the
    graph, so it is static.
    """
    return nn.remat(module_class, static_argnums=(train_argnum,)) if config.remat else module_class


class CrossAttentionBlock(nn.Module):
    """Post-norm: g + Attn(g, x), + MLP(LN(.)), then LN (GroupViT's pre-assignment block)."""

    num_heads: int
    mlp_hidden: int
    layer_norm_eps: float
    dtype: jnp.dtype
    kernel_init: Callable = _kernel_init

    @nn.compact
    def __call__(self, groups: jnp.ndarray, tokens: jnp.ndarray) -> jnp.ndarray:
        norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name=name)
        x = groups + Attention(self.num_heads, self.dtype, self.kernel_init, name="attn")(
            groups, tokens
        )
        x = x + Mlp(
            self.mlp_hidden, x.shape[-1], exact_gelu, self.dtype, self.kernel_init, name="mlp"
        )(norm("norm_mlp")(x))
        return norm("norm_post")(x)


class AssignAttention(nn.Module):
    """Hard single-head assignment of tokens to groups and per-group averaging of their values."""

    assign_eps: float
    dtype: jnp.dtype
    kernel_init: Callable = _kernel_init

    @nn.compact
    def __call__(self, groups: jnp.ndarray, tokens: jnp.ndarray, train: bool):
        """Assigns tokens [B, N, C] to groups [B, G, C].

        Returns:
            out: [B, G, C], the output projection of each group's mean value,
                sum of its tokens' v / (count + assign_eps).
            soft: float32[B, N, G], softmax over groups of the assignment logits (no noise).
            hard: float32[B, N, G], straight-through one-hot over groups; with gumbel noise
                (rng stream 'gumbel', tau 1) in training, of the plain logits otherwise.
        """
        width = groups.shape[-1]
        dense = lambda name: Dense(width, self.dtype, self.kernel_init, name=name)
        q, k, v = dense("query")(groups), dense("key")(tokens), dense("value")(tokens)
        logits = (
            jnp.einsum("bnc,bgc->bng", k.astype(jnp.float32), q.astype(jnp.float32)) * width**-0.5
        )
        soft = jax.nn.softmax(logits, axis=-1)
        if train:
            noisy = logits + jax.random.gumbel(self.make_rng("gumbel"), logits.shape, jnp.float32)
            hard = straight_through_one_hot(jax.nn.softmax(noisy, axis=-1))
        else:
            hard = straight_through_one_hot(soft)
        weights = hard / (jnp.sum(hard, axis=1, keepdims=True) + self.assign_eps)
        out = jnp.einsum("bng,bnc->bgc", weights.astype(self.dtype), v)
        return dense("out")(out), soft, hard


class GroupingBlock(nn.Module):
    """Merges image tokens into `num_output_groups` segment tokens (docs/method.md §1)."""

    config: ml_collections.ConfigDict
    num_output_groups: int

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, group_tokens: jnp.ndarray, train: bool):
        """tokens [B, N, C], group tokens [B, G, C] -> (segments [B, G_out, C], soft, hard [B, N, G_out])."""
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        width = cfg.width
        norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=dtype, name=name)
        token_hidden, channel_hidden = (int(r * width) for r in cfg.assign_mlp_ratio)
        init = weight_init(cfg)
        groups = norm("norm_tokens")(group_tokens)
        tokens = norm("norm_x")(tokens)
        groups = TokenMlp(
            token_hidden, self.num_output_groups, exact_gelu, dtype, init, name="token_mlp"
        )(groups)
        groups = norm("norm_post_tokens")(groups)
        groups = CrossAttentionBlock(
            cfg.num_heads,
            round(cfg.mlp_ratio * width),
            cfg.layer_norm_eps,
            dtype,
            init,
            name="cross_attn",
        )(groups, tokens)
        out, soft, hard = AssignAttention(cfg.get("assign_eps", 1.0), dtype, init, name="assign")(
            groups, tokens, train
        )
        # The residual goes to the attended group tokens, not to the raw ones.
        out = out + groups
        out = out + Mlp(channel_hidden, width, exact_gelu, dtype, init, name="mlp")(
            norm("norm_out")(out)
        )
        return out, soft, hard


class VisionStage(nn.Module):
    """Blocks over [tokens; group tokens], then a GroupingBlock (if the stage has group tokens)."""

    config: ml_collections.ConfigDict
    index: int
    drop_path_rates: tuple[float, ...]

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        self.num_group_tokens = cfg.num_group_tokens[self.index]
        kernel_init = weight_init(cfg)
        if self.num_group_tokens:
            # Stage-1 tokens are the learned queries; later ones start at zero and get the
            # projection of the previous stage's tokens added.
            init = kernel_init if self.index == 0 else nn.initializers.zeros
            self.group_tokens = self.param(
                "group_tokens", init, (1, self.num_group_tokens, cfg.width)
            )
            self.grouping = _maybe_remat(GroupingBlock, cfg, 3)(
                cfg, cfg.num_output_groups[self.index]
            )
            if self.index > 0:
                self.group_projector_norm = nn.LayerNorm(cfg.layer_norm_eps, dtype=dtype)
                self.group_projector = TokenMlp(
                    cfg.width // 2, self.num_group_tokens, exact_gelu, dtype, kernel_init
                )
        block = _maybe_remat(Block, cfg, 2)
        self.blocks = [
            block(
                cfg.num_heads,
                round(cfg.mlp_ratio * cfg.width),
                exact_gelu,
                cfg.layer_norm_eps,
                dtype,
                drop_path=rate,
                kernel_init=kernel_init,
            )
            for rate in self.drop_path_rates
        ]

    def initial_group_tokens(self, batch_size: int, prev_group_tokens: jnp.ndarray | None):
        """The stage's group tokens [B, G, C] (None without grouping), from the previous stage's."""
        if not self.num_group_tokens:
            return None
        tokens = jnp.broadcast_to(self.group_tokens, (batch_size,) + self.group_tokens.shape[1:])
        tokens = tokens.astype(jnp.dtype(self.config.dtype))
        if self.index > 0:
            tokens = tokens + self.group_projector(self.group_projector_norm(prev_group_tokens))
        return tokens

    def run_blocks(self, x, group_tokens, blocks: slice, train: bool):
        """Runs self.blocks[blocks] over [x; group_tokens] ([B, N, C], [B, G, C] or None)."""
        if group_tokens is not None:
            x = jnp.concatenate([x, group_tokens.astype(x.dtype)], axis=1)
        for block in self.blocks[blocks]:
            x = block(x, train)
        if group_tokens is None:
            return x, None
        return x[:, : -self.num_group_tokens], x[:, -self.num_group_tokens :]

    def regroup(self, x, group_tokens, train: bool):
        """The stage's GroupingBlock: (segments [B, G_out, C], soft, hard [B, N, G_out])."""
        return self.grouping(x, group_tokens, train)


class PatchEmbedding(nn.Module):
    """Non-overlapping p x p patches -> linear map; the kernel has nn.Conv's layout [p, p, C, D].

    A reshape and a matmul: on CPU about twice as fast as the equivalent strided convolution.
    """

    patch_size: int
    features: int
    dtype: jnp.dtype
    kernel_init: Callable = _kernel_init

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        """images [B, H, W, C] -> [B, H/p, W/p, D]."""
        p = self.patch_size
        batch, height, width, channels = images.shape
        kernel = self.param("kernel", self.kernel_init, (p, p, channels, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        h, w = height // p, width // p
        patches = images.reshape(batch, h, p, w, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, h, w, p * p * channels).astype(self.dtype)
        kernel = kernel.reshape(-1, self.features).astype(self.dtype)
        return mixed_precision.dense(patches, kernel, bias)


class VisionEncoder(nn.Module):
    """GroupViT's image encoder: patches -> stages of blocks and grouping -> segment tokens."""

    config: ml_collections.ConfigDict

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        self.grid_size = cfg.image_size // cfg.patch_size
        kernel_init = weight_init(cfg)
        self.patch_embed = PatchEmbedding(cfg.patch_size, cfg.width, dtype, kernel_init)
        self.patch_norm = nn.LayerNorm(cfg.layer_norm_eps, dtype=dtype)
        self.position_embedding = self.param(
            "position_embedding", kernel_init, (1, self.grid_size**2, cfg.width)
        )
        rates = [float(r) for r in np.linspace(0.0, cfg.drop_path_rate, sum(cfg.depths))]
        starts = np.cumsum((0,) + tuple(cfg.depths))
        self.stages = [
            VisionStage(cfg, i, tuple(rates[starts[i] : starts[i + 1]]))
            for i in range(len(cfg.depths))
        ]
        self.norm = nn.LayerNorm(cfg.layer_norm_eps, dtype=dtype)

    def embed(self, images: jnp.ndarray) -> jnp.ndarray:
        """images float[B, H, W, C] (normalised; H, W multiples of the patch size) -> [B, N, width].

        Another grid than the model's gets the position embedding resized like PyTorch's bicubic.
        """
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != cfg.num_channels:
            raise ValueError(f"images must be [B, H, W, {cfg.num_channels}], got {images.shape}")
        p = cfg.patch_size
        if images.shape[1] % p or images.shape[2] % p:
            raise ValueError(
                f"image size {images.shape[1:3]} is not a multiple of the patch size {p}"
            )
        x = self.patch_norm(self.patch_embed(images))
        batch, h, w, width = x.shape
        position = self.position_embedding
        if (h, w) != (self.grid_size, self.grid_size):
            grid = position.reshape(self.grid_size, self.grid_size, width)
            position = resize.bicubic_resize(grid, (h, w)).reshape(1, h * w, width)
        return x.reshape(batch, h * w, width) + position.astype(x.dtype)

    def stage1_group_tokens(self, batch_size: int) -> jnp.ndarray:
        """The learned stage-1 group tokens broadcast to a batch: [batch_size, G1, width]."""
        return self.stages[0].initial_group_tokens(batch_size, None)

    def stage1(
        self,
        x: jnp.ndarray,
        group_tokens: jnp.ndarray,
        *,
        blocks: slice = slice(None),
        train: bool = False,
    ):
        """Runs the stage-1 blocks `blocks` over [x; group_tokens]: ([B, N, C], [B, G1, C]) -> same."""
        return self.stages[0].run_blocks(x, group_tokens, blocks, train)

    def patch_features(self, images: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        """[B, H, W, C] -> [B, width]: the mean of the patch tokens after the stage-1 blocks (a
        plain ViT's feature: what backbone pre-training classifies, configs/backbone.py)."""
        x = self.embed(images)
        x, _ = self.stage1(x, self.stage1_group_tokens(x.shape[0]), train=train)
        return jnp.mean(x, axis=1)

    def group(
        self, x: jnp.ndarray, stage1_group_tokens: jnp.ndarray, *, train: bool = False
    ) -> dict:
        """Everything after the stage-1 blocks.

        Args:
            x: [B, N, C] patch tokens out of the stage-1 blocks.
            stage1_group_tokens: [B, G1, C] group tokens out of the stage-1 blocks.

        Returns:
            segments: [B, G, C] final tokens after the last LayerNorm.
            pooled: [B, C] their mean.
            soft_assignments, hard_assignments: per grouping stage, float32 [B, N_in, G_out]
                (token -> group; soft = softmax, hard = straight-through one-hot).
        """
        soft, hard = [], []
        group_tokens = stage1_group_tokens
        for stage in self.stages:
            if stage.index > 0:
                group_tokens = stage.initial_group_tokens(x.shape[0], group_tokens)
                x, group_tokens = stage.run_blocks(x, group_tokens, slice(None), train)
            if group_tokens is not None:
                x, stage_soft, stage_hard = stage.regroup(x, group_tokens, train)
                soft.append(stage_soft)
                hard.append(stage_hard)
        segments = self.norm(x)
        return dict(
            segments=segments,
            pooled=jnp.mean(segments, axis=1),
            soft_assignments=tuple(soft),
            hard_assignments=tuple(hard),
        )

    def __call__(self, images: jnp.ndarray, *, train: bool = False) -> dict:
        x = self.embed(images)
        x, group_tokens = self.stage1(x, self.stage1_group_tokens(x.shape[0]), train=train)
        return self.group(x, group_tokens, train=train)


class TextEncoder(nn.Module):
    """CLIP-style causal text transformer; the feature is read at the end-of-text token."""

    config: ml_collections.ConfigDict

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        self.token_embedding = nn.Embed(
            cfg.vocab_size, cfg.text_width, dtype=dtype, embedding_init=nn.initializers.normal(0.02)
        )
        self.position_embedding = self.param(
            "position_embedding", nn.initializers.normal(0.01), (cfg.context_length, cfg.text_width)
        )
        block, kernel_init = _maybe_remat(Block, cfg, 2), weight_init(cfg)
        self.blocks = [
            block(
                cfg.text_heads,
                round(cfg.text_mlp_ratio * cfg.text_width),
                quick_gelu,
                cfg.layer_norm_eps,
                dtype,
                causal=True,
                kernel_init=kernel_init,
            )
            for _ in range(cfg.text_layers)
        ]
        self.norm = nn.LayerNorm(cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """tokens int[B, L] (L <= context_length; EOT the largest id of each row) -> [B, text_width]."""
        if tokens.ndim != 2 or tokens.shape[1] > self.config.context_length:
            raise ValueError(
                f"tokens must be [B, L] with L <= {self.config.context_length}, got {tokens.shape}"
            )
        x = self.token_embedding(tokens)
        x = x + self.position_embedding[: tokens.shape[1]].astype(x.dtype)
        for block in self.blocks:
            # Text blocks never use drop-path, so `train` does not matter here.
            x = block(x, False)
        x = self.norm(x)
        return x[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)]


class BatchNorm(nn.Module):
    """BatchNorm over all leading axes that matches torch.nn.BatchNorm1d.

    Running averages: r <- momentum r + (1 - momentum) s (torch momentum 0.1 == 0.9 here), the
    variance's with the unbiased batch variance (normalisation uses the biased one, as torch).
    `batch_stats`: mean, var and count (torch's num_batches_tracked).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        *,
        train: bool,
        stats_from: jnp.ndarray | None = None,
        update_stats: bool = True,
    ) -> jnp.ndarray:
        """x [..., F] -> [..., F]; in training normalised with the statistics of `stats_from`
        ([..., F], default x) over all its leading axes (the global batch under jit)."""
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        count = self.variable("batch_stats", "count", jnp.zeros, (), jnp.int32)
        if train:
            ref = (
                (x if stats_from is None else stats_from).reshape(-1, features).astype(jnp.float32)
            )
            n = ref.shape[0]
            if n < 2:
                raise ValueError(
                    f"BatchNorm in training needs more than one value per feature, got {n}"
                )
            mean = jnp.mean(ref, axis=0)
            var = jnp.mean(jnp.square(ref - mean), axis=0)
            if update_stats and not self.is_initializing():
                m = self.momentum
                running_mean.value = m * running_mean.value + (1 - m) * mean
                running_var.value = m * running_var.value + (1 - m) * var * (n / (n - 1))
                count.value = count.value + 1
        else:
            mean, var = running_mean.value, running_var.value
        y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


class Projector(nn.Module):
    """Dense(hidden) -> BatchNorm -> ReLU -> Dense(out). Returns UNnormalised vectors; GroupViT's
    project_* methods L2-normalise them."""

    hidden: int
    out: int
    dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = _kernel_init

    def setup(self):
        self.fc1 = Dense(self.hidden, self.dtype, self.kernel_init)
        self.bn = BatchNorm(dtype=self.dtype)
        self.fc2 = Dense(self.out, self.dtype, self.kernel_init)

    def __call__(
        self,
        x: jnp.ndarray,
        *,
        train: bool,
        stats_from: jnp.ndarray | None = None,
        update_stats: bool = True,
    ) -> jnp.ndarray:
        """x [..., in] -> [..., out].

        Args:
            train: normalise with batch statistics (else with the running averages).
            stats_from: [..., in] the inputs whose hidden activations give the batch statistics
                (default x): MixReorg normalises segment tokens with their branch's pooled vectors.
            update_stats: update the running averages (train only; needs `batch_stats` mutable).
        """
        h = self.fc1(x)
        ref = None if stats_from is None or not train else self.fc1(stats_from)
        h = self.bn(h, train=train, stats_from=ref, update_stats=update_stats)
        return self.fc2(nn.relu(h))


class GroupViT(nn.Module):
    """Image and text towers, their projectors and the learned logit scale.

    Training calls (`train=True`) need rngs {'gumbel', 'dropout'} and, unless update_stats=False,
    `mutable=['batch_stats']` (the projectors' running averages).
    """

    config: ml_collections.ConfigDict

    def setup(self):
        cfg = self.config
        validate_config(cfg)
        dtype = jnp.dtype(cfg.dtype)
        self.vision = VisionEncoder(cfg)
        self.text = TextEncoder(cfg)
        kernel_init = weight_init(cfg)
        self.image_projector = Projector(
            cfg.projection_hidden, cfg.projection_dim, dtype, kernel_init
        )
        self.text_projector = Projector(
            cfg.projection_hidden, cfg.projection_dim, dtype, kernel_init
        )
        # Not clamped here (as HF); the losses and the segmentation clamp exp() at 100.
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(cfg.logit_scale_init), (), jnp.float32
        )

    def project_image(
        self,
        pooled: jnp.ndarray,
        *,
        train: bool = False,
        stats_from: jnp.ndarray | None = None,
        update_stats: bool = True,
    ) -> jnp.ndarray:
        """Pooled image vectors [B, width] -> L2-normalised float32 embeddings [B, D]."""
        return l2_normalize(
            self.image_projector(
                pooled, train=train, stats_from=stats_from, update_stats=update_stats
            )
        )

    def project_segments(
        self,
        segments: jnp.ndarray,
        *,
        train: bool = False,
        stats_from: jnp.ndarray | None = None,
        update_stats: bool = False,
    ) -> jnp.ndarray:
        """Segment tokens [B, G, width] -> L2-normalised float32 [B, G, D] via the image projector.

        In training, BatchNorm uses the statistics of `stats_from` (e.g. the branch's pooled
        vectors [B, width]; default the segments themselves) and by default leaves the running
        averages alone.
        """
        return l2_normalize(
            self.image_projector(
                segments, train=train, stats_from=stats_from, update_stats=update_stats
            )
        )

    def project_text(
        self, pooled: jnp.ndarray, *, train: bool = False, update_stats: bool = True
    ) -> jnp.ndarray:
        """Text features [B, text_width] -> L2-normalised float32 embeddings [B, D]."""
        return l2_normalize(self.text_projector(pooled, train=train, update_stats=update_stats))

    def encode_image(
        self, images: jnp.ndarray, *, train: bool = False, update_stats: bool = True
    ) -> dict:
        """images float[B, H, W, C] (normalised) -> dict(embedding [B, D], pooled [B, width],
        segments [B, G, width], soft_assignments, hard_assignments (tuples of [B, N_in, G_out]))."""
        out = self.vision(images, train=train)
        out["embedding"] = self.project_image(out["pooled"], train=train, update_stats=update_stats)
        return out

    def encode_text(
        self, tokens: jnp.ndarray, *, train: bool = False, update_stats: bool = True
    ) -> dict:
        """tokens int[B, L] -> dict(embedding [B, D] L2-normalised, pooled [B, text_width])."""
        pooled = self.text(tokens)
        return dict(
            embedding=self.project_text(pooled, train=train, update_stats=update_stats),
            pooled=pooled,
        )

    def __call__(self, images: jnp.ndarray, tokens: jnp.ndarray, *, train: bool = False) -> dict:
        """Both towers. logits_per_image [B_img, B_txt] = exp(logit_scale) I T^T, unclamped (as
        HF's GroupViTModel); plus image_embedding, text_embedding and encode_image's outputs."""
        out = self.encode_image(images, train=train)
        text = self.encode_text(tokens, train=train)
        out["image_embedding"] = out.pop("embedding")
        out["text_embedding"] = text["embedding"]
        out["logits_per_image"] = (
            jnp.exp(self.logit_scale) * out["image_embedding"] @ text["embedding"].T
        )
        return out


def init_variables(config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """Fresh variables {'params', 'batch_stats'} of GroupViT(config) (use under jax.eval_shape
    for their shapes only)."""
    images = jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    tokens = jnp.zeros((1, config.context_length), jnp.int32)
    return GroupViT(config).init({"params": rng}, images, tokens)
