r"""Train-step throughput of GroupViT and MixReorg (and of PyTorch's GroupViT), one JSON line.

  python -m mixreorg_jax.benchmark --config configs/mixreorg.py:tiny
  python -m mixreorg_jax.benchmark --config configs/mixreorg.py:demo --against=pytorch
  python -m mixreorg_jax.benchmark --config configs/mixreorg.py:paper --memory_only \
      --config.data.batch_size=128 --config.model.dtype=bfloat16
  python -m mixreorg_jax.benchmark --config configs/mixreorg.py:paper --topology=v5e:2x2 \
      --config.data.batch_size=512 --config.model.dtype=bfloat16  # 128 per chip

The step is the trainer's own jitted update (`train_step.make_update_fn`) on random data of the
config's shapes, so the data pipeline is not timed. `groupvit` is the same config with mixing off;
`mixreorg` with it on. `--against=pytorch` also times `transformers.GroupViTModel` (image-text
contrastive loss, AdamW) at the same sizes, batch and thread count, against our GroupViT step
with the same loss (multi-label off), and reports ours / PyTorch. `--memory_only` compiles without
running and reports XLA's per-device memory analysis of each step (on CPU with XLA's
memory-minimising scheduler, as accelerators schedule), and the bytes its forward pass saves for
the backward pass (what rematerialisation shrinks). `--topology` compiles the step ahead of time
with XLA's TPU compiler (`pip install libtpu`; no TPU needed) for a slice such as `v5e:2x2` (16 GiB
of HBM per chip) and reports that compiler's memory analysis instead of the CPU's estimate.
"""

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mixreorg_jax import cli
from mixreorg_jax.models import groupvit
from mixreorg_jax.training import objective, sharding
from mixreorg_jax.training import step as train_step


def define_flags():
    """The command line's flags; defined only when run as a program, so that importing this
    module (the tests do) leaves the global flags to the trainer's and the other programs'."""
    config_flags.DEFINE_config_file("config", None, "Train config (`path.py:variant`).")
    flags.DEFINE_integer("steps", 10, "Timed steps per variant.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
    flags.DEFINE_enum("against", None, ["pytorch"], "Also time this reference implementation.")
    flags.DEFINE_bool("memory_only", False, "Compile only; report the memory analysis.")
    flags.DEFINE_string(
        "topology",
        None,
        "Compile ahead of time for this TPU slice (e.g. "
        "`v5e:2x2`, 16 GiB per chip) and report its memory analysis; needs "
        "`pip install libtpu`, not the TPU. Implies --memory_only.",
    )
    flags.mark_flags_as_required(["config"])


def random_batch(
    config: ml_collections.ConfigDict, rng: np.random.Generator, batch_size: int | None = None
) -> dict:
    """A batch of the config's shapes (`batch_size` examples, default the config's)."""
    b = config.data.batch_size if batch_size is None else batch_size
    size, length = config.model.image_size, config.model.context_length
    tokens = rng.integers(1, 49405, (b, 3 + 1, length), dtype=np.int32)
    tokens[..., 0], tokens[..., -1] = 49406, 49407  # SOT ... EOT
    return {
        "image": rng.standard_normal((b, size, size, 3), dtype=np.float32),
        "tokens": tokens[:, 0],
        "prompt_tokens": tokens[:, 1:],
        "prompt_ids": rng.integers(0, 1000, (b, 3), dtype=np.int32),
    }


def build_step(config: ml_collections.ConfigDict, devices=None):
    """(update_fn, init_fn, abstract state, state shardings, global batch, mesh) for `config`.

    On `devices` (default all), e.g. those of a TPU topology compiled for ahead of time, the
    batch is shapes only.
    """
    mesh = sharding.make_mesh(config.mesh, devices)
    # The trainer's own set-up, on a 1000-step schedule (the step does not depend on its length).
    built = train_step.build(config, mesh, total_steps=1000, warmup_steps=10)
    if devices is None:
        batch = sharding.global_batch(random_batch(config, np.random.default_rng(0)), mesh)
    else:
        batch = {
            k: jax.ShapeDtypeStruct(
                (config.data.batch_size,) + v.shape[1:],
                v.dtype,
                sharding=sharding.batch_sharding(mesh),
            )
            for k, v in random_batch(config, np.random.default_rng(0), 1).items()
        }
    return built.update, built.init, built.abstract_state, built.state_sharding, batch, mesh


def saved_for_backward_bytes(config: ml_collections.ConfigDict, abstract_state, batch) -> int:
    """Bytes of what the loss's forward pass keeps for its backward pass (whole batch).

    The residuals of `jax.vjp(loss)`, taken from the traced program, so they do not depend on a
    backend's scheduler: this is what `config.model.remat` shrinks. Divide by the number of
    batch shards for a per-device figure.
    """
    model = groupvit.GroupViT(config.model)
    loss = lambda params, stats, batch: objective.loss_fn(
        params, stats, batch, jax.random.key(0), model=model, config=config
    )[0]
    residuals = jax.eval_shape(
        lambda params, stats, batch: jax.vjp(lambda p: loss(p, stats, batch), params)[1],
        abstract_state["params"],
        abstract_state["batch_stats"],
        batch,
    )
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(residuals))


def memory_analysis(config: ml_collections.ConfigDict, devices=None) -> dict:
    """XLA's per-device memory numbers (bytes) of the compiled update step on `devices`
    (default all), and the bytes saved for the backward pass."""
    update, _, abstract, _, batch, mesh = build_step(config, devices)
    with jax.set_mesh(mesh):
        compiled = update.lower(abstract, batch).compile()
        saved = saved_for_backward_bytes(config, abstract, batch)
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return {
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "peak_bytes_per_device": peak,
        "peak_gib_per_device": round(peak / 2**30, 3),
        "saved_for_backward_bytes": saved,
        "saved_for_backward_gib": round(saved / 2**30, 3),
    }


def time_ours(config: ml_collections.ConfigDict, steps: int, warmup: int) -> dict:
    update, init, _, shardings, batch, mesh = build_step(config)
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
        t0 = time.perf_counter()
        state, metrics = update(state, batch)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            state, metrics = update(state, batch)
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = update(state, batch)
        jax.block_until_ready((state, metrics))
        seconds = time.perf_counter() - t0
    return {
        "images_per_sec": steps * config.data.batch_size / seconds,
        "step_ms": 1000 * seconds / steps,
        "compile_s": compile_s,
        "loss": float(metrics["total"]),
    }


def time_pytorch(config: ml_collections.ConfigDict, steps: int, warmup: int) -> dict:
    """`transformers.GroupViTModel` train step: contrastive loss, AdamW, same sizes and threads."""
    import torch
    import transformers

    from mixreorg_jax.formats import huggingface

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    hf_config = transformers.GroupViTConfig(**huggingface.model_config_to_hf_config(config.model))
    model = transformers.GroupViTModel(hf_config).train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=config.optim.lr,
        betas=(config.optim.b1, config.optim.b2),
        eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
    )
    batch = random_batch(config, np.random.default_rng(0))
    pixels = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
    ids = torch.from_numpy(batch["tokens"]).long()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        opt.step()
        return loss

    for _ in range(warmup + 1):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    seconds = time.perf_counter() - t0
    return {
        "images_per_sec": steps * config.data.batch_size / seconds,
        "step_ms": 1000 * seconds / steps,
        "loss": loss.item(),
        "threads": torch.get_num_threads(),
    }


def variant(config: ml_collections.ConfigDict, *, mix: bool, like_pytorch: bool = False):
    """The config with mixing on or off; `like_pytorch`: only what HF's GroupViT step does
    (contrastive loss, no multi-label loss, no drop-path)."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.mix.enabled = mix
        c.loss.restore = c.loss.restore if mix else 0.0
        c.loss.mixseg = c.loss.mixseg if mix else 0.0
        if like_pytorch:
            c.loss.multi_label = 0.0
            c.model.drop_path_rate = 0.0
    return c


_MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def main(argv):
    del argv
    if flags.FLAGS.memory_only and "concurrency_optimized_scheduler" not in os.environ.get(
        "XLA_FLAGS", ""
    ):
        # XLA CPU orders a step for parallelism by default, which keeps rematerialised
        # activations alive and hides what remat saves; accelerators order it for memory. Read
        # when the backend starts, so it must be set before the first use of a device.
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_MEMORY_SCHEDULER_FLAG}"
    config = flags.FLAGS.config
    devices = None
    if flags.FLAGS.topology:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(flags.FLAGS.topology, "tpu").devices
    if config.loss.restore == 0 and config.loss.mixseg == 0:
        with config.unlocked():  # A GroupViT config: time MixReorg with the default weights.
            config.loss.restore = config.loss.mixseg = 1.0
    shown = devices or jax.devices()
    result = {
        "config": config_flags.get_config_filename(flags.FLAGS["config"]),
        "batch_size": config.data.batch_size,
        "image_size": config.model.image_size,
        "dtype": config.model.dtype,
        "devices": len(shown),
        "platform": shown[0].platform,
    }
    if flags.FLAGS.topology:
        result["topology"] = flags.FLAGS.topology
    groupvit_config, mixreorg_config = variant(config, mix=False), variant(config, mix=True)
    if flags.FLAGS.memory_only or devices:
        result["groupvit_memory"] = memory_analysis(groupvit_config, devices)
        result["mixreorg_memory"] = memory_analysis(mixreorg_config, devices)
        print(json.dumps(result))
        return
    steps, warmup = flags.FLAGS.steps, flags.FLAGS.warmup
    result["groupvit"] = time_ours(groupvit_config, steps, warmup)
    result["mixreorg"] = time_ours(mixreorg_config, steps, warmup)
    result["mixreorg_step_over_groupvit_step"] = (
        result["groupvit"]["images_per_sec"] / result["mixreorg"]["images_per_sec"]
    )
    if flags.FLAGS.against == "pytorch":
        ours = time_ours(variant(config, mix=False, like_pytorch=True), steps, warmup)
        theirs = time_pytorch(config, steps, warmup)
        result["groupvit_contrastive_only"] = ours
        result["pytorch"] = theirs
        result["ours_over_pytorch"] = ours["images_per_sec"] / theirs["images_per_sec"]
    print(json.dumps(result))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
