r"""Train-step throughput of GroupViT and MixReorg (and of PyTorch's GroupViT), one JSON line.

  python -m mixreorg_jax.benchmark --config configs/mixreorg.py:tiny
  python -m mixreorg_jax.benchmark --config configs/mixreorg.py:demo --against=pytorch
  python -m mixreorg_jax.benchmark --config configs/mixreorg.py:paper --memory_only \
      --config.data.batch_size=128 --config.model.dtype=bfloat16
  python -m mixreorg_jax.benchmark --config configs/mixreorg.py:paper --topology=v5e:2x2 \
      --config.data.batch_size=512 --config.model.dtype=bfloat16  # 128 per chip
  python -m mixreorg_jax.benchmark --config configs/mixreorg.py:paper --topology v4-64

The step is the trainer's own jitted update (`train_step.make_update_fn`) on random data of the
config's shapes, so the data pipeline is not timed. `groupvit` is the same config with mixing off;
`mixreorg` with it on. `--memory_only` compiles without
running and reports XLA's per-device memory analysis of each step (on CPU with XLA's
memory-minimising scheduler, as accelerators schedule), and the bytes its forward pass saves for
the backward pass (what rematerialisation shrinks).

`--topology` compiles the step ahead of time with XLA's TPU compiler (libtpu, the version
`jax[tpu]` pins: `pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"`; no
TPU needed) for a Cloud TPU slice, named as Cloud names it (`v4-64`: 64 TensorCores = 32 chips,
`v5litepod-16`, `v6e-8`) or as libtpu does (`v5e:2x2`, `v4:2x4x4`), data-parallel over all its
chips as the trainer lays the step out. It reports that compiler's per-chip memory analysis
against the chip's HBM, the step's FLOPs from its cost analysis, and what the step would take at
`--mfu` of the chip's peak bf16 rate: its time and the chip-hours of the config's epochs of
`--train_samples` examples (NVlabs' GroupViT, for scale: 16 V100 for 2 days). The JSON line is
followed by the same numbers as a markdown table.

`--against=pytorch` compares our GroupViT step with `transformers.GroupViTModel`'s (image-text
contrastive loss, AdamW, clipping; ours with the same loss: multi-label off, no drop-path) at the
config's sizes and batch, fairly: each side timed in a fresh process of its own (a library timed
after another in one process runs slower), the sides alternating over `--rounds`, both pinned to
the same `--threads` cores, in fp32 on both sides and in bf16 (ours computing in bf16, PyTorch
under `torch.autocast("cpu", torch.bfloat16)`). It reports each side's median and range, the
ratio of the medians per dtype, and the CPU (model and its bf16/AMX features): numbers of
different CPUs are not comparable.
"""

import contextlib
import glob
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from mixreorg_jax import cli, trainer
from mixreorg_jax.models import groupvit
from mixreorg_jax.ops import mixed_precision
from mixreorg_jax.training import objective, sharding, step_profile
from mixreorg_jax.training import step as train_step

VARIANTS = ("groupvit", "mixreorg")
SIDES = ("ours", "pytorch")
# What --against times: the train step, or a bare piece of it at the model's first-stage shapes
# (`time_piece`): the MLP's first matmul [B*N, C] x [C, 4C] forward (ours as our dense layers
# multiply, `ops/mixed_precision.py`), one transformer block forward and backward over
# [B, N + G, C] (image and group tokens), its multi-head attention alone (projections
# included), one grouping block forward and backward ([B, N, C] tokens, [B, G, C] group tokens),
# and two elementwise kinds forward and backward on inputs in the compute dtype: the vision MLP's
# erf GELU over [B, N + G, 4C] and a LayerNorm over [B, N + G, C].
PIECES = ("step", "matmul", "block", "attention", "grouping", "gelu", "layernorm")
ELEMENTWISE_PIECES = ("gelu", "layernorm")  # fed in the compute dtype, as in the model
DTYPES = ("float32", "bfloat16")
# The CPU features that decide fp32 and bf16 matmul speed.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def define_flags():
    """The command line's flags; defined only when run as a program, so that importing this
    module (the tests do) leaves the global flags to the trainer's and the other programs'."""
    config_flags.DEFINE_config_file("config", None, "Train config (`path.py:variant`).")
    flags.DEFINE_integer("steps", 10, "Timed steps per variant.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
    flags.DEFINE_enum(
        "against", None, ["pytorch"], "Compare with this implementation (module docstring)."
    )
    flags.DEFINE_integer("rounds", 3, "--against: rounds of fresh processes, sides alternating.")
    flags.DEFINE_list("dtypes", list(DTYPES), "--against: the compute dtypes to compare in.")
    flags.DEFINE_integer(
        "threads", os.cpu_count(), "--against: cores each side runs on (and its thread count)."
    )
    flags.DEFINE_enum(
        "side", None, list(SIDES), "Time one side of --against in this process (used by it)."
    )
    flags.DEFINE_list(
        "pieces", ["step"], f"--against: what to compare, of {', '.join(PIECES)} (PIECES)."
    )
    flags.DEFINE_bool(
        "profile",
        False,
        "--against (the step): also profile each side's step once more and sum its time by "
        "kind (matmul, softmax, GELU, LayerNorm, grouping, optimiser, copies; "
        "training/step_profile.py).",
    )
    flags.DEFINE_bool(
        "huge_pages",
        True,
        "--against: run both sides with glibc's malloc in transparent huge pages "
        "(GLIBC_TUNABLES=glibc.malloc.hugetlb=1, `cli.with_huge_pages`); --nohuge_pages: as the "
        "environment has it.",
    )
    flags.DEFINE_bool("memory_only", False, "Compile only; report the memory analysis.")
    flags.DEFINE_string(
        "topology",
        None,
        "Compile ahead of time for this TPU slice (`v4-64`, `v5litepod-16`, `v5e:2x2`, "
        "`v4:2x4x4`) and report its memory analysis, FLOPs and projected training time; "
        "needs libtpu (`jax[tpu]`), not the TPU. Implies --memory_only.",
    )
    flags.DEFINE_list(
        "variants", list(VARIANTS), f"Which of {', '.join(VARIANTS)} to compile or time."
    )
    flags.DEFINE_float("mfu", 0.4, "--topology: model FLOPs utilisation the projection assumes.")
    flags.DEFINE_integer(
        "train_samples",
        10_000_000,
        "--topology: examples in an epoch (CC12M: ~10.0M of its 12.4M image-text pairs can "
        "still be downloaded).",
    )
    flags.DEFINE_float(
        "epochs",
        None,
        "--topology: epochs of --train_samples to project (default the config's total_epochs; "
        "its total_steps when that is 0).",
    )
    flags.DEFINE_string("output", None, "Also write the JSON object to this file.")
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


def compile_step(config: ml_collections.ConfigDict, devices=None):
    """(compiled update step, seconds to trace and lower it, seconds to compile it, bytes saved
    for the backward pass) on `devices` (default all)."""
    update, _, abstract, _, batch, mesh = build_step(config, devices)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = update.trace(abstract, batch).lower()
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        saved = saved_for_backward_bytes(config, abstract, batch)
    return compiled, t1 - t0, t2 - t1, saved


def memory_report(compiled, saved: int) -> dict:
    """XLA's per-device memory numbers (bytes) of a compiled step.

    `peak_bytes_per_device`: arguments, outputs and temporaries, less the outputs that reuse the
    (donated) arguments' buffers; `total_bytes_per_device` adds the generated code.
    """
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    total = peak + m.generated_code_size_in_bytes
    return {
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "generated_code_bytes": m.generated_code_size_in_bytes,
        "peak_bytes_per_device": peak,
        "peak_gib_per_device": round(peak / 2**30, 3),
        "total_bytes_per_device": total,
        "total_gib_per_device": round(total / 2**30, 3),
        "saved_for_backward_bytes": saved,
        "saved_for_backward_gib": round(saved / 2**30, 3),
    }


def memory_analysis(config: ml_collections.ConfigDict, devices=None) -> dict:
    """XLA's per-device memory numbers (bytes) of the compiled update step on `devices`
    (default all), and the bytes saved for the backward pass."""
    compiled, _, _, saved = compile_step(config, devices)
    return memory_report(compiled, saved)


class TpuChip(NamedTuple):
    """A Cloud TPU generation, as `--topology` names, lays out and rates it."""

    cloud_name: str  # of its accelerator types (`v5litepod-16`)
    dims: int  # of its slices' chip grid
    counts_cores: bool  # an accelerator type counts TensorCores (2 a chip: v4-64 = 32 chips)
    chip_config: str | None  # libtpu's chip config that makes a chip's TensorCores one device
    peak_bf16_flops: float  # dense, per chip
    hbm_bytes: int  # per chip


# Cloud TPU's documented figures per chip; keyed by libtpu's name of the generation.
TPU_CHIPS = {
    "v4": TpuChip("v4", 3, True, "megacore", 275e12, 32 * 2**30),
    "v5p": TpuChip("v5p", 3, True, "megachip_tccontrol", 459e12, 95 * 2**30),
    "v5e": TpuChip("v5litepod", 2, False, None, 197e12, 16 * 2**30),
    "v6e": TpuChip("v6e", 2, False, None, 918e12, 32 * 2**30),
}
# The chip grids of the single-slice accelerator types Cloud TPU offers, by number of chips.
SLICE_SHAPES = {
    3: {
        n: shape
        for shape in [(2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8)]
        + [(4, 8, 8), (8, 8, 8), (8, 8, 16), (8, 16, 16), (16, 16, 16)]
        for n in [math.prod(shape)]
    },
    2: {
        n: shape
        for shape in [(1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)]
        for n in [math.prod(shape)]
    },
}
_SLICE_EXAMPLES = "`v4-64`, `v5p-128`, `v5litepod-16` (or `v5e-16`), `v6e-8`, `v5e:2x2`, `v4:2x4x4`"

# NVlabs' GroupViT for scale (its README: "16 NVIDIA V100 GPUs for pre-training (in 2 days)"),
# 30 epochs of GCC3M + GCC12M + YFCC14M (the lengths its configs/default.yml gives).
NVLABS_GROUPVIT = {
    "gpus": "16 V100",
    "gpu_hours": 16 * 2 * 24,
    "epochs": 30,
    "examples_per_epoch": 2_891_445 + 11_156_203 + 14_615_499,
}


def parse_slice(name: str) -> tuple[TpuChip, str, tuple[int, ...]]:
    """(generation, libtpu's topology name, chip grid) of a slice named as Cloud TPU names its
    accelerator types (`v4-64`) or as libtpu names topologies (`v4:2x4x4`)."""
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)([-:])([0-9x]+)", name.strip())
    if match is None:
        raise ValueError(f"unknown TPU slice {name!r}; try {_SLICE_EXAMPLES}")
    generation, separator, size = match.groups()
    generation = "v5e" if generation == "v5litepod" else generation
    chip = TPU_CHIPS[generation]
    if separator == "-":
        shapes = SLICE_SHAPES[chip.dims]
        per_chip = 2 if chip.counts_cores else 1
        count = int(size) if size.isdigit() else 0
        if count % per_chip or count // per_chip not in shapes:
            known = ", ".join(f"{chip.cloud_name}-{n * per_chip}" for n in shapes)
            unit = "TensorCores, 2 a chip" if chip.counts_cores else "chips"
            raise ValueError(f"no TPU slice {name!r} (it counts {unit}); known: {known}")
        shape = shapes[count // per_chip]
    else:
        shape = tuple(int(d) for d in size.split("x") if d)
        if len(shape) != chip.dims or min(shape) < 1 or size.count("x") != chip.dims - 1:
            grid = "x".join("N" * chip.dims)
            raise ValueError(f"TPU slice {name!r}: a {generation} topology is {generation}:{grid}")
    return chip, f"{generation}:{'x'.join(map(str, shape))}", shape


@contextlib.contextmanager
def _compile_only_libtpu_init(accelerator_type: str):
    """Starts libtpu for compiling only, where no TPU is attached.

    libtpu looks for the TPU VM's accelerator type and worker hosts, and writes its failure to
    find them to stderr: these variables say what it looks for (compiling for a topology does
    not read them). It also locks /tmp/libtpu_lockfile, so that one process at a time drives the
    TPUs; there are none to share, so other compiling processes (a test beside a benchmark) may
    start it too.
    """
    settings = {
        "TPU_ACCELERATOR_TYPE": accelerator_type,
        "TPU_WORKER_HOSTNAMES": "localhost",
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    }
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or any(map(os.getenv, settings)):
        yield  # A TPU VM, or the caller's own settings: leave them.
        return
    os.environ.update(settings)
    try:
        yield
    finally:
        for name in settings:
            os.environ.pop(name, None)


def libtpu_installed() -> bool:
    return bool(os.getenv("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None


def tpu_slice(name: str) -> tuple[TpuChip, str, list]:
    """(generation, accelerator type, compile-only devices, one a chip) of a TPU slice."""
    chip, topology_name, shape = parse_slice(name)
    chips = math.prod(shape)
    accelerator_type = f"{chip.cloud_name}-{chips * (2 if chip.counts_cores else 1)}"
    if not libtpu_installed():
        raise ValueError(
            f"--topology needs libtpu, XLA's TPU compiler (no TPU): pip install "
            f'"jax[tpu]=={jax.__version__}" installs the libtpu this jax pins'
        )
    from jax.experimental import topologies

    kwargs = {"chip_config_name": chip.chip_config} if chip.chip_config else {}
    if chips < 4:  # Less than libtpu's default host of 2x2 chips: the slice is the host.
        kwargs["chips_per_host_bounds"] = shape + (1,) * (3 - len(shape))
    try:
        with _compile_only_libtpu_init(accelerator_type):
            devices = topologies.get_topology_desc(topology_name, "tpu", **kwargs).devices
    except RuntimeError as e:  # libtpu's JaxRuntimeError: an impossible grid, a bad config
        also = f" ({topology_name})" if topology_name != name else ""
        raise ValueError(f"TPU slice {name!r}{also}: {cli.one_line(e)}") from None
    if len(devices) != chips:
        raise ValueError(f"TPU slice {name!r}: libtpu made {len(devices)} devices of {chips} chips")
    return chip, accelerator_type, list(devices)


def train_steps(config: ml_collections.ConfigDict, train_samples: int, epochs: float | None):
    """(epochs, steps) of a run: `epochs` (default the config's) of `train_samples` examples, the
    trainer's rule (`trainer.train_steps`; the config's total_steps when it counts no epochs)."""
    run = ml_collections.ConfigDict(config.to_dict())
    if epochs is not None:
        run.total_epochs = epochs
    return float(run.total_epochs), trainer.train_steps(run, train_samples)[0]


def topology_report(
    config: ml_collections.ConfigDict,
    topology: str,
    *,
    variants=VARIANTS,
    mfu: float = 0.4,
    train_samples: int = 10_000_000,
    epochs: float | None = None,
) -> dict:
    """The train step compiled ahead of time for a TPU slice, data-parallel over its chips.

    For each of `variants` (`variant(config, ...)`): XLA's per-chip memory analysis against the
    chip's HBM, and the FLOPs of a step from XLA's cost analysis, which counts one device's
    partition of the step (x chips: the step's). At `mfu` of the chips' peak bf16 rate a step
    takes flops / (chips x peak x mfu); a run of `train_steps(...)` steps the chip-hours
    steps x step time x chips / 3600.
    """
    chip, accelerator_type, devices = tpu_slice(topology)
    chips, batch = len(devices), config.data.batch_size
    epochs, steps = train_steps(config, train_samples, epochs)
    examples = steps * batch
    nvlabs = NVLABS_GROUPVIT
    nvlabs_examples = nvlabs["epochs"] * nvlabs["examples_per_epoch"]
    result = {
        "accelerator_type": accelerator_type,
        "chips": chips,
        "batch_size": batch,
        "device_kind": devices[0].device_kind,
        "batch_per_chip": batch / chips,
        "hbm_gib_per_chip": chip.hbm_bytes / 2**30,
        "peak_bf16_tflops_per_chip": chip.peak_bf16_flops / 1e12,
        "mfu": mfu,
        "train_samples": train_samples,
        "epochs": epochs,
        "train_steps": steps,
        "flops_source": "compiled.cost_analysis()['flops'] is per chip; x chips = per step",
        "nvlabs_groupvit": {
            **nvlabs,
            "examples": nvlabs_examples,
            "gpu_hours_for_these_examples": round(nvlabs["gpu_hours"] * examples / nvlabs_examples),
        },
    }
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        compiled, lower_s, compile_s, saved = compile_step(
            variant(config, mix=name == "mixreorg"), devices
        )
        memory = memory_report(compiled, saved)
        memory["fits_hbm"] = memory["total_bytes_per_device"] <= chip.hbm_bytes
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        flops = cost["flops"] * chips
        step_s = flops / (chips * chip.peak_bf16_flops * mfu)
        result[f"{name}_memory"] = memory
        result[f"{name}_step"] = {
            "flops_per_chip": cost["flops"],
            "flops": flops,
            "flops_per_example": flops / batch,
            "step_s": step_s,
            "examples_per_s": batch / step_s,
            "chip_hours": steps * step_s * chips / 3600,
            "slice_days": steps * step_s / 86400,
            "lower_s": round(lower_s, 1),
            "compile_s": round(compile_s, 1),
        }
    return result


def markdown_table(result: dict) -> str:
    """The numbers of `topology_report` as a markdown table, a row per variant."""
    chips, kind = result["chips"], result["accelerator_type"]
    hbm, mfu = result["hbm_gib_per_chip"], result["mfu"]
    rows = [
        f"| {kind} ({chips} chips), batch {result['batch_size']} "
        f"| per-chip memory (of {hbm:g} GiB HBM) | TFLOPs per step "
        f"| step at {mfu:.0%} MFU | chip-hours, {result['train_steps']} steps "
        f"({result['epochs']:g} epochs of {result['train_samples'] / 1e6:g}M) | compile |",
        "|---|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        if f"{name}_step" not in result:
            continue
        memory, step = result[f"{name}_memory"], result[f"{name}_step"]
        fits = "fits" if memory["fits_hbm"] else "does NOT fit"
        rows.append(
            f"| {name} | {memory['total_gib_per_device']:.2f} GiB ({fits}) "
            f"| {step['flops'] / 1e12:,.1f} | {step['step_s'] * 1e3:.1f} ms "
            f"| {step['chip_hours']:,.1f} ({step['slice_days'] * 24:.2f} h on the slice) "
            f"| {step['lower_s'] + step['compile_s']:.0f} s |"
        )
    nvlabs = result["nvlabs_groupvit"]
    rows.append(
        f"| NVlabs GroupViT ({nvlabs['gpus']}, {nvlabs['epochs']} epochs of "
        f"{nvlabs['examples_per_epoch'] / 1e6:.1f}M) | | | | {nvlabs['gpu_hours']} GPU-hours "
        f"({nvlabs['gpu_hours_for_these_examples']} for as many examples as above) | |"
    )
    return "\n".join(rows)


def time_ours(
    config: ml_collections.ConfigDict, steps: int, warmup: int, profile: bool = False
) -> dict:
    """Our step's throughput; `profile`: then also its milliseconds by kind over `steps` more
    steps (`step_profile.our_profile`)."""
    update, init, _, shardings, batch, mesh = build_step(config)
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
        t0 = time.perf_counter()
        update = update.lower(state, batch).compile()
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
        result = {
            "images_per_sec": steps * config.data.batch_size / seconds,
            "step_ms": 1000 * seconds / steps,
            "compile_s": compile_s,
            "loss": float(metrics["total"]),
        }
        if profile:
            holder = [state]

            def run():
                holder[0], out = update(holder[0], batch)
                jax.block_until_ready(out)

            result["profile_ms"] = step_profile.our_profile(run, steps, update.as_text())
    return result


def time_pytorch(
    config: ml_collections.ConfigDict,
    steps: int,
    warmup: int,
    threads: int | None = None,
    profile: bool = False,
) -> dict:
    """`transformers.GroupViTModel` train step: contrastive loss, AdamW, clipping, at the
    config's sizes; its forward under bf16 autocast when the config computes in bf16.
    `profile`: then also its milliseconds by kind over `steps` more steps
    (`step_profile.torch_profile`)."""
    import torch
    import transformers

    from mixreorg_jax.formats import huggingface

    torch.set_num_threads(threads or os.cpu_count())
    torch.manual_seed(0)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=config.model.dtype == "bfloat16")
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
        with autocast:
            loss = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        with torch.profiler.record_function(step_profile.OPTIMISER_RANGES[0]):
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            opt.step()
        return loss

    for _ in range(warmup + 1):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    seconds = time.perf_counter() - t0
    result = {
        "images_per_sec": steps * config.data.batch_size / seconds,
        "step_ms": 1000 * seconds / steps,
        "loss": loss.item(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if profile:
        result["profile_ms"] = step_profile.torch_profile(step, steps)
    return result


def cpu_info() -> dict:
    """The CPU's model name, logical CPUs and `CPU_FEATURES` (from /proc/cpuinfo on Linux)."""
    model, features = None, set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and model is None:
                model = value
            elif key == "flags":
                features = set(value.split())
                break
    return {
        "model": model or "unknown",
        "logical_cpus": os.cpu_count(),
        **{name: name in features for name in CPU_FEATURES},
    }


def time_side(
    config: ml_collections.ConfigDict,
    side: str,
    piece: str,
    steps: int,
    warmup: int,
    profile: bool = False,
) -> dict:
    """One side of `--against=pytorch` in this process, which is pinned to `--threads` cores
    before its first computation; the config as HF's step computes (`variant(like_pytorch)`).
    `profile` (the step only): also the step's milliseconds by kind."""
    threads = flags.FLAGS.threads
    cores = sorted(os.sched_getaffinity(0))
    if threads > len(cores):
        raise SystemExit(f"error: --threads={threads}, but this process may use {len(cores)} cores")
    os.sched_setaffinity(0, cores[:threads])
    config = variant(config, mix=False, like_pytorch=True)
    if piece != "step":
        result = time_piece(config, side, piece, steps, warmup, threads)
    elif side == "ours":
        result = time_ours(config, steps, warmup, profile)
    else:
        result = time_pytorch(config, steps, warmup, threads, profile)
    versions = {"jax": jax.__version__} if side == "ours" else {}
    described = {"side": side, "piece": piece, "dtype": config.model.dtype, "threads": threads}
    described["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    return result | versions | described


def time_piece(
    config: ml_collections.ConfigDict, side: str, piece: str, steps: int, warmup: int, threads
) -> dict:
    """Times one of `PIECES` (not the step) on `side`: ours jitted, PyTorch's eager (HF's
    `GroupViTEncoderLayer`, `GroupViTAttention` and `GroupViTTokenAssign`, `torch.nn.GELU` and
    `torch.nn.LayerNorm`, bf16 under autocast), at the model's first-stage shapes, with the
    config's batch and compute dtype."""
    m, batch = config.model, config.data.batch_size
    n, g, c = (m.image_size // m.patch_size) ** 2, m.num_group_tokens[0], m.width
    rng = np.random.default_rng(0)
    shapes = {
        "matmul": [(batch * n, c), (c, round(m.mlp_ratio * c))],
        "block": [(batch, n + g, c)],
        "attention": [(batch, n + g, c)],
        "grouping": [(batch, n, c), (batch, g, c)],
        "gelu": [(batch, n + g, round(m.mlp_ratio * c))],
        "layernorm": [(batch, n + g, c)],
    }[piece]
    inputs = [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]
    if side == "ours":
        call, sync = _our_piece(m, piece, inputs), jax.block_until_ready
    else:
        call, sync = _pytorch_piece(m, piece, inputs, threads), lambda out: out  # eager
    t0 = time.perf_counter()
    sync(call())
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        sync(call())
    t0 = time.perf_counter()
    for _ in range(steps):
        out = call()
    sync(out)
    seconds = (time.perf_counter() - t0) / steps
    return {"images_per_sec": batch / seconds, "call_ms": 1000 * seconds, "first_call_s": first_s}


def _our_piece(m: ml_collections.ConfigDict, piece: str, inputs: list[np.ndarray]):
    """A jitted call of our piece (`time_piece`); but for the matmul, the gradient of its
    output's sum with respect to parameters and inputs."""
    dtype = jnp.dtype(m.dtype)
    if piece == "matmul":  # as our dense layers multiply
        x, w = (jnp.asarray(a, dtype) for a in inputs)
        dims = (((1,), (0,)), ((), ()))
        matmul = jax.jit(lambda x, w: mixed_precision.dot_general(x, w, dims))
        return lambda: matmul(x, w)
    args = [jnp.asarray(a, dtype if piece in ELEMENTWISE_PIECES else None) for a in inputs]
    if piece == "gelu":
        params, apply = {}, lambda p, x: groupvit.exact_gelu(x)
    elif piece == "layernorm":
        module = nn.LayerNorm(m.layer_norm_eps, dtype=dtype)
        params = module.init(jax.random.key(0), *args)
        apply = module.apply
    elif piece == "block":
        hidden = round(m.mlp_ratio * m.width)
        module = groupvit.Block(m.num_heads, hidden, groupvit.exact_gelu, m.layer_norm_eps, dtype)
        params = module.init(jax.random.key(0), *args)
        apply = module.apply
    elif piece == "attention":
        module = groupvit.Attention(m.num_heads, dtype)
        params = module.init(jax.random.key(0), *args)
        apply = module.apply
    else:
        module = groupvit.GroupingBlock(m, m.num_output_groups[0])
        rngs = {"params": jax.random.key(0), "gumbel": jax.random.key(1)}
        params = module.init(rngs, *args, True)
        apply = lambda p, *a: module.apply(p, *a, True, rngs={"gumbel": jax.random.key(1)})[0]
    loss = lambda p, *a: jnp.sum(apply(p, *a).astype(jnp.float32))
    grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(args) + 1))))
    return lambda: grad(params, *args)


def _pytorch_piece(m: ml_collections.ConfigDict, piece: str, inputs: list[np.ndarray], threads):
    """HF's piece as one call (`time_piece`): forward (under bf16 autocast for bf16) and,
    but for the matmul, the backward of the output's sum."""
    import torch
    import transformers
    from transformers.models.groupvit import modeling_groupvit

    from mixreorg_jax.formats import huggingface

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    bf16 = m.dtype == "bfloat16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    if piece == "matmul":
        x, w = (torch.from_numpy(a).to(dtype) for a in inputs)
        return lambda: torch.matmul(x, w)
    args = [torch.from_numpy(a) for a in inputs]
    if piece in ELEMENTWISE_PIECES:  # HF's layers use these two modules
        eps = m.layer_norm_eps
        layer = torch.nn.GELU() if piece == "gelu" else torch.nn.LayerNorm(m.width, eps=eps)
        return _pytorch_call(layer, layer, [a.to(dtype).requires_grad_() for a in args], bf16)
    hf_config = transformers.GroupViTConfig(**huggingface.model_config_to_hf_config(m))
    vision = hf_config.vision_config
    if piece == "block":
        layer = modeling_groupvit.GroupViTEncoderLayer(vision)
        forward = lambda x: layer(x, None)
    elif piece == "attention":
        layer = modeling_groupvit.GroupViTAttention(vision)
        forward = lambda x: layer(x)[0]
    else:
        g = m.num_group_tokens[0]
        layer = modeling_groupvit.GroupViTTokenAssign(vision, g, m.num_output_groups[0])
        forward = lambda x, groups: layer(x, groups)[0]
    layer.train()
    return _pytorch_call(layer, forward, [a.requires_grad_() for a in args], bf16)


def _pytorch_call(layer, forward, args, bf16: bool):
    """One forward (bf16: under autocast) and the backward of its output's sum; returns the
    output and the inputs' gradients."""
    import torch

    def call():
        layer.zero_grad(set_to_none=True)
        for a in args:
            a.grad = None
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = forward(*args)
        out.float().sum().backward()
        return out, [a.grad for a in args]

    return call


def compare_with_pytorch(
    config_flags_args: list[str],
    dtypes,
    rounds: int,
    threads: int,
    steps: int,
    warmup: int,
    piece: str = "step",
    profile: bool = False,
    huge_pages: bool = True,
) -> dict:
    """Runs `time_side` in fresh processes: per round and dtype ours and PyTorch's, the order
    alternating between rounds, both in one environment (`huge_pages`: with
    `cli.with_huge_pages`). Returns per dtype each side's runs, median and range, and
    ours / PyTorch (of the medians); `profile`: and each side's step by kind (`profile_ms`),
    from one more process per side."""
    env = cli.with_huge_pages(os.environ) if huge_pages else dict(os.environ)

    def run_side(side: str, dtype: str, *extra: str) -> dict:
        command = [
            *(sys.executable, "-m", "mixreorg_jax.benchmark", *config_flags_args),
            f"--config.model.dtype={dtype}",
            *(f"--side={side}", f"--pieces={piece}", f"--threads={threads}"),
            *(f"--steps={steps}", f"--warmup={warmup}", *extra),
        ]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(
                f"error: the {side} {piece} {dtype} run failed:\n{done.stderr[-3000:]}"
            )
        return json.loads(done.stdout.strip().splitlines()[-1])

    runs = {(dtype, side): [] for dtype in dtypes for side in SIDES}
    for round_index in range(rounds):
        for dtype in dtypes:
            for side in SIDES if round_index % 2 == 0 else SIDES[::-1]:
                runs[dtype, side].append(run_side(side, dtype))
                print(
                    f"round {round_index + 1}/{rounds} {piece} {dtype} {side}: "
                    f"{runs[dtype, side][-1]['images_per_sec']:.2f} images/s",
                    file=sys.stderr,
                )
    result = {}
    for dtype in dtypes:
        per_side = {}
        for side in SIDES:
            rates = [run["images_per_sec"] for run in runs[dtype, side]]
            per_side[side] = {
                "images_per_sec_median": statistics.median(rates),
                "images_per_sec_min": min(rates),
                "images_per_sec_max": max(rates),
                "runs": runs[dtype, side],
            }
        per_side["ours_over_pytorch"] = (
            per_side["ours"]["images_per_sec_median"] / per_side["pytorch"]["images_per_sec_median"]
        )
        if profile:
            per_side["profile_ms"] = {
                side: run_side(side, dtype, "--profile")["profile_ms"] for side in SIDES
            }
        result[dtype] = per_side
    return result


def comparison_table(result: dict) -> str:
    """`compare_with_pytorch`'s medians as markdown rows, one per piece and dtype, naming the
    CPU."""
    cpu = result["cpu"]
    features = ", ".join(name for name in CPU_FEATURES if cpu[name]) or "none of note"
    rows = [
        f"{cpu['model']} ({features}), {result['threads']} threads, batch "
        f"{result['batch_size']}, {result['image_size']} px, {result['rounds']} rounds:",
        "",
        "| what | dtype | ours, images/s (median, range) | PyTorch, images/s (median, range) "
        "| ours / PyTorch |",
        "|---|---|---|---|---|",
    ]
    for piece, per_dtype in result["comparison"].items():
        for dtype, r in per_dtype.items():
            cells = [
                f"{r[side]['images_per_sec_median']:.2f} ({r[side]['images_per_sec_min']:.2f}-"
                f"{r[side]['images_per_sec_max']:.2f})"
                for side in SIDES
            ]
            rows.append(
                f"| {piece} | {dtype} | {cells[0]} | {cells[1]} | {r['ours_over_pytorch']:.2f} |"
            )
    for dtype, r in result["comparison"].get("step", {}).items():
        if "profile_ms" in r:
            profile = r["profile_ms"]
            rows += ["", f"The step in {dtype} by kind (one more run of each side):", ""]
            rows.append(step_profile.profile_table(profile["ours"], profile["pytorch"]))
    return "\n".join(rows)


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
    fl = flags.FLAGS
    config = fl.config
    if unknown := set(fl.variants) - set(VARIANTS):
        raise SystemExit(f"error: --variants: unknown {', '.join(sorted(unknown))}")
    if config.loss.restore == 0 and config.loss.mixseg == 0:
        with config.unlocked():  # A GroupViT config: time MixReorg with the default weights.
            config.loss.restore = config.loss.mixseg = 1.0
    result = {
        "config": config_flags.get_config_filename(fl["config"]),
        "batch_size": config.data.batch_size,
        "image_size": config.model.image_size,
        "dtype": config.model.dtype,
    }
    if fl.topology:
        if not os.getenv("JAX_PLATFORMS"):
            # The host only traces; without this the first use of a device also tries to open a
            # TPU, which libtpu, now installed, reports on stderr where there is none.
            with contextlib.suppress(RuntimeError):
                jax.config.update("jax_platforms", "cpu")
        result.update(platform="tpu", topology=fl.topology)
        try:
            result |= topology_report(
                config,
                fl.topology,
                variants=fl.variants,
                mfu=fl.mfu,
                train_samples=fl.train_samples,
                epochs=fl.epochs,
            )
        except ValueError as e:
            raise SystemExit(f"error: {cli.one_line(e)}") from None
        emit(result, fl.output)
        print()
        print(markdown_table(result))
        return
    if fl.side:
        (piece,) = fl.pieces
        timed = time_side(config, fl.side, piece, fl.steps, fl.warmup, fl.profile)
        emit(result | timed, fl.output)
        return
    if fl.against == "pytorch":
        if unknown := set(fl.dtypes) - set(DTYPES):
            raise SystemExit(f"error: --dtypes: unknown {', '.join(sorted(unknown))}")
        if unknown := set(fl.pieces) - set(PIECES):
            raise SystemExit(f"error: --pieces: unknown {', '.join(sorted(unknown))}")
        config_args = [f"--config={result['config']}"] + [
            f"--config.{name}={value}"
            for name, value in config_flags.get_override_values(fl["config"]).items()
        ]
        result |= {
            "cpu": cpu_info(),
            "threads": fl.threads,
            "rounds": fl.rounds,
            "dtypes": fl.dtypes,
            "steps": fl.steps,
            "huge_pages": fl.huge_pages,
            "comparison": {
                piece: compare_with_pytorch(
                    *(config_args, fl.dtypes, fl.rounds, fl.threads, fl.steps, fl.warmup),
                    piece,
                    fl.profile and piece == "step",
                    fl.huge_pages,
                )
                for piece in fl.pieces
            },
        }
        emit(result, fl.output)
        print()
        print(comparison_table(result))
        return
    result.update(devices=len(jax.devices()), platform=jax.devices()[0].platform)
    if result["platform"] == "cpu" and (hint := cli.huge_pages_hint()):
        logging.warning(hint)
    configs = {name: variant(config, mix=name == "mixreorg") for name in fl.variants}
    if fl.memory_only:
        for name, c in configs.items():
            result[f"{name}_memory"] = memory_analysis(c)
        emit(result, fl.output)
        return
    steps, warmup = fl.steps, fl.warmup
    for name, c in configs.items():
        result[name] = time_ours(c, steps, warmup)
    if len(configs) == 2:
        result["mixreorg_step_over_groupvit_step"] = (
            result["groupvit"]["images_per_sec"] / result["mixreorg"]["images_per_sec"]
        )
    emit(result, fl.output)


def emit(result: dict, output: str | None):
    """Prints the result as one JSON line, and writes it to `output` if given."""
    line = json.dumps(result)
    print(line)
    if output:
        with open(os.path.expanduser(output), "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
