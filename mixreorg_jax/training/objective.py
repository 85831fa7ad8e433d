"""The training objective: one forward pass of GroupViT or MixReorg and its loss terms.

`loss_fn` is what the trainer differentiates and the benchmark times; with `config.mix.enabled`
off it is plain GroupViT training (image-text contrastive + multi-label loss), with it on the
MixReorg objective of method.md §4 (adds the restoration and mixed-segmentation losses).

Parameters are `{"model": <GroupViT params>, "multi_label_logit_scale": <0-d>}`: the multi-label
loss has its own learned temperature (unless `loss.share_temperature`), which is part of training,
not of the exported model.
"""

import jax
import jax.numpy as jnp
import ml_collections

from mixreorg_jax import losses
from mixreorg_jax.models import groupvit, mixreorg
from mixreorg_jax.ops import mixing, segmentation


def init_extra_params(log_scale: float) -> dict:
    """Training-only parameters, beside the model's; the multi-label loss's log logit scale
    starts at `log_scale`, the model's `logit_scale_init` (as in GroupViT, where both start at
    log(1 / 0.07))."""
    return {"multi_label_logit_scale": jnp.asarray(log_scale, jnp.float32)}


def _forward(
    module,
    images,
    texts,
    plan,
    *,
    mix: ml_collections.ConfigDict,
    mix_fns,
    mixseg_assignment: str = "hard",
    segments: bool = False,
    restored: bool = True,
):
    """Everything that touches parameters, in one `apply` so batch statistics update once.

    Returns the embeddings the losses need: original-branch image embeddings and soft
    assignments, caption and prompt embeddings and, for MixReorg, the restored-branch image
    embeddings (unless `restored` is off), the mixed branch's projected segments and its
    patch -> final-segment assignment (`mixseg_assignment`: the chain of "hard" straight-through
    or of "soft" assignments) and, with `segments`, the original branch's projected final
    segments.
    """
    text = module.encode_text(texts, train=True)["embedding"]
    if plan is None:
        orig = module.encode_image(images, train=True)
        out = {
            "image": orig["embedding"],
            "text": text,
            "soft_assignments": orig["soft_assignments"],
        }
    else:
        out = _mixreorg_forward(
            module,
            images,
            plan,
            mix=mix,
            mix_fns=mix_fns,
            mixseg_assignment=mixseg_assignment,
            restored=restored,
        )
        orig = out.pop("original")
        out["text"] = text
    if segments:
        out["segments"] = module.project_segments(
            orig["segments"], train=True, stats_from=orig["pooled"]
        )
    return out


def _mixreorg_forward(module, images, plan, *, mix, mix_fns, mixseg_assignment, restored):
    """MixReorg's image branches and what its losses read of them (`_forward`)."""
    mix_fn, restore_fn = mix_fns
    branches = mixreorg.mixreorg_image_forward(
        module,
        images,
        plan,
        contextual_depth=mix.contextual_depth,
        progressive_weight=mix.progressive_weight,
        progressive_mode=mix.progressive_mode,
        train=True,
        mix_fn=mix_fn,
        restore_fn=restore_fn,
        restored=restored,
    )
    orig, mixed = branches["original"], branches["mixed"]
    # Each branch is normalised with its own batch statistics; only the original branch moves
    # the running averages used at evaluation.
    out = {
        "original": orig,
        "image": module.project_image(orig["pooled"], train=True),
        "soft_assignments": orig["soft_assignments"],
        "mixed_segments": module.project_segments(
            mixed["segments"], train=True, stats_from=mixed["pooled"]
        ),
        "mixed_assignment": segmentation.chain_assignments(
            mixed[f"{mixseg_assignment}_assignments"]
        ),
    }
    if restored:
        out["restored_image"] = module.project_image(
            branches["restored"]["pooled"], train=True, update_stats=False
        )
    return out


def _prompt_ids(batch, positives: str):
    """The multi-label loss's prompt word ids for `loss.multi_label_positives`, or None."""
    if positives == "own":
        return None
    if positives != "same_word":
        raise ValueError(
            f"loss.multi_label_positives must be 'own' or 'same_word', got {positives!r}"
        )
    if "prompt_ids" not in batch:
        raise ValueError(
            "loss.multi_label_positives='same_word' needs the batch's prompt_ids "
            "(the input pipeline makes them)"
        )
    return batch["prompt_ids"]


def _word_text(batch, prompt_emb):
    """[B, D] L2-normalised mean of each image's word-prompt embeddings [B, P, D] (ours).

    The prompts that pad a caption with fewer words (the caption itself, word id -1) are left out
    when the batch has `prompt_ids`; a caption without any word keeps them all.
    """
    if "prompt_ids" in batch:
        words = batch["prompt_ids"] >= 0
        weights = jnp.where(words.any(axis=1, keepdims=True), words, True).astype(prompt_emb.dtype)
    else:
        weights = jnp.ones(prompt_emb.shape[:2], prompt_emb.dtype)
    return groupvit.l2_normalize(jnp.einsum("bp,bpd->bd", weights, prompt_emb))


def loss_fn(
    params,
    batch_stats,
    batch,
    rng,
    *,
    model,
    config: ml_collections.ConfigDict,
    mix_fns=(mixing.mix_tokens, mixing.restore_tokens),
):
    """The total training loss.

    Args:
      params: {"model": ..., "multi_label_logit_scale": ...}.
      batch_stats: the model's BatchNorm statistics.
      batch: image float[B, H, W, 3], tokens int[B, L], prompt_tokens int[B, P, L] and, for
        `loss.multi_label_positives="same_word"`, prompt_ids int[B, P].
      rng: a key for this step (mixing plan, gumbel noise, drop-path).
      model: the `GroupViT` module.
      config: the train config (`mix`, `loss`).
      mix_fns: (mix, restore) token functions; per-device `shard_map` versions under a mesh.

    Returns:
      (loss, (terms, new_batch_stats)), terms holding every loss term and the logit scale.
    """
    images, tokens, prompts = batch["image"], batch["tokens"], batch["prompt_tokens"]
    b, p, length = prompts.shape
    plan_rng, gumbel_rng, dropout_rng = jax.random.split(rng, 3)
    plan = None
    if config.mix.enabled:
        patch = config.model.patch_size
        grid = (images.shape[1] // patch, images.shape[2] // patch)
        plan = mixing.mixing_plan(plan_rng, b, grid, config.mix.group_size, config.mix.block_size)
    if config.loss.mixseg_assignment not in ("hard", "soft"):
        raise ValueError(
            f"loss.mixseg_assignment must be 'hard' or 'soft', got "
            f"{config.loss.mixseg_assignment!r}"
        )
    mixseg_text = config.loss.mixseg_text
    if mixseg_text not in ("caption", "prompts"):
        raise ValueError(f"loss.mixseg_text must be 'caption' or 'prompts', got {mixseg_text!r}")
    needs_segments = bool(
        config.loss.segment_multi_label
        or config.loss.segment_retrieval
        or config.loss.unmatched_segments
    )
    mixed_ml = plan is not None and config.loss.mixed_multi_label
    multi_label_terms = bool(config.loss.multi_label or needs_segments or mixed_ml)
    if not (multi_label_terms or plan is not None and mixseg_text == "prompts"):
        prompts = prompts[:, :0]  # Not encoded: nothing reads them.
        p = 0
    texts = jnp.concatenate([tokens[:, None], prompts], axis=1).reshape(b * (1 + p), length)

    out, updates = model.apply(
        {"params": params["model"], "batch_stats": batch_stats},
        images,
        texts,
        plan,
        mix=config.mix,
        mix_fns=mix_fns,
        mixseg_assignment=config.loss.mixseg_assignment,
        segments=needs_segments,
        restored=bool(config.loss.restore),
        method=_forward,
        mutable=["batch_stats"],
        rngs={"gumbel": gumbel_rng, "dropout": dropout_rng},
    )

    text = out["text"].reshape(b, 1 + p, -1)
    caption_emb, prompt_emb = text[:, 0], text[:, 1:]
    log_scale = params["model"]["logit_scale"]
    terms = {"contrastive": losses.contrastive_loss(out["image"], caption_emb, log_scale)}
    # GroupViT's `share_temperature`: the multi-label terms on the image-text (evaluation's) scale.
    ml_scale = log_scale if config.loss.share_temperature else params["multi_label_logit_scale"]
    prompt_ids = None
    if multi_label_terms:
        prompt_ids = _prompt_ids(batch, config.loss.multi_label_positives)
    if config.loss.multi_label:
        terms["multi_label"] = losses.multi_label_contrastive_loss(
            out["image"], prompt_emb, ml_scale, prompt_ids
        )
    if config.loss.segment_multi_label:
        terms["segment_multi_label"] = losses.multi_label_contrastive_loss(
            out["segments"], prompt_emb, ml_scale, prompt_ids
        )
    if config.loss.segment_retrieval:
        terms["segment_retrieval"] = losses.segment_retrieval_loss(
            out["segments"], prompt_emb, ml_scale, prompt_ids
        )
    if config.loss.unmatched_segments:
        terms["unmatched_segments"] = losses.unmatched_segment_loss(
            out["segments"], prompt_emb, log_scale, prompt_ids
        )
    if config.loss.group_balance:
        terms["group_balance"] = losses.group_balance_loss(out["soft_assignments"])
    if plan is not None:
        if config.loss.restore:  # At weight 0 the restored branch is not even run.
            terms["restore"] = losses.contrastive_loss(
                out["restored_image"], caption_emb, log_scale
            )
        if mixed_ml:
            # A mixed image shows its group's words: its prompts are the group members' (each
            # kept apart from other prompts by its position in the batch unless `same_word`).
            ids = (
                jnp.arange(b * p, dtype=jnp.int32).reshape(b, p)
                if prompt_ids is None
                else jnp.asarray(prompt_ids)
            )
            k = plan.group_captions.shape[1]
            terms["mixed_multi_label"] = losses.multi_label_contrastive_loss(
                out["mixed_segments"],
                prompt_emb[plan.group_captions].reshape(b, k * p, -1),
                ml_scale,
                ids[plan.group_captions].reshape(b, k * p),
            )
        mixseg_emb = caption_emb if mixseg_text == "caption" else _word_text(batch, prompt_emb)
        terms["mixseg"] = losses.mixed_segmentation_loss(
            out["mixed_assignment"],
            out["mixed_segments"],
            mixseg_emb,
            plan.source,
            log_scale,
            group_size=config.mix.group_size,
            negatives=config.loss.mixseg_negatives,
        )
    weights = {name: config.loss[name] for name in terms}
    total, logs = losses.total_loss(terms, weights)
    logs["logit_scale"] = losses.logit_scale(log_scale)
    return total, (logs, updates["batch_stats"])
