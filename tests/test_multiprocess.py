"""Two real processes train together and match one process fed the same global batches.

Each process is `python -m mixreorg_jax.train` with its own 4 CPU devices (XLA_FLAGS), joined by
`jax.distributed` on 127.0.0.1 (gloo collectives), reading its own shard of the data. The
reference is `train_and_evaluate` in this process on 8 devices, its input pipeline replaced by
the two shards concatenated along the batch: process p's devices come p-th in the mesh, so
`jax.make_array_from_process_local_data` puts process p's rows p-th in the global batch.
"""

import socket
import subprocess
import sys

import grain
import numpy as np
from test_train import (
    REPO,
    TOTAL_STEPS,
    assert_same_training_state,
    assert_trees_equal,
    cli_overrides,
    compile_cache_dir,
    losses_only,
    persistent_compile_cache,
    read_metrics,
    read_state,
    reuse_train_programs,
    shared_root,
    subprocess_env,
    synthetic_dir,
    tiny_config,
)

from mixreorg_jax import trainer
from mixreorg_jax.data import pipeline

PROCESSES = 2
DEVICES_PER_PROCESS = 4
TIMEOUT_S = 900  # a hung collective fails the test instead of blocking CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ConcatenatedShards(grain.DatasetIterator):
    """The processes' shards of the pipeline as one iterator of global batches (checkpointable)."""

    def __init__(self, shards: list[pipeline.TrainIterator]):
        super().__init__(shards)
        self._shards = shards
        self.num_examples = shards[0].num_examples

    def __next__(self):
        batches = [next(shard) for shard in self._shards]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self):
        return {str(i): shard.get_state() for i, shard in enumerate(self._shards)}

    def set_state(self, state):
        for i, shard in enumerate(self._shards):
            shard.set_state(state[str(i)])


# With the tiny MixReorg's own mixing (none before or beside the mixed branch's blocks) a hard
# group assignment of a mixed image flips at step 9 between the two layouts' roundings (grad norm
# 0.8% apart, the losses then 1e-3): the paper's contextual and progressive mixing keep them
# within the tolerances below for all 12 steps.
MIX = {"mix.contextual_depth": 1, "mix.progressive_weight": 1.0}


def test_two_processes_train_like_one(tmp_path, synthetic_dir, monkeypatch):
    workdir, reference_dir = tmp_path / "two_processes", tmp_path / "one_process"
    address = f"127.0.0.1:{_free_port()}"
    # No compilation cache: no other test runs these programs (and on CPU, JAX's sharing of
    # compiled programs between processes, jax_share_binary_between_hosts, hangs process 1).
    env = subprocess_env(
        None, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    )
    processes, logs = [], []
    for index in range(PROCESSES):
        logs.append(tmp_path / f"process_{index}.log")
        with open(logs[-1], "w") as log:
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "mixreorg_jax.train",
                        f"--config={REPO / 'configs' / 'mixreorg.py'}:tiny",
                        f"--workdir={workdir}",
                        *cli_overrides(synthetic_dir, MIX),
                        f"--coordinator_address={address}",
                        f"--num_processes={PROCESSES}",
                        f"--process_id={index}",
                    ],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    def tails():
        return "\n".join(
            f"--- process {i}:\n" + log.read_text()[-3000:] for i, log in enumerate(logs)
        )

    try:
        # Meanwhile, the reference: one process with as many devices, on both shards' batches.
        make = pipeline.make_train_iterator
        monkeypatch.setattr(
            pipeline,
            "make_train_iterator",
            lambda data_config: ConcatenatedShards(
                [
                    make(data_config, process_index=i, process_count=PROCESSES)
                    for i in range(PROCESSES)
                ]
            ),
        )
        config = tiny_config("mixreorg", synthetic_dir, MIX)
        trainer.train_and_evaluate(config, str(reference_dir))
        returncodes = [p.wait(timeout=TIMEOUT_S) for p in processes]
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the processes did not finish in {TIMEOUT_S} s\n{tails()}") from None
    finally:
        for p in processes:
            p.kill()
    assert returncodes == [0] * PROCESSES, tails()
    for log in logs:
        assert f"over {PROCESSES} processes" in log.read_text()

    # Process 0 alone writes metrics and TensorBoard events; both save their data iterators.
    metrics = read_metrics(workdir)
    assert [m["step"] for m in metrics] == list(range(1, TOTAL_STEPS + 1))
    assert len(list((workdir / "tensorboard").iterdir())) == 1
    assert sorted(p.name for p in (workdir / f"checkpoints/{TOTAL_STEPS}/data").glob("*.json")) == [
        f"process_{i}-of-{PROCESSES}.json" for i in range(PROCESSES)
    ]

    # The same losses: at the first step to float32 rounding (measured: 1.4e-6 relative); later,
    # as training amplifies the rounding differences of the two layouts' sums (and may flip a hard
    # group assignment), within 1e-3 (measured: <= 7e-5). The parameters after 12 steps: within
    # 1e-4 (measured: 1.3e-6; a missing cross-process reduction or a wrong shard is off by far
    # more from the first step).
    reference_metrics = read_metrics(reference_dir)
    assert_trees_equal(losses_only(metrics)[0], losses_only(reference_metrics)[0], rtol=1e-5)
    for step_metrics, step_reference in zip(losses_only(metrics), losses_only(reference_metrics)):
        assert_trees_equal(step_metrics, step_reference, rtol=1e-3)
    assert_same_training_state(
        read_state(workdir, TOTAL_STEPS),
        read_state(reference_dir, TOTAL_STEPS),
        config.optim,
        [m["learning_rate"] for m in reference_metrics],
        tolerance=1e-4,
        compare_moments=False,
    )
