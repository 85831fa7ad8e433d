"""The training objective: one forward pass of GroupViT or MixReorg and a table of loss terms.

`loss_fn` is what the trainer differentiates and the benchmark times; with `config.mix.enabled`
off it is plain GroupViT training (image-text contrastive + multi-label loss), with it on the
MixReorg objective of docs/method.md §4 (adds the restoration and mixed-segmentation losses).
Each term of `TERMS` is a `losses` function of the forward's outputs, weighted by the
`config.loss` field of its name.

Parameters are `{"model": <GroupViT params>, "multi_label_logit_scale": <0-d>}`: the multi-label
loss has its own learned temperature (unless `loss.share_temperature`), which is part of training,
not of the exported model.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from mixreorg_jax import losses
from mixreorg_jax.models import mixreorg
from mixreorg_jax.ops import mixing


class Term(NamedTuple):
    """A loss term: `loss(x, config)`, a `losses` function of `x`, which holds the outputs of
    `mixreorg.image_forward` (image, soft_assignments, segments, mixed_segments, mixed_assignment,
    restored_image) and caption [B, D], prompts [B, P, D], prompt_ids int[B, P] or None,
    log_scale (the image-text one), ml_log_scale (the multi-label terms') and, with mixing, each
    mixed patch's source caption int[B, N].

    `needs`: what the forward computes only when a term that reads it has weight ("prompts":
    the multi-label prompts are encoded; "segments": the original branch's final segments are
    projected; "restored": the restored branch runs). `mixing`: the term exists only with mixing.
    """

    loss: Callable[[dict, ml_collections.ConfigDict], jax.Array]
    needs: tuple[str, ...] = ()
    mixing: bool = False


TERMS = {
    "contrastive": Term(
        lambda x, c: losses.contrastive_loss(x["image"], x["caption"], x["log_scale"])
    ),
    "multi_label": Term(
        lambda x, c: losses.multi_label_contrastive_loss(
            x["image"], x["prompts"], x["ml_log_scale"], x["prompt_ids"]
        ),
        ("prompts",),
    ),
    # Ours: an image-prompt score is the image's best-matching final segment's.
    "segment_multi_label": Term(
        lambda x, c: losses.multi_label_contrastive_loss(
            x["segments"], x["prompts"], x["ml_log_scale"], x["prompt_ids"]
        ),
        ("prompts", "segments"),
    ),
    "segment_retrieval": Term(
        lambda x, c: losses.segment_retrieval_loss(
            x["segments"], x["prompts"], x["ml_log_scale"], x["prompt_ids"]
        ),
        ("prompts", "segments"),
    ),
    "group_balance": Term(lambda x, c: losses.group_balance_loss(x["soft_assignments"])),
    "restore": Term(
        lambda x, c: losses.contrastive_loss(x["restored_image"], x["caption"], x["log_scale"]),
        ("restored",),
        mixing=True,
    ),
    # Backbone pre-training (configs/backbone.py): image-level labels, no text.
    "classification": Term(
        lambda x, c: losses.classification_loss(
            x["patch_features"], x["labels"], x["classifier"]["kernel"], x["classifier"]["bias"]
        ),
        ("patch_features",),
    ),
    "mixseg": Term(
        lambda x, c: losses.mixed_segmentation_loss(
            x["mixed_assignment"][c.loss.mixseg_assignment],
            x["mixed_segments"],
            x["caption"],
            x["source"],
            x["log_scale"],
            group_size=c.mix.group_size,
            negatives=c.loss.mixseg_negatives,
        ),
        mixing=True,
    ),
}
# Logged also at weight 0 (and left out of the total): each run's caption alignment, and how the
# mixed-segmentation task fares untrained. Both read only what the forward computes anyway.
LOGGED_AT_ZERO_WEIGHT = ("contrastive", "mixseg")


def init_extra_params(config: ml_collections.ConfigDict) -> dict:
    """Training-only parameters, beside the model's: the multi-label loss's log logit scale,
    starting at the model's `logit_scale_init` (as in GroupViT, where both start at
    log(1 / 0.07)), and with `loss.classification` the classifier head (zeros, one column per
    `data.labels` class)."""
    extra = {"multi_label_logit_scale": jnp.asarray(config.model.logit_scale_init, jnp.float32)}
    if config.loss.get("classification"):
        num_classes = len(config.data.get("labels", ()) or ())
        if not num_classes:
            raise ValueError("loss.classification needs the class names in data.labels")
        extra["classifier"] = {
            "kernel": jnp.zeros((config.model.width, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32),
        }
    return extra


def _forward(module, images, texts, plan, *, mix, mix_fns, segments, restored, full, patches):
    """Everything that touches parameters, in one `apply` so batch statistics update once:
    with `full`, `mixreorg.image_forward`'s outputs and the texts' embeddings, "text"; with
    `patches`, the stage-1 patch features, "patch_features"."""
    out = {}
    if full:
        text = module.encode_text(texts, train=True)["embedding"]
        out = mixreorg.image_forward(
            module, images, plan, mix, mix_fns=mix_fns, segments=segments, restored=restored
        )
        out["text"] = text
    if patches:
        out["patch_features"] = module.vision.patch_features(images, train=True)
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
      (loss, (logs, new_batch_stats)): logs hold every computed term (unweighted), "total" and
      "logit_scale".
    """
    if config.loss.mixseg_assignment not in ("hard", "soft"):
        raise ValueError(
            f"loss.mixseg_assignment must be 'hard' or 'soft', got "
            f"{config.loss.mixseg_assignment!r}"
        )
    images, tokens, prompts = batch["image"], batch["tokens"], batch["prompt_tokens"]
    b, p, length = prompts.shape
    plan_rng, gumbel_rng, dropout_rng = jax.random.split(rng, 3)
    plan = None
    if config.mix.enabled:
        patch = config.model.patch_size
        grid = (images.shape[1] // patch, images.shape[2] // patch)
        plan = mixreorg.mixing_plan(plan_rng, config.mix, b, grid)
    weights = {
        name: float(config.loss[name])
        for name, term in TERMS.items()
        if (plan is not None or not term.mixing)
        and (config.loss[name] or name in LOGGED_AT_ZERO_WEIGHT)
    }
    weighted = {name for name, weight in weights.items() if weight}
    # Only backbone pre-training's classifier: no text, no grouping, nothing logged at weight 0.
    full = bool(weighted - {"classification"})
    if not full:
        weights = {name: weights[name] for name in weighted}
    needs = set().union(*(TERMS[name].needs for name in weighted))
    prompt_ids = None
    if "prompts" in needs:
        prompt_ids = _prompt_ids(batch, config.loss.multi_label_positives)
    else:
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
        segments="segments" in needs,
        restored="restored" in needs,
        full=full,
        patches="patch_features" in needs,
        method=_forward,
        mutable=["batch_stats"],
        rngs={"gumbel": gumbel_rng, "dropout": dropout_rng},
    )

    text = out.pop("text").reshape(b, 1 + p, -1) if full else jnp.zeros((b, 1 + p, 0))
    log_scale = params["model"]["logit_scale"]
    # GroupViT's `share_temperature`: the multi-label terms on the image-text (evaluation's) scale.
    shared = config.loss.share_temperature
    x = {
        **out,
        "caption": text[:, 0],
        "prompts": text[:, 1:],
        "prompt_ids": prompt_ids,
        "log_scale": log_scale,
        "ml_log_scale": log_scale if shared else params["multi_label_logit_scale"],
        "source": None if plan is None else plan.source,
        "labels": batch.get("labels"),
        "classifier": params.get("classifier"),
    }
    if "patch_features" in needs and x["labels"] is None:
        raise ValueError("loss.classification needs labels in the batch: set data.labels")
    terms = {name: TERMS[name].loss(x, config) for name in weights}
    total, logs = losses.total_loss(terms, weights)
    logs["logit_scale"] = losses.logit_scale(log_scale)
    return total, (logs, updates["batch_stats"])
