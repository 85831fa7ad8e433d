"""Training losses of GroupViT and MixReorg as pure jnp functions (docs/method.md §1 and §4).

All losses are written over the arrays they are given: inside `jit` with batch-sharded global
arrays they are the global-batch losses GroupViT gets from its all-gathers, with nothing written
per device. Every loss computes in float32 whatever the input dtype, and its matmuls run at
HIGHEST precision: the logits are cosines times a scale of up to 100, and the TF32/bf16 passes
that accelerators use for float32 matmuls by default (~1e-3 relative error) would move them by
about 0.1. These matmuls are tiny next to the model's, so the precision costs nothing noticeable.

Embeddings passed in are expected to be L2-normalised already (the projectors do it); the losses
do not normalise them again.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def logit_scale(log_scale, max_scale=100.0):
    """exp(log_scale) clamped at `max_scale`, in float32.

    Args:
      log_scale: [] learned log of the logit scale (init log(1/0.07)).
      max_scale: upper clamp; above it the log-scale gets zero gradient, as in GroupViT.

    Returns:
      [] float32 scale.
    """
    if jnp.ndim(log_scale) != 0:
        raise ValueError(f"log_scale must be a scalar (0-D), got shape {jnp.shape(log_scale)}.")
    return jnp.minimum(jnp.exp(jnp.asarray(log_scale, jnp.float32)), max_scale)


def contrastive_loss(image_emb, text_emb, log_scale):
    """Symmetric image-text InfoNCE over the whole batch.

    Image i and caption i are the positive pair; every other caption (image) of the batch is a
    negative. loss = 0.5 * (CE(image -> text) + CE(text -> image)), each averaged over the batch.

    Args:
      image_emb: [B, D] L2-normalised image embeddings.
      text_emb: [B, D] L2-normalised caption embeddings.
      log_scale: [] learned log logit scale (clamped at 100 via `logit_scale`).

    Returns:
      [] float32 loss.
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            "contrastive_loss wants image_emb and text_emb of equal shape [B, D], got "
            f"{image_emb.shape} and {text_emb.shape}."
        )
    image_emb = image_emb.astype(jnp.float32)
    text_emb = text_emb.astype(jnp.float32)
    # [B images, B captions]
    logits = jnp.einsum("id,td->it", image_emb, text_emb, precision=_HIGHEST)
    logits = logits * logit_scale(log_scale)
    # The positives sit on the diagonal: rows are image -> text, columns text -> image.
    image_to_text = jnp.diagonal(jax.nn.log_softmax(logits, axis=1))
    text_to_image = jnp.diagonal(jax.nn.log_softmax(logits, axis=0))
    return -0.5 * (image_to_text.mean() + text_to_image.mean())


def _positives(batch, num_prompts, prompt_ids=None):
    """bool[B images, B captions, P prompts]: image i's own prompts and, with `prompt_ids`, every
    prompt whose word id is one of image i's own prompts' (non-negative) ids."""
    positive = jnp.broadcast_to(jnp.eye(batch, dtype=bool)[:, :, None], (batch, batch, num_prompts))
    if prompt_ids is not None:
        own_ids = prompt_ids[:, None, None, :]  # [B images, 1, 1, P own]
        same_word = (prompt_ids[None, :, :, None] == own_ids) & (own_ids >= 0)
        positive = positive | same_word.any(axis=-1)
    return positive


def multi_label_contrastive_loss(image_emb, prompt_emb, log_scale, prompt_ids=None):
    """GroupViT's multi-label contrastive loss with soft targets over the whole batch.

    Every image is scored against all B*P prompts and every prompt against all B images.
    Image side: soft cross-entropy whose target spreads 1 evenly over the image's positives.
    Text side: soft cross-entropy over the B images whose target spreads 1 evenly over the
    prompt's positives. loss = 0.5 * (image side averaged over the B images + text side averaged
    over the B*P prompts).

    Positives: without `prompt_ids`, an image's own P prompts (GroupViT). With them (ours), also
    every prompt in the batch whose word is one of the image's own prompts' words: with a small
    vocabulary the same word recurs across the batch (the synthetic world's 8 class nouns, ~16
    times each in a batch of 64), and GroupViT's targets would push apart the embeddings of one
    word in different templates. This is UniCL's label-aware target (Yang et al. 2022).

    Without `prompt_ids` this is the normalisation of NVlabs/GroupViT's
    `MultiLabelContrastive.multi_label_loss` (timm `SoftTargetCrossEntropy`: sum over classes of
    -target * log_softmax, mean over rows). Two subtleties of that code worth knowing: (1) its
    text-side target is 1 / (number of image vectors per image) = 1, i.e. the transposed
    image-side label matrix re-normalised per row, not the transposed 1/P entries (which would
    scale the text side by 1/P); (2) the text side's negatives are the other B - 1 images only,
    never the other prompts.

    Segments (ours): with image_emb [B, S, D], an image's S segment embeddings, an image-prompt
    score is its best-matching segment's (multiple-instance learning, like FILIP's token-wise
    maximum similarity, Yao et al. 2021, with segments for tokens): a prompt is found in an image
    when one of its segments matches it, which is what zero-shot segmentation asks of the
    segments, where the pooled embedding only constrains their mean.

    Args:
      image_emb: [B, D] L2-normalised image embeddings, or [B, S, D] segment embeddings.
      prompt_emb: [B, P, D] L2-normalised embeddings of each image's P prompts.
      log_scale: [] the multi-label loss's own learned log logit scale (clamped at 100).
      prompt_ids: optional int[B, P], the word in each prompt (`data.prompts.word_id`); a negative
        id (a prompt that is the caption itself) matches no other prompt.

    Returns:
      [] float32 loss.
    """
    if (
        image_emb.ndim not in (2, 3)
        or prompt_emb.ndim != 3
        or prompt_emb.shape[0] != image_emb.shape[0]
        or prompt_emb.shape[2] != image_emb.shape[-1]
    ):
        raise ValueError(
            "multi_label_contrastive_loss wants image_emb [B, D] or [B, S, D] and "
            f"prompt_emb [B, P, D], got {image_emb.shape} and {prompt_emb.shape}."
        )
    if prompt_ids is not None and prompt_ids.shape != prompt_emb.shape[:2]:
        raise ValueError(
            f"prompt_ids must be [B, P] = {prompt_emb.shape[:2]}, got {prompt_ids.shape}."
        )
    image_emb = image_emb.astype(jnp.float32)
    prompt_emb = prompt_emb.astype(jnp.float32)
    batch, num_prompts, _ = prompt_emb.shape
    # [B images, B captions, P prompts]
    if image_emb.ndim == 2:
        logits = jnp.einsum("id,cpd->icp", image_emb, prompt_emb, precision=_HIGHEST)
    else:
        logits = jnp.einsum("isd,cpd->iscp", image_emb, prompt_emb, precision=_HIGHEST).max(1)
    logits = logits * logit_scale(log_scale)

    positive = _positives(batch, num_prompts, prompt_ids).astype(jnp.float32)

    # Image side: a softmax over all B*P prompts.
    image_log_probs = jax.nn.log_softmax(logits.reshape(batch, batch * num_prompts), axis=1)
    image_targets = positive.reshape(batch, -1)
    image_side = -(image_targets * image_log_probs).sum(1) / image_targets.sum(1)
    # Text side: each prompt's softmax over the B images.
    text_log_probs = jax.nn.log_softmax(logits, axis=0)
    text_side = -(positive * text_log_probs).sum(0) / positive.sum(0)
    return 0.5 * (image_side.mean() + text_side.mean())


def segment_retrieval_loss(segment_emb, prompt_emb, log_scale, prompt_ids=None):
    """Each prompt retrieves its images' best-matching segments among all segments (ours).

    Prompt (c, p) is scored against all B*S segments of the batch; the target spreads 1 evenly
    over the best-matching segment of each of its positive images (as in
    `multi_label_contrastive_loss`: the prompt's own image and, with `prompt_ids`, every image
    showing its word). Every other segment is a negative: the rest of a positive image's segments
    (its background and other objects) as well as all segments of the other images, so a prompt
    should match one segment per image it names and nothing else, which is what the zero-shot
    evaluation's background threshold asks of the segments' similarities. The best segment is
    chosen without gradient, as in multiple-instance learning.

    Args:
      segment_emb: [B, S, D] L2-normalised segment embeddings.
      prompt_emb: [B, P, D] L2-normalised embeddings of each image's P prompts.
      log_scale: [] learned log logit scale (clamped at 100).
      prompt_ids: optional int[B, P] word ids, as in `multi_label_contrastive_loss`.

    Returns:
      [] float32 cross-entropy averaged over the B*P prompts.
    """
    if (
        segment_emb.ndim != 3
        or prompt_emb.ndim != 3
        or prompt_emb.shape[0] != segment_emb.shape[0]
        or prompt_emb.shape[2] != segment_emb.shape[2]
    ):
        raise ValueError(
            "segment_retrieval_loss wants segment_emb [B, S, D] and prompt_emb [B, P, D], got "
            f"{segment_emb.shape} and {prompt_emb.shape}."
        )
    batch, num_segments, _ = segment_emb.shape
    num_prompts = prompt_emb.shape[1]
    # [B captions, P prompts, B images, S segments]
    sims = jnp.einsum(
        "cpd,isd->cpis",
        prompt_emb.astype(jnp.float32),
        segment_emb.astype(jnp.float32),
        precision=_HIGHEST,
    )
    best = jax.nn.one_hot(jnp.argmax(jax.lax.stop_gradient(sims), axis=-1), num_segments)
    positive = jnp.moveaxis(_positives(batch, num_prompts, prompt_ids), 0, -1)  # [B, P, B images]
    targets = (best * positive[..., None]).reshape(batch, num_prompts, -1)
    log_probs = jax.nn.log_softmax((sims * logit_scale(log_scale)).reshape(targets.shape), axis=-1)
    return (-(targets * log_probs).sum(-1) / targets.sum(-1)).mean()


def mixed_segmentation_loss(
    assignment, segment_emb, text_emb, source, log_scale, *, group_size, negatives="group"
):
    """MixReorg's patch -> caption loss on the mixed images (docs/method.md §4, L_mixseg).

    For mixed image m the patch -> caption logits are A[m] @ (S[m] @ T^T) * scale, and each patch
    is classified against the caption its token came from. Images are mixed in consecutive groups
    of K = `group_size` (group of m is m // K), and mixed image m is in image slot m (M == B).

    negatives="group": T = the K captions of m's group, (m//K)*K .. (m//K)*K + K-1, and the class of
      a patch is source - (m//K)*K.
    negatives="batch": T = all B captions given, the class is `source` itself. Called on global
      arrays inside jit these are the captions of the global batch.

    A source label outside the chosen caption set (e.g. from another group with "group") cannot be
    caught under jit; it turns the loss into NaN so the trainer's NaN check stops the run instead
    of training on a wrong target.

    Args:
      assignment: [M, N, G] patch -> final-segment assignment of each mixed image; rows sum to 1
        (hard straight-through one-hot in training, so gradients reach the assignment logits).
      segment_emb: [M, G, D] L2-normalised projected segment embeddings of each mixed image.
      text_emb: [B, D] L2-normalised caption embeddings, B == M.
      source: [M, N] int, batch index of the caption each patch of each mixed image came from.
      log_scale: [] learned log logit scale (the image-text one, clamped at 100).
      group_size: K, images per mixing group; must divide B.
      negatives: "group" or "batch", see above.

    Returns:
      [] float32 cross-entropy averaged over all M * N patches.
    """
    if negatives not in ("group", "batch"):
        raise ValueError(f"negatives must be 'group' or 'batch', got {negatives!r}.")
    if assignment.ndim != 3 or segment_emb.ndim != 3 or text_emb.ndim != 2 or source.ndim != 2:
        raise ValueError(
            "mixed_segmentation_loss wants assignment [M, N, G], segment_emb "
            f"[M, G, D], text_emb [B, D], source [M, N]; got {assignment.shape}, "
            f"{segment_emb.shape}, {text_emb.shape}, {source.shape}."
        )
    num_mixed, num_patches, num_segments = assignment.shape
    batch, dim = text_emb.shape
    if segment_emb.shape != (num_mixed, num_segments, dim) or source.shape != (
        num_mixed,
        num_patches,
    ):
        raise ValueError(
            "mixed_segmentation_loss shapes disagree: assignment [M, N, G] = "
            f"{assignment.shape}, segment_emb [M, G, D] = {segment_emb.shape}, "
            f"text_emb [B, D] = {text_emb.shape}, source [M, N] = {source.shape}."
        )
    if num_mixed != batch:
        raise ValueError(
            f"One mixed image per image slot is expected (M == B), got M={num_mixed} "
            f"mixed images for B={batch} captions."
        )
    if not jnp.issubdtype(source.dtype, jnp.integer):
        raise ValueError(f"source must hold integer caption indices, got dtype {source.dtype}.")
    if not isinstance(group_size, int) or group_size < 1 or batch % group_size:
        raise ValueError(
            f"group_size must be a positive int dividing the batch size {batch}, "
            f"got {group_size!r}."
        )

    assignment = assignment.astype(jnp.float32)
    segment_emb = segment_emb.astype(jnp.float32)
    text_emb = text_emb.astype(jnp.float32)
    if negatives == "group":
        num_groups = batch // group_size
        # Grouped views instead of gathering each image's K captions: [groups, K members, ...].
        segment_caption = jnp.einsum(
            "hjgd,hkd->hjgk",
            segment_emb.reshape(num_groups, group_size, num_segments, dim),
            text_emb.reshape(num_groups, group_size, dim),
            precision=_HIGHEST,
        )
        segment_caption = segment_caption.reshape(num_mixed, num_segments, group_size)
        group_start = (jnp.arange(num_mixed) // group_size) * group_size
        target = source - group_start[:, None]
    else:
        segment_caption = jnp.einsum("mgd,bd->mgb", segment_emb, text_emb, precision=_HIGHEST)
        target = source
    # [M, N, C] with C = K or B captions.
    logits = jnp.einsum("mng,mgc->mnc", assignment, segment_caption, precision=_HIGHEST)
    log_probs = jax.nn.log_softmax(logits * logit_scale(log_scale), axis=-1)
    num_classes = log_probs.shape[-1]
    in_range = (target >= 0) & (target < num_classes)
    target_log_prob = jnp.take_along_axis(
        log_probs, jnp.clip(target, 0, num_classes - 1)[..., None], axis=-1
    )[..., 0]
    return jnp.where(in_range, -target_log_prob, jnp.nan).mean()


def group_balance_loss(soft_assignments):
    """log G minus the mutual information between tokens and groups (ours; against collapse).

    Trained from scratch at small scale, the assignment logits stay flat: every token's softmax
    over groups is near uniform, the gumbel noise decides the training-time hard assignment, and
    at evaluation the argmax puts almost every token into one or two groups. For each grouping
    stage and image, with A[n] the token's soft assignment and u = mean_n A[n] the image's group
    usage, the loss is KL(u || uniform) + mean_n H(A[n]) = log G - I(token; group): zero when every
    token picks one group with certainty and the groups are used equally, log G both for flat
    assignments and for everything in one group. Averaged over images, then over stages.

    Args:
      soft_assignments: a sequence of [B, N, G] token -> group softmaxes (rows sum to 1), one per
        grouping stage (G may differ between stages).

    Returns:
      [] float32 loss.
    """
    if not soft_assignments:
        raise ValueError("group_balance_loss needs at least one grouping stage's assignments.")
    xlogx = lambda p: p * jnp.log(jnp.maximum(p, 1e-12))
    per_stage = []
    for assignment in soft_assignments:
        if assignment.ndim != 3:
            raise ValueError(f"assignments must be [B, N, G], got {assignment.shape}.")
        assignment = assignment.astype(jnp.float32)
        usage = jnp.mean(assignment, axis=1)  # [B, G]
        usage_kl = jnp.sum(xlogx(usage), axis=-1) + jnp.log(usage.shape[-1])
        token_entropy = -jnp.mean(jnp.sum(xlogx(assignment), axis=-1), axis=1)
        per_stage.append(jnp.mean(usage_kl + token_entropy))
    return jnp.mean(jnp.stack(per_stage))


def classification_loss(features, labels, kernel, bias):
    """Image-level multi-label classification: sigmoid cross-entropy, averaged over classes.

    The features are standardised over the batch before the linear head, as the model's
    projectors do with their BatchNorm: LayerNorm-ed token means share a large image-independent
    part that a plain linear head is slow to see past.

    Args:
      features: [B, C] image features (the mean of the stage-1 patch tokens).
      labels: [B, K] float 0/1, which classes each image shows.
      kernel, bias: [C, K] and [K], the head.

    Returns:
      [] float32 loss.
    """
    if labels.shape != (features.shape[0], kernel.shape[1]):
        raise ValueError(
            f"labels {labels.shape} do not fit {features.shape[0]} images and a head of "
            f"{kernel.shape[1]} classes"
        )
    features = features.astype(jnp.float32)
    mean = jnp.mean(features, axis=0)
    variance = jnp.mean(jnp.square(features - mean), axis=0)
    logits = (features - mean) * jax.lax.rsqrt(variance + 1e-5) @ kernel + bias
    # log(1 + exp(-|x|)) + max(x, 0) - x y: stable for logits of either sign.
    per_class = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return jnp.mean(per_class)


def total_loss(terms, weights: Mapping[str, float]):
    """Weighted sum of named loss terms, and everything worth logging.

    Args:
      terms: {name: [] loss}, e.g. {'contrastive': ..., 'multi_label': ...}.
      weights: {name: Python float}, exactly one per term (the `loss.*` config fields).

    Returns:
      (total [] float32, {name: [] unweighted float32 term for every name, plus 'total'}).
      Zero-weight terms are reported but left out of the sum, so a NaN in a switched-off term
      cannot poison the total or its gradient.
    """
    if "total" in terms:
        raise ValueError("'total' is reserved for the weighted sum; rename that loss term.")
    missing_weight = sorted(set(terms) - set(weights))
    missing_term = sorted(set(weights) - set(terms))
    if missing_weight:
        raise ValueError(
            f"Loss terms without a weight: {missing_weight} (weights given for {sorted(weights)})."
        )
    if missing_term:
        raise ValueError(
            f"Weights for loss terms that were not computed: {missing_term} (terms "
            f"given: {sorted(terms)})."
        )
    metrics = {}
    total = jnp.zeros((), jnp.float32)
    for name in sorted(terms):
        term = jnp.asarray(terms[name], jnp.float32)
        if term.ndim != 0:
            raise ValueError(f"Loss term {name!r} must be a scalar, got shape {term.shape}.")
        metrics[name] = term
        weight = float(weights[name])
        if weight != 0.0:
            total = total + weight * term
    metrics["total"] = total
    return total, metrics
