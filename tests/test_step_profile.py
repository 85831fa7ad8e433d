"""The step profile by kind (training/step_profile.py): the HLO is read right, each kind is
told by what computes it, and both sides' profiles of a real step name every kind they ran."""

import json
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import pytest

from mixreorg_jax import benchmark
from mixreorg_jax.models import groupvit
from mixreorg_jax.training import config as train_config
from mixreorg_jax.training import step_profile

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(dtype="float32"):
    config = train_config.from_file(f"{REPO}/configs/mixreorg.py:tiny")
    config.data.batch_size = 8
    config.model.dtype = dtype
    return benchmark.variant(config, mix=False, like_pytorch=True)


def test_hlo_instructions_carry_op_names_and_the_opcodes_fused_inside():
    f = jax.jit(lambda x, w: jax.nn.relu(x @ w).sum() + jnp.sum(x.T * 2.0))
    x = jnp.ones((8, 16))
    text = f.lower(x, jnp.ones((16, 4))).compile().as_text()
    instructions = step_profile.hlo_instructions(text)
    assert any("dot" in codes for _, codes in instructions.values())
    assert any(op.endswith("dot_general") for op, _ in instructions.values())
    fusions = [codes for name, (_, codes) in instructions.items() if "fusion" in name]
    assert fusions and all(len(codes) > 1 for codes in fusions)  # the body's opcodes too


@pytest.mark.parametrize(
    "op_name, opcodes, kind",
    [
        ("jit(update_fn)/mul", {"multiply"}, "optimiser"),
        ("jit(f)/jvp(GroupViT)/blocks_0/mlp/fc1/dot_general", {"fusion", "dot"}, "matmul"),
        ("jit(f)/jvp(GroupViT)/blocks_0/attn/reduce_max", {"fusion", "dot", "reduce"}, "matmul"),
        ("jit(f)/jvp(GroupViT)/blocks_0/mlp/erf", {"fusion", "erf", "multiply"}, "gelu"),
        ("jit(f)/transpose(jvp(GroupViT))/blocks_0/mlp/mul", {"multiply"}, "gelu"),
        ("jit(f)/jvp(GroupViT)/blocks_0/mlp/fc1/add", {"add"}, "other"),  # the bias
        ("jit(f)/jvp(GroupViT)/blocks_0/norm1/mul", {"multiply"}, "layernorm"),
        ("jit(f)/jvp(GroupViT)/grouping/norm_post_tokens/reduce_sum", {"reduce"}, "layernorm"),
        ("jit(f)/jvp(GroupViT)/projector/bn/mul", {"multiply"}, "other"),
        ("jit(f)/jvp(GroupViT)/blocks_0/attn/div", {"fusion", "divide"}, "softmax and masking"),
        ("jit(f)/jvp(GroupViT)/assign/jit(_gumbel)/jit(_uniform)/add", {"add"}, "grouping"),
        ("jit(f)/jvp(GroupViT)/assign/jit(_one_hot)/eq", {"compare"}, "grouping"),
        (
            "jit(f)/jvp(GroupViT)/attn/reshape",
            {"fusion", "copy", "transpose", "add"},
            "layout copies",
        ),
        ("jit(f)/jvp(GroupViT)/blocks_2/add", {"fusion", "add", "broadcast"}, "other"),
    ],
)
def test_our_kinds(op_name, opcodes, kind):
    assert step_profile.our_kind(op_name, opcodes) == kind


def test_an_async_thunk_counts_until_its_end_event():
    """An Eigen dot's event spans its launch; its work runs until its `end:` event. Two steps'
    thunks of the same names pair each with its own end; overlapping time is split evenly."""

    def thunk(name, ts, dur):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur, "args": {"hlo_op": name}}

    def end(name, ts):
        return {"ph": "X", "name": f"end: {name}", "ts": ts, "dur": 0, "args": {}}

    step = lambda t: [
        thunk("dot.1", t, 1), thunk("fusion.2", t + 1, 9), end("fusion.2", t + 10),
        end("dot.1", t + 20), thunk("copy.3", t + 20, 10), end("copy.3", t + 30),
    ]  # fmt: skip
    events = step(0) + step(100)
    assert step_profile.thunk_intervals(events)[:3] == [
        ("dot.1", 0, 20),
        ("fusion.2", 1, 10),
        ("copy.3", 20, 30),
    ]
    instructions = {
        "dot.1": ("jit(f)/jvp(M)/dense/dot_general", {"dot"}),
        "fusion.2": ("jit(f)/jvp(M)/mlp/erf", {"erf", "multiply"}),
        "copy.3": ("jit(f)/jvp(M)/attn/transpose", {"copy"}),
    }
    profile = step_profile.sum_by_kind(events, instructions, steps=2)
    ms = lambda us: us / 1000
    assert profile["matmul"] == pytest.approx(ms(1 + 9 / 2 + 10))
    assert profile["gelu"] == pytest.approx(ms(9 / 2))
    assert profile["layout copies"] == pytest.approx(ms(10))
    assert sum(profile.values()) == pytest.approx(ms(30))


@pytest.mark.parametrize(
    "name, ancestors, kind",
    [
        ("aten::addmm", ["aten::linear"], "matmul"),
        ("aten::bmm", [], "matmul"),
        ("aten::mul", ["optimiser"], "optimiser"),
        ("aten::_foreach_add_", ["Optimizer.step#AdamW.step", "optimiser"], "optimiser"),
        ("aten::gelu_backward", [], "gelu"),
        ("aten::_softmax", ["aten::softmax"], "softmax and masking"),
        ("aten::native_layer_norm_backward", [], "layernorm"),
        ("aten::exponential_", [], "grouping"),
        ("aten::copy_", ["aten::contiguous"], "layout copies"),
        ("aten::add", [], "other"),
    ],
)
def test_torch_kinds(name, ancestors, kind):
    assert step_profile.torch_kind(name, ancestors) == kind


def test_our_profile_of_a_grouping_block_names_what_it_computes():
    """Forward and backward of the first grouping block (cheaper to compile than a step: the
    kinds of the step that are not in it, the optimiser's, are told by `jvp(` alone)."""
    model = tiny_config().model
    tokens, groups = jnp.ones((2, 64, model.width)), jnp.ones((2, 8, model.width))
    block = groupvit.GroupingBlock(model, model.num_output_groups[0])
    rngs = {"params": jax.random.key(0), "gumbel": jax.random.key(1)}
    params = block.init(rngs, tokens, groups, True)

    def loss(params, tokens, groups):
        out = block.apply(params, tokens, groups, True, rngs={"gumbel": jax.random.key(1)})[0]
        return jnp.sum(out)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(params, tokens, groups).compile()
    run = lambda: jax.block_until_ready(grad(params, tokens, groups))
    profile = step_profile.our_profile(run, 2, grad.as_text())
    assert set(profile) == set(step_profile.KINDS) and profile["optimiser"] == 0
    for kind in ("matmul", "gelu", "layernorm", "softmax and masking", "grouping"):
        assert profile[kind] > 0, (kind, profile)


def test_pytorch_tiny_step_profile_names_what_it_computes():
    import torch

    threads = torch.get_num_threads()
    try:
        timed = benchmark.time_pytorch(tiny_config(), steps=1, warmup=0, threads=1, profile=True)
    finally:
        torch.set_num_threads(threads)
    profile = timed["profile_ms"]
    assert set(profile) == set(step_profile.KINDS)
    for kind in ("matmul", "gelu", "layernorm", "softmax and masking", "optimiser", "grouping"):
        assert profile[kind] > 0, (kind, profile)


def test_against_pytorch_profile_adds_a_table_per_dtype(monkeypatch):
    def fake_run(command, **kwargs):
        side = next(a.split("=")[1] for a in command if a.startswith("--side="))
        line = {"images_per_sec": 1.0, "side": side}
        if "--profile" in command:
            line["profile_ms"] = dict.fromkeys(step_profile.KINDS, 2.0 if side == "ours" else 4.0)
        return subprocess.CompletedProcess(command, 0, stdout=json.dumps(line), stderr="")

    monkeypatch.setattr(benchmark.subprocess, "run", fake_run)
    comparison = benchmark.compare_with_pytorch(
        ["--config=c.py:tiny"], ["float32"], 1, 2, 1, 0, "step", profile=True
    )
    assert comparison["float32"]["profile_ms"]["pytorch"]["gelu"] == 4.0
    result = {"cpu": benchmark.cpu_info(), "threads": 2, "batch_size": 4, "image_size": 32}
    table = benchmark.comparison_table(result | {"rounds": 1, "comparison": {"step": comparison}})
    assert "| gelu | 2 | 4 | 0.50 |" in table and "| total | 16 | 32 | 0.50 |" in table
