"""GroupViT modules: grouping, gumbel, resolution changes, dtype, remat, the projector's BatchNorm.

Graphs are compiled with XLA's CPU optimisation level 0 (`fast_jit`): these tiny models compile
several times faster and the results agree with the default level within every tolerance here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mixreorg_jax.models import groupvit, presets
from mixreorg_jax.ops import resize

fast_jit = functools.partial(
    jax.jit,
    compiler_options={
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
    },
)


@pytest.fixture(scope="module")
def tiny():
    config = presets.get_model_config("tiny")
    model = groupvit.GroupViT(config)
    variables = fast_jit(functools.partial(groupvit.init_variables, config))(jax.random.key(0))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
    tokens = np.zeros((3, config.context_length), np.int32)
    tokens[:, 0] = 49406
    tokens[:, 1:5] = rng.integers(1, 49000, (3, 4))
    tokens[:, 5] = 49407
    forward = fast_jit(lambda v, images, tokens: model.apply(v, images, tokens))
    return config, model, variables, images, tokens, forward


def test_init_shapes_dtypes_and_initial_values(tiny):
    config, _, variables, *_ = tiny
    params = variables["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    assert params["logit_scale"].shape == ()
    np.testing.assert_allclose(params["logit_scale"], np.log(1 / 0.07), rtol=1e-6)
    stage_1 = params["vision"]["stages_0"]["group_tokens"]
    assert stage_1.shape == (1, 8, 32) and 0.01 < np.std(stage_1) < 0.03
    assert not np.any(params["vision"]["stages_1"]["group_tokens"])  # zero init
    assert "group_tokens" not in params["vision"]["stages_2"]
    assert params["vision"]["position_embedding"].shape == (1, 64, 32)
    assert params["vision"]["patch_embed"]["kernel"].shape == (4, 4, 3, 32)
    bn_stats = variables["batch_stats"]["image_projector"]["bn"]
    assert not np.any(bn_stats["mean"]) and np.all(bn_stats["var"] == 1) and bn_stats["count"] == 0


def test_lecun_normal_weight_init_scales_kernels_by_fan_in_and_keeps_the_tree(tiny):
    config, _, variables, *_ = tiny
    config = config.copy_and_resolve_references()
    config.weight_init = "lecun_normal"
    lecun = fast_jit(functools.partial(groupvit.init_variables, config))(jax.random.key(0))
    assert jax.tree.structure(lecun) == jax.tree.structure(variables)
    params = lecun["params"]
    for kernel, fan_in in [
        (params["vision"]["patch_embed"]["kernel"], 4 * 4 * 3),
        (params["text"]["blocks_0"]["mlp"]["fc2"]["kernel"], 4 * 32),
        (params["image_projector"]["fc1"]["kernel"], 32),
    ]:
        assert 0.8 < np.std(kernel) * np.sqrt(fan_in) < 1.2
    # GroupViT's own init is untouched: std 0.02, truncated.
    kernel = variables["params"]["text"]["blocks_0"]["mlp"]["fc2"]["kernel"]
    assert 0.015 < np.std(kernel) < 0.02 and np.abs(kernel).max() <= 0.04 + 1e-6
    config.weight_init = "xavier"
    with pytest.raises(ValueError, match="weight_init"):
        groupvit.validate_config(config)


def test_forward_shapes_and_normalisation(tiny):
    config, _, variables, images, tokens, forward = tiny
    out = forward(variables, images, tokens)
    assert out["image_embedding"].shape == (4, 32) and out["text_embedding"].shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(out["image_embedding"], axis=-1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_embedding"], axis=-1), 1, rtol=1e-5)
    scale = np.exp(variables["params"]["logit_scale"])
    np.testing.assert_allclose(
        out["logits_per_image"],
        scale * out["image_embedding"] @ out["text_embedding"].T,
        rtol=1e-5,
        atol=1e-5,
    )
    assert out["segments"].shape == (4, 4, 32) and out["pooled"].shape == (4, 32)
    np.testing.assert_allclose(out["pooled"], out["segments"].mean(axis=1), rtol=1e-5, atol=1e-6)
    assert [a.shape for a in out["soft_assignments"]] == [(4, 64, 8), (4, 8, 4)]
    for soft in out["soft_assignments"]:
        np.testing.assert_allclose(soft.sum(-1), 1, rtol=1e-5)


def test_hard_assignments_are_one_hot_with_gumbel_noise_only_in_training(tiny):
    _, model, variables, images, tokens, forward = tiny

    @fast_jit
    def train(variables, images, key):
        out, _ = model.apply(
            variables,
            images,
            train=True,
            rngs={"gumbel": key},
            mutable=["batch_stats"],
            method=groupvit.GroupViT.encode_image,
        )
        return out

    key_a, key_b = jax.random.split(jax.random.key(1))
    runs = {
        "train_a": train(variables, images, key_a),
        "train_a_again": train(variables, images, key_a),
        "train_b": train(variables, images, key_b),
        "eval": forward(variables, images, tokens),
    }
    for out in runs.values():
        for hard in out["hard_assignments"]:
            hard = np.asarray(hard)
            one_hot = np.eye(hard.shape[-1], dtype=hard.dtype)[hard.argmax(-1)]
            assert np.array_equal(hard, one_hot)
    # Eval: no noise (and no rng), the argmax of the soft map.
    for soft, hard in zip(runs["eval"]["soft_assignments"], runs["eval"]["hard_assignments"]):
        assert np.array_equal(np.argmax(hard, -1), np.argmax(soft, -1))
    # Train: the noise comes from the 'gumbel' stream; the soft map stays noise-free.
    first_hard = lambda name: np.asarray(runs[name]["hard_assignments"][0])
    assert np.array_equal(first_hard("train_a"), first_hard("train_a_again"))
    assert not np.array_equal(first_hard("train_a"), first_hard("train_b"))
    assert not np.array_equal(first_hard("train_a"), first_hard("eval"))
    np.testing.assert_allclose(
        runs["train_a"]["soft_assignments"][0],
        runs["eval"]["soft_assignments"][0],
        rtol=1e-5,
        atol=1e-7,
    )


def test_gradients_reach_the_assignment_logits_through_the_straight_through_path(tiny):
    config, _, variables, *_ = tiny
    block = groupvit.GroupingBlock(config, num_output_groups=8)
    params = variables["params"]["vision"]["stages_0"]["grouping"]
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.float32)
    groups = jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.float32)

    @functools.partial(fast_jit, static_argnums=1)
    def assign_grads(params, train):
        def loss(params):
            out, _, hard = block.apply(
                {"params": params}, tokens, groups, train, rngs={"gumbel": jax.random.key(2)}
            )
            return jnp.sum(out**2) + jnp.sum(hard * jnp.arange(8.0))

        return jax.grad(loss)(params)["assign"]

    for train in (False, True):
        grads = assign_grads(params, train)
        # The forward value of the hard assignment is constant in q and k: any gradient they get
        # came through the straight-through softmax.
        assert np.abs(grads["query"]["kernel"]).max() > 1e-6
        assert np.abs(grads["key"]["kernel"]).max() > 1e-6


def test_stage_pieces_compose_like_the_whole_encoder(tiny):
    config, model, variables, images, tokens, forward = tiny

    def pieces(m, images):
        x = m.vision.embed(images)
        group_tokens = m.vision.stage1_group_tokens(x.shape[0])
        x, group_tokens = m.vision.stage1(x, group_tokens, blocks=slice(0, 1))
        x, group_tokens = m.vision.stage1(x, group_tokens, blocks=slice(1, None))
        return m.vision.group(x, group_tokens)

    split = fast_jit(lambda v, images: model.apply(v, images, method=pieces))(variables, images)
    whole = forward(variables, images, tokens)
    for name in ("segments", "pooled", "soft_assignments", "hard_assignments"):
        for a, b in zip(jax.tree.leaves(split[name]), jax.tree.leaves(whole[name])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model.apply(variables, images[:, :30, :30], method=groupvit.GroupViT.encode_image)


def test_larger_images_run_with_a_bicubically_resized_position_embedding(tiny):
    config, model, variables, images, *_ = tiny
    embed = fast_jit(lambda v, x: model.apply(v, x, method=lambda m, x: m.vision.embed(x)))
    position = np.asarray(variables["params"]["vision"]["position_embedding"]).reshape(1, 8, 8, 32)
    # With zero images every patch embeds to the same vector (the LayerNorm of the patch bias),
    # so what is left is the (resized) position embedding.
    patch_part = (
        embed(variables, np.zeros((1, 32, 32, 3), np.float32))[:, :1]
        - position.reshape(1, 64, 32)[:, :1]
    )
    embedded = embed(variables, np.zeros((1, 48, 40, 3), np.float32))
    expected = torch.nn.functional.interpolate(
        torch.tensor(position).permute(0, 3, 1, 2),
        size=(12, 10),
        mode="bicubic",
        align_corners=False,
    )
    expected = expected.permute(0, 2, 3, 1).reshape(1, 120, 32).numpy() + np.asarray(patch_part)
    np.testing.assert_allclose(embedded, expected, rtol=1e-5, atol=1e-5)
    # Whole models at twice their resolution: test_convert.py (parity with HF).


@pytest.mark.parametrize(
    "in_size,out_size",
    [((14, 14), (28, 28)), ((14, 14), (7, 9)), ((3, 5), (11, 2)), ((8, 8), (8, 8))],
)
def test_resize_bicubic_matches_torch(in_size, out_size):
    x = np.random.default_rng(2).normal(size=(2, *in_size, 5)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.tensor(x).permute(0, 3, 1, 2), size=out_size, mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1)
    np.testing.assert_allclose(
        resize.bicubic_resize(x, out_size), expected.numpy(), rtol=1e-5, atol=1e-5
    )


def test_bfloat16_compute_stays_close_to_float32(tiny):
    config, model, variables, images, tokens, forward = tiny
    config16 = config.copy_and_resolve_references()
    config16.dtype = "bfloat16"
    model16 = groupvit.GroupViT(config16)
    params16 = jax.eval_shape(
        functools.partial(groupvit.init_variables, config16), jax.random.key(0)
    )
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params16["params"]))
    out16 = fast_jit(lambda v, i: model16.apply(v, i, method=groupvit.GroupViT.encode_image))(
        variables, images
    )
    out32 = forward(variables, images, tokens)
    assert out16["segments"].dtype == jnp.bfloat16
    assert all(
        a.dtype == jnp.float32 for a in out16["soft_assignments"] + out16["hard_assignments"]
    )
    assert out16["embedding"].dtype == jnp.float32
    cosine = np.sum(np.asarray(out16["embedding"]) * np.asarray(out32["image_embedding"]), axis=-1)
    assert np.all(cosine > 0.98), cosine
    np.testing.assert_allclose(
        out16["soft_assignments"][0], out32["soft_assignments"][0], atol=0.05
    )


def test_remat_changes_neither_parameters_nor_gradients(tiny):
    config, _, variables, _, tokens, _ = tiny
    one_layer = config.copy_and_resolve_references()
    one_layer.text_layers = 1
    params = {k: v for k, v in variables["params"]["text"].items() if k != "blocks_1"}
    grads = []
    for remat in (False, True):
        one_layer.remat = remat
        encoder = groupvit.TextEncoder(one_layer.copy_and_resolve_references())
        assert jax.tree.structure(
            jax.eval_shape(encoder.init, jax.random.key(0), tokens)["params"]
        ) == jax.tree.structure(params)
        loss = lambda p: jnp.sum(encoder.apply({"params": p}, tokens) ** 2)
        grads.append(fast_jit(jax.grad(loss))(params))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_vision_remat_changes_neither_outputs_nor_gradients_in_training(tiny):
    """Blocks and grouping blocks rematerialised: the same gumbel draws, segments and grads."""
    config, _, variables, images, _, _ = tiny
    rngs = {"gumbel": jax.random.key(1), "dropout": jax.random.key(2)}
    results = []
    for remat in (False, True):
        remat_config = config.copy_and_resolve_references()
        remat_config.remat = remat
        encoder = groupvit.VisionEncoder(remat_config)

        def loss(p):
            out = encoder.apply({"params": p}, images, train=True, rngs=rngs)
            return jnp.sum(out["segments"] ** 2), out["hard_assignments"]

        results.append(
            fast_jit(jax.value_and_grad(loss, has_aux=True))(variables["params"]["vision"])
        )
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_drop_path_drops_whole_samples_in_training_only():
    x = jnp.ones((64, 3, 4))
    drop = groupvit.DropPath(0.5)
    np.testing.assert_array_equal(drop.apply({}, x, False), x)
    out = np.asarray(drop.apply({}, x, True, rngs={"dropout": jax.random.key(0)}))
    per_sample = out.reshape(64, -1)
    assert np.all((per_sample == 0).all(1) | (per_sample == 2).all(1))
    assert 10 < (per_sample[:, 0] == 0).sum() < 54


def _torch_projector(variables):
    params = jax.tree.map(lambda a: torch.tensor(np.asarray(a)), variables["params"])
    stats = variables["batch_stats"]["bn"]
    fc1 = torch.nn.Linear(*params["fc1"]["kernel"].shape)
    fc2 = torch.nn.Linear(*params["fc2"]["kernel"].shape)
    bn = torch.nn.BatchNorm1d(fc1.out_features)
    with torch.no_grad():
        fc1.weight.copy_(params["fc1"]["kernel"].T), fc1.bias.copy_(params["fc1"]["bias"])
        fc2.weight.copy_(params["fc2"]["kernel"].T), fc2.bias.copy_(params["fc2"]["bias"])
        bn.weight.copy_(params["bn"]["scale"]), bn.bias.copy_(params["bn"]["bias"])
        bn.running_mean.copy_(torch.tensor(np.asarray(stats["mean"])))
        bn.running_var.copy_(torch.tensor(np.asarray(stats["var"])))
    return torch.nn.Sequential(fc1, bn, torch.nn.ReLU(), fc2)


def test_projector_batch_norm_matches_torch():
    projector = groupvit.Projector(hidden=16, out=8)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 5, 12)).astype(np.float32)  # statistics over both leading axes
    variables = fast_jit(functools.partial(projector.init, train=False))(jax.random.key(0), x)
    variables = {
        "params": jax.tree.map(
            lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), variables["params"]
        ),
        "batch_stats": {
            "bn": {
                "mean": 0.1 * rng.normal(size=16).astype(np.float32),
                "var": rng.uniform(0.5, 1.5, 16).astype(np.float32),
                "count": np.int32(3),
            }
        },
    }
    reference = _torch_projector(variables).train()
    out, updated = projector.apply(variables, x, train=True, mutable=["batch_stats"])
    with torch.no_grad():
        expected = reference(torch.tensor(x.reshape(10, 12))).numpy().reshape(2, 5, 8)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    bn_stats, torch_bn = updated["batch_stats"]["bn"], reference[1]
    np.testing.assert_allclose(
        bn_stats["mean"], torch_bn.running_mean.numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(bn_stats["var"], torch_bn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    assert bn_stats["count"] == 4

    # Eval uses the running averages, as torch's eval mode.
    new = {"params": variables["params"], "batch_stats": updated["batch_stats"]}
    with torch.no_grad():
        expected_eval = reference.eval()(torch.tensor(x[0])).numpy()
    np.testing.assert_allclose(
        projector.apply(new, x[0], train=False), expected_eval, rtol=1e-5, atol=1e-5
    )

    # stats_from: normalised with another array's statistics; update_stats=False keeps the averages.
    other = rng.normal(size=(6, 12)).astype(np.float32)
    out, kept = projector.apply(
        variables, x, train=True, stats_from=other, update_stats=False, mutable=["batch_stats"]
    )
    h_other = other @ np.asarray(variables["params"]["fc1"]["kernel"]) + np.asarray(
        variables["params"]["fc1"]["bias"]
    )
    h = x @ np.asarray(variables["params"]["fc1"]["kernel"]) + np.asarray(
        variables["params"]["fc1"]["bias"]
    )
    bn_params = variables["params"]["bn"]
    normed = (h - h_other.mean(0)) / np.sqrt(h_other.var(0) + 1e-5) * bn_params[
        "scale"
    ] + bn_params["bias"]
    expected = np.maximum(normed, 0) @ np.asarray(
        variables["params"]["fc2"]["kernel"]
    ) + np.asarray(variables["params"]["fc2"]["bias"])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    for name in ("mean", "var", "count"):
        np.testing.assert_array_equal(
            kept["batch_stats"]["bn"][name], variables["batch_stats"]["bn"][name]
        )


def test_config_errors():
    with pytest.raises(
        ValueError, match=r"Unknown model preset 'huge'.*'demo', 'groupvit_s', 'tiny'"
    ):
        presets.get_model_config("huge")
    config = presets.get_model_config("tiny")
    for field, value, message in [
        ("dtype", "float16", "dtype"),
        ("num_heads", 3, "num_heads"),
        ("num_output_groups", (6, 4, 4), "stage 1 has group tokens"),
        ("depths", (2, 1), "one entry per stage"),
    ]:
        bad = config.copy_and_resolve_references()
        bad[field] = value
        with pytest.raises(ValueError, match=message):
            groupvit.validate_config(bad)


def test_text_longer_than_the_context_is_refused(tiny):
    config, model, variables, *_ = tiny
    with pytest.raises(ValueError, match="L <= 16"):
        model.apply(variables, np.ones((1, 17), np.int32), method=groupvit.GroupViT.encode_text)
