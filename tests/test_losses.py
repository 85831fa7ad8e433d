"""Losses against float64 NumPy references, their gradients, jit and batch sharding."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mixreorg_jax import losses

INIT_LOG_SCALE = math.log(1 / 0.07)
CLAMPED_LOG_SCALE = math.log(300.0)  # exp() = 300 > 100: the clamp is active.

# Jitted once here: op-by-op dispatch of many small shapes is what would make this file slow.
# Eager execution is checked against these in test_jit_matches_eager.
contrastive_loss = jax.jit(losses.contrastive_loss)
multi_label_contrastive_loss = jax.jit(losses.multi_label_contrastive_loss)
mixed_segmentation_loss = jax.jit(
    losses.mixed_segmentation_loss, static_argnames=("group_size", "negatives")
)


# ---------------------------------------------------------------------------------------------
# Float64 references, written the plain way (explicit target matrices and loops).
# ---------------------------------------------------------------------------------------------
def np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_scale(log_scale):
    return min(math.exp(log_scale), 100.0)


def np_soft_cross_entropy(logits, targets):
    return (-targets * np_log_softmax(logits)).sum(axis=-1).mean()


def np_contrastive(image, text, log_scale):
    logits = np_scale(log_scale) * image @ text.T
    labels = np.eye(len(image))
    return 0.5 * (np_soft_cross_entropy(logits, labels) + np_soft_cross_entropy(logits.T, labels))


def np_multi_label(image, prompts, log_scale, prompt_ids=None):
    batch, num_prompts, dim = prompts.shape
    prompts = prompts.reshape(batch * num_prompts, dim)
    owner = np.repeat(np.arange(batch), num_prompts)  # image of each flattened prompt
    positive = np.zeros((batch, batch * num_prompts))  # [B images, B*P prompts]
    for i in range(batch):
        for j in range(batch * num_prompts):
            word = None if prompt_ids is None else prompt_ids.reshape(-1)[j]
            positive[i, j] = owner[j] == i or (
                word is not None and word >= 0 and word in prompt_ids[i]
            )
    image_targets = positive / positive.sum(1, keepdims=True)
    text_targets = positive.T / positive.T.sum(1, keepdims=True)
    # An image of segments [B, S, D] scores a prompt by its best segment.
    logits = np_scale(log_scale) * (
        image @ prompts.T if image.ndim == 2 else (image @ prompts.T).max(axis=1)
    )
    return 0.5 * (
        np_soft_cross_entropy(logits, image_targets) + np_soft_cross_entropy(logits.T, text_targets)
    )


def np_segment_retrieval(segments, prompts, log_scale, prompt_ids=None):
    batch, num_segments, _ = segments.shape
    nll = []
    for c in range(batch):
        for p in range(prompts.shape[1]):
            word = None if prompt_ids is None else prompt_ids[c, p]
            logits = np_scale(log_scale) * (segments @ prompts[c, p])  # [B images, S]
            targets = np.zeros_like(logits)
            for i in range(batch):
                if i == c or (word is not None and word >= 0 and word in prompt_ids[i]):
                    targets[i, logits[i].argmax()] = 1
            nll.append(
                np_soft_cross_entropy(logits.reshape(1, -1), targets.reshape(1, -1) / targets.sum())
            )
    return np.mean(nll)


def np_mixed_segmentation(assignment, segments, text, source, log_scale, group_size, negatives):
    num_mixed, num_patches, _ = assignment.shape
    nll = []
    for m in range(num_mixed):
        if negatives == "group":
            first = (m // group_size) * group_size
            captions = np.arange(first, first + group_size)
        else:
            captions = np.arange(len(text))
        logits = np_scale(log_scale) * assignment[m] @ (segments[m] @ text[captions].T)
        log_probs = np_log_softmax(logits)
        for n in range(num_patches):
            nll.append(-log_probs[n, list(captions).index(source[m, n])])
    return np.mean(nll)


# ---------------------------------------------------------------------------------------------
# Random inputs.
# ---------------------------------------------------------------------------------------------
def unit_vectors(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def mixing_sources(rng, batch, num_patches, group_size):
    """[B, N] sources as a mixing plan makes them: per group and patch, a permutation of members."""
    source = np.zeros((batch, num_patches), np.int32)
    for first in range(0, batch, group_size):
        for n in range(num_patches):
            source[first : first + group_size, n] = first + rng.permutation(group_size)
    return source


def mixseg_inputs(
    rng, batch, num_patches, num_segments, dim, group_size, hard=False, sharpness=2.0
):
    logits = rng.normal(size=(batch, num_patches, num_segments)) * sharpness
    if hard:
        assignment = np.eye(num_segments)[logits.argmax(-1)]
    else:
        assignment = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return (
        assignment,
        unit_vectors(rng, batch, num_segments, dim),
        unit_vectors(rng, batch, dim),
        mixing_sources(rng, batch, num_patches, group_size),
    )


def f32(*arrays):
    return [jnp.asarray(a, jnp.float32) for a in arrays]


# ---------------------------------------------------------------------------------------------
# Values.
# ---------------------------------------------------------------------------------------------
def test_logit_scale_clamps():
    np.testing.assert_allclose(losses.logit_scale(INIT_LOG_SCALE), 1 / 0.07, rtol=1e-6)
    assert losses.logit_scale(CLAMPED_LOG_SCALE) == 100.0
    assert losses.logit_scale(CLAMPED_LOG_SCALE, max_scale=50.0) == 50.0
    assert losses.logit_scale(jnp.asarray(0.0, jnp.bfloat16)).dtype == jnp.float32
    with pytest.raises(ValueError, match="scalar"):
        losses.logit_scale(jnp.zeros((1,)))


@pytest.mark.parametrize("batch,dim", [(1, 4), (5, 8), (16, 32)])
@pytest.mark.parametrize("log_scale", [0.3, INIT_LOG_SCALE, CLAMPED_LOG_SCALE])
def test_contrastive_matches_numpy(batch, dim, log_scale):
    rng = np.random.default_rng(batch * 100 + dim)
    image, text = unit_vectors(rng, batch, dim), unit_vectors(rng, batch, dim)
    got = contrastive_loss(*f32(image, text), log_scale)
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_contrastive(image, text, log_scale), rtol=1e-5, atol=1e-6)


def test_contrastive_is_not_symmetric_in_its_halves_by_accident():
    # Image->text and text->image differ once the similarity matrix is not symmetric; checks that
    # both directions are really in the loss (the reference averages the two).
    rng = np.random.default_rng(0)
    image, text = unit_vectors(rng, 6, 8), unit_vectors(rng, 6, 8)
    logits = np_scale(INIT_LOG_SCALE) * image @ text.T
    one_way = np_soft_cross_entropy(logits, np.eye(6))
    got = contrastive_loss(*f32(image, text), INIT_LOG_SCALE)
    assert abs(float(got) - one_way) > 1e-3


@pytest.mark.parametrize("batch,num_prompts,dim", [(1, 3, 4), (4, 3, 8), (6, 1, 8), (5, 2, 16)])
@pytest.mark.parametrize("log_scale", [INIT_LOG_SCALE, CLAMPED_LOG_SCALE])
def test_multi_label_matches_numpy(batch, num_prompts, dim, log_scale):
    rng = np.random.default_rng(batch * 1000 + num_prompts * 10 + dim)
    image, prompts = unit_vectors(rng, batch, dim), unit_vectors(rng, batch, num_prompts, dim)
    got = multi_label_contrastive_loss(*f32(image, prompts), log_scale)
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_multi_label(image, prompts, log_scale), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch,num_prompts,vocabulary", [(4, 3, 3), (6, 2, 4), (5, 3, 50)])
def test_multi_label_same_word_positives_match_numpy(batch, num_prompts, vocabulary):
    rng = np.random.default_rng(batch + vocabulary)
    image, prompts = unit_vectors(rng, batch, 8), unit_vectors(rng, batch, num_prompts, 8)
    # -1 (a caption used as a prompt) matches nothing, not even another -1.
    ids = rng.integers(-1, vocabulary, (batch, num_prompts)).astype(np.int32)
    got = multi_label_contrastive_loss(*f32(image, prompts), INIT_LOG_SCALE, ids)
    want = np_multi_label(image, prompts, INIT_LOG_SCALE, ids)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert abs(want - np_multi_label(image, prompts, INIT_LOG_SCALE)) > 1e-3 or vocabulary > 10
    # Ids that are all different (or all captions) give GroupViT's own-prompt targets.
    for unique in (
        np.arange(batch * num_prompts).reshape(batch, num_prompts),
        np.full((batch, num_prompts), -1),
    ):
        np.testing.assert_allclose(
            multi_label_contrastive_loss(
                *f32(image, prompts), INIT_LOG_SCALE, unique.astype(np.int32)
            ),
            multi_label_contrastive_loss(*f32(image, prompts), INIT_LOG_SCALE),
            rtol=1e-6,
        )


@pytest.mark.parametrize("batch,num_segments,num_prompts", [(4, 3, 2), (5, 8, 3), (3, 1, 2)])
def test_multi_label_on_segments_matches_numpy(batch, num_segments, num_prompts):
    rng = np.random.default_rng(batch * num_segments)
    segments = unit_vectors(rng, batch, num_segments, 8)
    prompts = unit_vectors(rng, batch, num_prompts, 8)
    ids = rng.integers(-1, 4, (batch, num_prompts)).astype(np.int32)
    for prompt_ids in (None, ids):
        got = multi_label_contrastive_loss(*f32(segments, prompts), INIT_LOG_SCALE, prompt_ids)
        np.testing.assert_allclose(
            got, np_multi_label(segments, prompts, INIT_LOG_SCALE, prompt_ids), rtol=1e-5, atol=1e-6
        )
    # One segment is the image embedding itself.
    np.testing.assert_allclose(
        multi_label_contrastive_loss(*f32(segments[:, :1], prompts), INIT_LOG_SCALE),
        multi_label_contrastive_loss(*f32(segments[:, 0], prompts), INIT_LOG_SCALE),
        rtol=1e-6,
    )


def test_multi_label_on_segments_rewards_one_segment_per_prompt():
    """Segments that each match one of the image's words beat segments that all sit at their mean,
    which is what the pooled loss cannot tell apart."""
    prompts = np.eye(8).reshape(4, 2, 8)  # Orthogonal words; image i shows words 2i and 2i + 1.
    mean = prompts.sum(1, keepdims=True) / math.sqrt(2)
    loss = lambda segments: float(
        multi_label_contrastive_loss(*f32(segments, prompts), math.log(3.0))
    )
    assert loss(prompts) < loss(np.repeat(mean, 2, axis=1)) - 0.1
    np.testing.assert_allclose(
        loss(np.repeat(mean, 2, axis=1)),
        multi_label_contrastive_loss(*f32(mean[:, 0], prompts), math.log(3.0)),
        rtol=1e-6,
    )


@pytest.mark.parametrize("batch,num_segments,num_prompts", [(4, 3, 2), (5, 8, 3), (3, 1, 2)])
def test_segment_retrieval_matches_numpy(batch, num_segments, num_prompts):
    rng = np.random.default_rng(batch + num_segments)
    segments = unit_vectors(rng, batch, num_segments, 8)
    prompts = unit_vectors(rng, batch, num_prompts, 8)
    ids = rng.integers(-1, 4, (batch, num_prompts)).astype(np.int32)
    for prompt_ids in (None, ids):
        got = jax.jit(losses.segment_retrieval_loss)(
            *f32(segments, prompts), INIT_LOG_SCALE, prompt_ids
        )
        want = np_segment_retrieval(segments, prompts, INIT_LOG_SCALE, prompt_ids)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_segment_retrieval_pushes_down_the_other_segments_of_a_positive_image():
    """A prompt's best segment in its own image is pulled up and that image's other segments are
    pushed down: gradient descent lowers their similarity."""
    prompts = np.eye(4)[:, None]  # [4 images, 1 prompt, D]
    segments = np.stack(
        [
            np.stack([0.8 * w + 0.6 * np.roll(w, 1), 0.6 * w + 0.8 * np.roll(w, 1)])
            for w in np.eye(4)
        ]
    )  # both segments of image i match word i, one better
    grad = jax.grad(losses.segment_retrieval_loss)(*f32(segments, prompts), 0.0)
    step = np.asarray(grad)[np.arange(4), :, np.arange(4)]  # d loss / d (word i's coordinate)
    assert np.all(step[:, 0] < 0) and np.all(step[:, 1] > 0)


def test_multi_label_with_one_prompt_is_the_contrastive_loss():
    rng = np.random.default_rng(1)
    image, text = unit_vectors(rng, 7, 8), unit_vectors(rng, 7, 8)
    np.testing.assert_allclose(
        multi_label_contrastive_loss(*f32(image, text[:, None]), INIT_LOG_SCALE),
        contrastive_loss(*f32(image, text), INIT_LOG_SCALE),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "batch,num_patches,num_segments,dim,group_size",
    [(2, 5, 3, 4, 2), (8, 4, 3, 8, 4), (4, 9, 8, 16, 4), (3, 4, 2, 4, 1)],
)
@pytest.mark.parametrize("negatives", ["group", "batch"])
@pytest.mark.parametrize("log_scale,hard", [(INIT_LOG_SCALE, False), (CLAMPED_LOG_SCALE, True)])
def test_mixed_segmentation_matches_numpy(
    batch, num_patches, num_segments, dim, group_size, negatives, log_scale, hard
):
    rng = np.random.default_rng(batch * 100 + num_patches * 10 + group_size)
    inputs = mixseg_inputs(rng, batch, num_patches, num_segments, dim, group_size, hard=hard)
    assignment, segments, text, source = inputs
    got = mixed_segmentation_loss(
        *f32(assignment, segments, text),
        jnp.asarray(source),
        log_scale,
        group_size=group_size,
        negatives=negatives,
    )
    assert got.shape == () and got.dtype == jnp.float32
    want = np_mixed_segmentation(*inputs, log_scale, group_size, negatives)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_are_computed_in_float32():
    rng = np.random.default_rng(2)
    image, text = unit_vectors(rng, 8, 16), unit_vectors(rng, 8, 16)
    prompts = unit_vectors(rng, 8, 3, 16)
    assignment, segments, _, source = mixseg_inputs(rng, 8, 6, 4, 16, 2)
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    rounded = lambda x: np.asarray(bf16(x), np.float64)  # what the loss actually sees
    log_scale = bf16(INIT_LOG_SCALE)
    np_log_scale = float(rounded(INIT_LOG_SCALE))

    got = contrastive_loss(bf16(image), bf16(text), log_scale)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(
        got, np_contrastive(rounded(image), rounded(text), np_log_scale), rtol=1e-5
    )
    got = multi_label_contrastive_loss(bf16(image), bf16(prompts), log_scale)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(
        got, np_multi_label(rounded(image), rounded(prompts), np_log_scale), rtol=1e-5
    )
    got = mixed_segmentation_loss(
        bf16(assignment), bf16(segments), bf16(text), source, log_scale, group_size=2
    )
    assert got.dtype == jnp.float32
    want = np_mixed_segmentation(
        rounded(assignment), rounded(segments), rounded(text), source, np_log_scale, 2, "group"
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("group_size", [2, 4])
@pytest.mark.parametrize("negatives", ["group", "batch"])
def test_mixed_segmentation_perfect_is_low_and_random_is_chance(group_size, negatives):
    batch, num_patches, num_segments, dim = 8, 64, 8, 1024
    rng = np.random.default_rng(group_size)
    source = mixing_sources(rng, batch, num_patches, group_size)
    # Perfect: orthonormal captions, segment k of a mixed image is the k-th caption of its group,
    # and every patch is assigned to the segment of its source caption.
    text = np.eye(dim)[:batch]
    group_start = (np.arange(batch) // group_size * group_size)[:, None]
    segments = np.zeros((batch, num_segments, dim))
    segments[:, :group_size] = text[group_start + np.arange(group_size)]
    assignment = np.eye(num_segments)[source - group_start]
    perfect = mixed_segmentation_loss(
        *f32(assignment, segments, text),
        source,
        CLAMPED_LOG_SCALE,
        group_size=group_size,
        negatives=negatives,
    )
    assert float(perfect) < 1e-6

    # Random embeddings in a wide space and a random soft assignment at the initial scale: logits
    # all near 0, so the loss sits at chance, log K (or log B when the whole batch is the negatives).
    assignment, segments, text, source = mixseg_inputs(
        rng, batch, num_patches, num_segments, dim, group_size, sharpness=0.5
    )
    chance = math.log(group_size if negatives == "group" else batch)
    random = mixed_segmentation_loss(
        *f32(assignment, segments, text),
        source,
        INIT_LOG_SCALE,
        group_size=group_size,
        negatives=negatives,
    )
    assert abs(float(random) - chance) < 0.1 * chance


def test_mixed_segmentation_wrong_source_gives_nan():
    rng = np.random.default_rng(3)
    assignment, segments, text, source = mixseg_inputs(rng, 4, 5, 3, 8, 2)
    assignment, segments, text = f32(assignment, segments, text)
    other_group = source.copy()
    other_group[0, 0] = 3  # image 0 is in group {0, 1}
    assert np.isnan(
        mixed_segmentation_loss(
            assignment, segments, text, other_group, INIT_LOG_SCALE, group_size=2
        )
    )
    # Under "batch" the same label is a legitimate caption of the batch...
    assert np.isfinite(
        mixed_segmentation_loss(
            assignment, segments, text, other_group, INIT_LOG_SCALE, group_size=2, negatives="batch"
        )
    )
    # ...but not one past the batch, nor a negative one.
    for bad in (4, -1):
        out_of_batch = source.copy()
        out_of_batch[2, 1] = bad
        assert np.isnan(
            mixed_segmentation_loss(
                assignment,
                segments,
                text,
                out_of_batch,
                INIT_LOG_SCALE,
                group_size=2,
                negatives="batch",
            )
        )


# ---------------------------------------------------------------------------------------------
# Gradients.
# ---------------------------------------------------------------------------------------------
def assert_reached(grad, name):
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad)), name
    assert np.all(grad != 0), f"{name}: {np.sum(grad == 0)} entries get no gradient"


@pytest.mark.parametrize("loss_name", ["contrastive", "multi_label"])
def test_image_text_gradients_reach_every_input(loss_name):
    rng = np.random.default_rng(4)
    image = unit_vectors(rng, 6, 8)
    if loss_name == "contrastive":
        loss_fn, text = contrastive_loss, unit_vectors(rng, 6, 8)
    else:
        loss_fn, text = multi_label_contrastive_loss, unit_vectors(rng, 6, 3, 8)
    grad_fn = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2)))
    grads = grad_fn(*f32(image, text), jnp.float32(INIT_LOG_SCALE))
    for grad, name in zip(grads, ["image_emb", "text_emb", "log_scale"]):
        assert_reached(grad, name)
    *embedding_grads, clamped = grad_fn(*f32(image, text), jnp.float32(CLAMPED_LOG_SCALE))
    assert clamped == 0.0
    for grad, name in zip(embedding_grads, ["image_emb", "text_emb"]):
        assert_reached(grad, f"{name} (clamped scale)")


@pytest.mark.parametrize("negatives", ["group", "batch"])
def test_mixed_segmentation_gradients(negatives):
    rng = np.random.default_rng(5)
    batch, num_patches, num_segments = 4, 5, 6
    assignment, segments, text, source = mixseg_inputs(
        rng, batch, num_patches, num_segments, 8, 2, hard=True
    )
    loss_fn = functools.partial(mixed_segmentation_loss, group_size=2, negatives=negatives)
    args = f32(assignment, segments, text)
    grad_fn = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2, 4)))
    grads = grad_fn(*args, source, jnp.float32(INIT_LOG_SCALE))
    grad_assignment, grad_segments, grad_text, grad_log_scale = grads
    # Every assignment entry, assigned or not, gets a gradient: that is what straight-through needs.
    assert_reached(grad_assignment, "assignment")
    assert_reached(grad_text, "text_emb")
    assert_reached(grad_log_scale, "log_scale")
    # A segment no patch is (hard-)assigned to plays no part in the loss.
    used = assignment.sum(axis=1) > 0  # [M, G]
    assert (~used).any() and used.any()
    assert_reached(np.asarray(grad_segments)[used], "used segments")
    assert np.all(np.asarray(grad_segments)[~used] == 0)
    assert grad_fn(*args, source, jnp.float32(CLAMPED_LOG_SCALE))[3] == 0.0


@pytest.mark.parametrize("group_size", [2, 4])
def test_mixed_segmentation_captions_only_interact_within_their_group(group_size):
    # Every caption is reached by the loss of its own group, so the per-group claim is about mixed
    # second derivatives: d2L / d caption_c d (segment or assignment of mixed image m) is zero
    # unless c is in m's group ("group" negatives), and non-zero for every pair with "batch".
    rng = np.random.default_rng(6)
    batch = 8
    assignment, segments, text, source = mixseg_inputs(rng, batch, 3, 3, 4, group_size)
    args = f32(assignment, segments, text)
    same_group = (np.arange(batch)[:, None] // group_size) == (np.arange(batch)[None] // group_size)
    for negatives, expect_nonzero in [("group", same_group), ("batch", np.ones_like(same_group))]:
        loss_fn = functools.partial(
            mixed_segmentation_loss,
            source=source,
            log_scale=INIT_LOG_SCALE,
            group_size=group_size,
            negatives=negatives,
        )
        # [B, D, M, ...] for the assignment and the segment embeddings.
        cross_derivatives = jax.jit(jax.jacfwd(jax.grad(loss_fn, argnums=2), argnums=(0, 1)))(*args)
        for cross, name in zip(cross_derivatives, ["assignment", "segment_emb"]):
            block = np.abs(np.asarray(cross)).sum(axis=(1, 3, 4))  # [captions B, mixed images M]
            assert np.all(block[~expect_nonzero] == 0), (negatives, name)
            assert np.all(block[expect_nonzero] > 0), (negatives, name)


# ---------------------------------------------------------------------------------------------
# jit and batch sharding.
# ---------------------------------------------------------------------------------------------
def loss_inputs(rng, batch):
    """Random inputs of batch size `batch` for every loss; the sources suit groups of 2 and 4."""
    assignment, segments, text, source = mixseg_inputs(rng, batch, 6, 4, 16, group_size=4)
    return {
        "image": f32(unit_vectors(rng, batch, 16))[0],
        "text": f32(text)[0],
        "prompts": f32(unit_vectors(rng, batch, 3, 16))[0],
        "assignment": f32(assignment)[0],
        "segments": f32(segments)[0],
        "source": jnp.asarray(source),
        "source_k2": jnp.asarray(mixing_sources(rng, batch, 6, 2)),
        "log_scale": jnp.float32(INIT_LOG_SCALE),
        "clamped_log_scale": jnp.float32(CLAMPED_LOG_SCALE),
    }


ALL_MIXSEG_MODES = ((2, "group"), (2, "batch"), (4, "group"), (4, "batch"))


def every_loss(x, mixseg_modes=ALL_MIXSEG_MODES):
    """{name: [] loss}: each loss (and mixed-segmentation mode) once, so one jit compiles them all."""
    out = {
        "contrastive": losses.contrastive_loss(x["image"], x["text"], x["log_scale"]),
        "contrastive_clamped": losses.contrastive_loss(
            x["image"], x["text"], x["clamped_log_scale"]
        ),
        "multi_label": losses.multi_label_contrastive_loss(
            x["image"], x["prompts"], x["log_scale"]
        ),
    }
    for group_size, negatives in mixseg_modes:
        source = x["source_k2"] if group_size == 2 else x["source"]
        out[f"mixseg_{negatives}_k{group_size}"] = losses.mixed_segmentation_loss(
            x["assignment"],
            x["segments"],
            x["text"],
            source,
            x["log_scale"],
            group_size=group_size,
            negatives=negatives,
        )
    return out


def assert_same_losses(got, want, tol):
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol, err_msg=name)


def test_jit_matches_eager():
    # Eager runs op by op (slow to start), so only one mode per group size here.
    inputs = loss_inputs(np.random.default_rng(7), 8)
    loss_fn = functools.partial(every_loss, mixseg_modes=((2, "group"), (4, "batch")))
    assert_same_losses(jax.jit(loss_fn)(inputs), loss_fn(inputs), tol=1e-6)


def test_batch_sharded_matches_unsharded():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch_sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    inputs = loss_inputs(np.random.default_rng(8), 16)
    sharded = {
        name: jax.device_put(a, batch_sharded if a.ndim else replicated)
        for name, a in inputs.items()
    }
    for name, a in sharded.items():
        assert len(a.sharding.device_set) == 8, name
        if a.ndim:  # really split over the batch: 2 of the 16 examples on each device
            assert a.addressable_shards[0].data.shape[0] == 2, name
    jitted = jax.jit(every_loss)
    assert_same_losses(jitted(sharded), jitted(inputs), tol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bookkeeping and errors.
# ---------------------------------------------------------------------------------------------
def test_total_loss_bookkeeping():
    terms = {
        "contrastive": jnp.float32(2.0),
        "multi_label": jnp.float32(3.0),
        "mixseg": jnp.float32(0.5),
        "restore": jnp.float32(np.nan),
    }
    weights = {"contrastive": 1.0, "multi_label": 0.5, "mixseg": 2.0, "restore": 0.0}
    total, metrics = losses.total_loss(terms, weights)
    assert float(total) == 2.0 + 1.5 + 1.0  # the zero-weight NaN term stays out of the sum
    assert set(metrics) == set(terms) | {"total"}
    for name, value in terms.items():
        np.testing.assert_array_equal(metrics[name], value)  # unweighted, even at weight 0
    assert metrics["total"] == total
    # Gradients of the total follow the weights, and a zero weight gives exactly zero.
    grads = jax.grad(lambda t: losses.total_loss(t, weights)[0])(terms)
    assert {k: float(v) for k, v in grads.items()} == weights
    total, _ = jax.jit(lambda t: losses.total_loss(t, weights))(terms)
    assert float(total) == 4.5


def test_total_loss_errors():
    terms = {"contrastive": jnp.float32(1.0), "mixseg": jnp.float32(1.0)}
    with pytest.raises(ValueError, match="without a weight: \\['mixseg'\\]"):
        losses.total_loss(terms, {"contrastive": 1.0})
    with pytest.raises(ValueError, match="not computed: \\['restore'\\]"):
        losses.total_loss(terms, {"contrastive": 1.0, "mixseg": 1.0, "restore": 1.0})
    with pytest.raises(ValueError, match="reserved"):
        losses.total_loss({"total": jnp.float32(1.0)}, {"total": 1.0})
    with pytest.raises(ValueError, match="'mixseg' must be a scalar"):
        losses.total_loss({"mixseg": jnp.ones(3)}, {"mixseg": 1.0})


def test_image_text_shape_errors():
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        losses.contrastive_loss(jnp.zeros((4, 8)), jnp.zeros((5, 8)), 0.0)
    with pytest.raises(ValueError, match=r"\[B, P, D\]"):
        losses.multi_label_contrastive_loss(jnp.zeros((4, 8)), jnp.zeros((4, 8)), 0.0)
    with pytest.raises(ValueError, match=r"\[B, P, D\]"):
        losses.multi_label_contrastive_loss(jnp.zeros((4, 8)), jnp.zeros((3, 2, 8)), 0.0)


def test_mixed_segmentation_errors():
    rng = np.random.default_rng(9)
    assignment, segments, text, source = mixseg_inputs(rng, 4, 5, 3, 8, 2)
    assignment, segments, text = f32(assignment, segments, text)
    call = functools.partial(losses.mixed_segmentation_loss, log_scale=0.0)
    with pytest.raises(ValueError, match="'group' or 'batch'"):
        call(assignment, segments, text, source, group_size=2, negatives="local")
    with pytest.raises(ValueError, match="M == B"):
        call(assignment[:2], segments[:2], text, source[:2], group_size=2)
    with pytest.raises(ValueError, match="dividing the batch size 4"):
        call(assignment, segments, text, source, group_size=3)
    with pytest.raises(ValueError, match="dividing"):
        call(assignment, segments, text, source, group_size=0)
    with pytest.raises(ValueError, match="integer"):
        call(assignment, segments, text, source.astype(np.float32), group_size=2)
    with pytest.raises(ValueError, match="disagree"):
        call(assignment, segments[:, :2], text, source, group_size=2)
    with pytest.raises(ValueError, match="disagree"):
        call(assignment, segments, text[:, :4], source, group_size=2)
    with pytest.raises(ValueError, match="disagree"):
        call(assignment, segments, text, source[:, :4], group_size=2)
    with pytest.raises(ValueError, match=r"assignment \[M, N, G\]"):
        call(assignment[0], segments, text, source, group_size=2)


def test_group_balance_matches_numpy_and_its_extremes():
    rng = np.random.default_rng(0)
    stages = [jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 10, g)) * 2), axis=-1) for g in (4, 2)]
    expected = []
    for a in stages:
        a = np.asarray(a, np.float64)
        usage = a.mean(axis=1)
        kl = np.sum(usage * np.log(usage), axis=1) + np.log(usage.shape[1])
        entropy = -np.sum(a * np.log(a), axis=2).mean(axis=1)
        expected.append(np.mean(kl + entropy))
    np.testing.assert_allclose(losses.group_balance_loss(stages), np.mean(expected), rtol=1e-5)
    flat = jnp.full((2, 6, 4), 0.25)
    collapsed = jax.nn.one_hot(jnp.zeros((2, 6), jnp.int32), 4)
    np.testing.assert_allclose(losses.group_balance_loss([flat]), math.log(4), rtol=1e-5)
    np.testing.assert_allclose(losses.group_balance_loss([collapsed]), math.log(4), rtol=1e-5)
    # Each token certain of its group and the groups used equally: zero.
    spread = jax.nn.one_hot(jnp.tile(jnp.arange(4), (2, 2)), 4)  # [2, 8, 4]
    np.testing.assert_allclose(losses.group_balance_loss([spread]), 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        losses.group_balance_loss([])
