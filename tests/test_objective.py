"""The training objective's table of loss terms and the MixReorg forward, on the tiny model."""

import functools
import pathlib

import jax
import numpy as np
import optax
import pytest

from mixreorg_jax import benchmark
from mixreorg_jax.models import groupvit, mixreorg
from mixreorg_jax.ops import mixing
from mixreorg_jax.training import config as train_config
from mixreorg_jax.training import objective
from mixreorg_jax.training import step as train_step

REPO = pathlib.Path(__file__).resolve().parents[1]
fast_jit = functools.partial(
    jax.jit,
    compiler_options={
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
    },
)


def tiny_groupvit():
    """(config, model, variables, params, batch): the tiny GroupViT config at batch 4."""
    config = train_config.from_file(f"{REPO}/configs/groupvit.py:tiny")
    config.data.batch_size = 4
    model = groupvit.GroupViT(config.model)
    variables = groupvit.init_variables(config.model, jax.random.key(0))
    params = {
        "model": variables["params"],
        **objective.init_extra_params(config),
    }
    return (
        config,
        model,
        variables,
        params,
        benchmark.random_batch(config, np.random.default_rng(0)),
    )


def tiny_mixreorg():
    """`tiny_groupvit` with the tiny MixReorg config's mixing and loss settings."""
    config, *rest = tiny_groupvit()
    mixreorg_config = train_config.from_file(f"{REPO}/configs/mixreorg.py:tiny")
    config.mix, config.loss = mixreorg_config.mix, mixreorg_config.loss
    return config, *rest


def loss_terms_and_grads(config, model, variables, params, batch):
    """(loss terms, gradients w.r.t. params) of one jitted training loss."""
    loss = lambda p: objective.loss_fn(
        p, variables["batch_stats"], batch, jax.random.key(1), model=model, config=config
    )
    (_, (terms, _)), grads = fast_jit(jax.value_and_grad(loss, has_aux=True))(params)
    return terms, grads


def grouping_key_grad(grads):
    """The gradient of the first grouping block's assignment key projection."""
    return np.asarray(grads["model"]["vision"]["stages_0"]["grouping"]["assign"]["key"]["kernel"])


def test_group_balance_term_is_added_only_when_weighted_and_reaches_the_grouping():
    config, model, variables, params, batch = tiny_groupvit()

    def terms_and_grads(weight):
        config.loss.group_balance = weight
        return loss_terms_and_grads(config, model, variables, params, batch)

    terms, _ = terms_and_grads(0.0)
    assert "group_balance" not in terms
    config.loss.contrastive = config.loss.multi_label = 0.0  # the balance term alone
    terms, grads = terms_and_grads(1.0)
    assert 0.0 < float(terms["group_balance"]) <= np.log(config.model.num_output_groups[0]) + 1e-5
    assert np.abs(grouping_key_grad(grads)).max() > 0
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads["model"]["text"]))


def test_multi_label_same_word_positives_use_the_batch_prompt_ids():
    config, model, variables, params, batch = tiny_groupvit()
    batch["prompt_ids"] = np.array([[1, 2, -1], [1, 3, -1], [2, 4, 5], [6, 7, 8]], np.int32)

    def multi_label(positives, batch):
        config.loss.multi_label_positives = positives
        loss = lambda b: objective.loss_fn(
            params, variables["batch_stats"], b, jax.random.key(1), model=model, config=config
        )
        return float(fast_jit(loss)(batch)[1][0]["multi_label"])

    own, same_word = multi_label("own", batch), multi_label("same_word", batch)
    assert np.isfinite(same_word) and abs(own - same_word) > 1e-4
    unique = dict(batch, prompt_ids=np.arange(12, dtype=np.int32).reshape(4, 3))
    np.testing.assert_allclose(multi_label("same_word", unique), own, rtol=1e-5)
    with pytest.raises(ValueError, match="needs the batch's prompt_ids"):
        multi_label("same_word", {k: v for k, v in batch.items() if k != "prompt_ids"})
    with pytest.raises(ValueError, match="'own' or 'same_word'"):
        multi_label("sameword", batch)


def test_mixseg_soft_assignment_chains_the_soft_assignments():
    config, model, variables, params, batch = tiny_mixreorg()
    config.loss.contrastive = config.loss.multi_label = config.loss.restore = 0.0

    def mixseg_and_grads(assignment):
        config.loss.mixseg_assignment = assignment
        terms, grads = loss_terms_and_grads(config, model, variables, params, batch)
        return float(terms["mixseg"]), grads

    hard, hard_grads = mixseg_and_grads("hard")
    soft, soft_grads = mixseg_and_grads("soft")
    assert np.isfinite(soft) and abs(hard - soft) > 1e-4
    for grads in (hard_grads, soft_grads):
        assert np.abs(grouping_key_grad(grads)).max() > 0
    with pytest.raises(ValueError, match="'hard' or 'soft'"):
        mixseg_and_grads("gumbel")


def test_restore_weight_zero_skips_the_restored_branch():
    config, model, variables, params, batch = tiny_mixreorg()
    image = batch["image"]
    grid = image.shape[1] // config.model.patch_size
    plan = mixing.mixing_plan(
        jax.random.key(2), image.shape[0], (grid, grid), config.mix.group_size
    )
    forward = lambda restored: fast_jit(
        lambda v: model.apply(
            v,
            image,
            plan,
            config.mix,
            train=False,
            restored=restored,
            method=mixreorg.image_forward,
        )
    )(variables)
    three, two = forward(True), forward(False)
    assert "restored_image" in three and set(two) == set(three) - {"restored_image"}
    for name in ("image", "mixed_segments"):
        np.testing.assert_allclose(two[name], three[name], rtol=1e-4, atol=1e-5)
    config.loss.restore = 0.0
    terms, _ = loss_terms_and_grads(config, model, variables, params, batch)
    assert "restore" not in terms and {"contrastive", "mixseg"} <= set(terms)


def test_multi_label_logit_scale_starts_at_the_models_initial_scale():
    config = train_config.from_file(f"{REPO}/configs/groupvit.py:tiny")
    config.model.logit_scale_init = 2.5
    init = train_step.make_init_fn(groupvit.GroupViT(config.model), config, optax.sgd(0.1))
    params = fast_jit(init)(jax.random.key(0))["params"]
    assert float(params["model"]["logit_scale"]) == 2.5
    assert float(params["multi_label_logit_scale"]) == 2.5


@pytest.mark.parametrize(
    "mix,term",
    [(False, "segment_multi_label"), (True, "segment_multi_label"), (False, "segment_retrieval")],
)
def test_segment_terms_score_prompts_by_the_original_branchs_segments(mix, term):
    config, model, variables, params, batch = tiny_mixreorg() if mix else tiny_groupvit()
    if mix:
        config.loss.restore = config.loss.mixseg = 0.0
    config.loss.contrastive = 0.0

    def terms_and_grads(weight):
        config.loss[term] = weight
        return loss_terms_and_grads(config, model, variables, params, batch)

    pooled, _ = terms_and_grads(0.0)
    assert term not in pooled
    config.loss.multi_label = 0.0  # the segment term alone, prompts still encoded for it
    terms, grads = terms_and_grads(1.0)
    assert np.isfinite(float(terms[term]))
    assert abs(float(terms[term]) - float(pooled["multi_label"])) > 1e-4
    assert np.abs(grouping_key_grad(grads)).max() > 0
    assert np.abs(np.asarray(grads["multi_label_logit_scale"])) > 0
    token_embedding = grads["model"]["text"]["token_embedding"]["embedding"]
    assert np.abs(np.asarray(token_embedding)).max() > 0


def test_share_temperature_puts_the_multi_label_terms_on_the_image_text_scale():
    config, model, variables, params, batch = tiny_groupvit()
    config.loss.update(contrastive=0.0, segment_multi_label=1.0)
    own, own_grads = loss_terms_and_grads(config, model, variables, params, batch)
    assert float(own_grads["model"]["logit_scale"]) == 0
    config.loss.share_temperature = True
    params = {**params, "multi_label_logit_scale": params["multi_label_logit_scale"] + 1.0}
    shared, grads = loss_terms_and_grads(config, model, variables, params, batch)
    for term in ("multi_label", "segment_multi_label"):  # the other scale is not read
        np.testing.assert_allclose(shared[term], own[term], rtol=1e-5)
    assert float(grads["multi_label_logit_scale"]) == 0
    assert float(grads["model"]["logit_scale"]) != 0


def logged_names(config_file, batch_size=4, **loss):
    """The names `loss_fn` logs for a config (shapes only: traced, never compiled)."""
    config = train_config.from_file(f"{REPO}/configs/{config_file}")
    config.loss.update(loss)
    model = groupvit.GroupViT(config.model)
    variables = jax.eval_shape(
        lambda k: groupvit.init_variables(config.model, k), jax.random.key(0)
    )
    params = {
        "model": variables["params"],
        **objective.init_extra_params(config),
    }
    batch = benchmark.random_batch(config, np.random.default_rng(0), batch_size)
    loss = lambda p, s: objective.loss_fn(
        p, s, batch, jax.random.key(1), model=model, config=config
    )
    return set(jax.eval_shape(loss, params, variables["batch_stats"])[1][0])


def test_shipped_configs_log_their_weighted_terms_and_the_monitored_ones():
    image_text = {"contrastive", "multi_label", "total", "logit_scale"}
    demo = image_text | {"group_balance", "segment_multi_label", "segment_retrieval"}
    assert logged_names("groupvit.py:tiny") == image_text
    assert logged_names("mixreorg.py:tiny") == image_text | {"restore", "mixseg"}
    assert logged_names("groupvit.py:demo") == demo
    assert logged_names("mixreorg.py:demo") == demo | {"mixseg"}
    # Weight 0 drops a term, except the caption alignment and the mixed-segmentation loss,
    # which read only what the forward computes anyway.
    assert logged_names("mixreorg.py:tiny", contrastive=0.0, restore=0.0, mixseg=0.0) == (
        image_text | {"mixseg"}
    )
    assert "restore" not in logged_names("groupvit.py:tiny", restore=1.0)  # no mixing, no term


def test_mixreorg_forward_rejects_bad_mix_settings():
    config, model, variables, _, batch = tiny_mixreorg()
    grid = (batch["image"].shape[1] // config.model.patch_size,) * 2
    plan = mixreorg.mixing_plan(jax.random.key(0), config.mix, 4, grid)
    forward = lambda mix: jax.eval_shape(
        lambda v: model.apply(
            v, batch["image"], plan, mix, train=False, method=mixreorg.image_forward
        ),
        variables,
    )
    settings = config.mix.to_dict()
    depth = config.model.depths[0]
    assert "mixed_assignment" in forward(settings)  # a plain dict is the same settings
    with pytest.raises(ValueError, match="progressive_mode must be 'add' or 'average'"):
        forward({**settings, "progressive_mode": "sum"})
    with pytest.raises(ValueError, match=rf"depth={depth + 1} must lie in \[0, {depth}\]"):
        forward({**settings, "contextual_depth": depth + 1})
