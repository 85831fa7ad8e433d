"""The launch scripts' dry runs print the commands they would run."""

import os
import pathlib
import shlex
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"


def dry_run(script, *args):
    out = subprocess.run(
        ["bash", str(LAUNCH / script), "--dry_run", *args],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": "/home/u"},
    )
    return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]


def test_local_trains_then_evaluates_the_same_workdir():
    pretrain, train, evaluate = dry_run("local.sh", "/tmp/demo", "--config.seed=3")
    # The backbone is pre-trained by the same trainer, into the workdir the demo then loads.
    assert pretrain[:5] == ["python", "-m", "mixreorg_jax.train", "--config", "configs/backbone.py"]
    backbone = "/home/u/tensorflow_datasets/mixreorg_backbone"
    assert pretrain[pretrain.index("--workdir") + 1] == backbone
    assert f"--config.model_init={backbone}" in train
    data_dir = [a for a in pretrain if a.startswith("--config.data.synthetic_dir=")]
    assert data_dir and data_dir[0] in train  # the same world
    assert train[:5] == [
        "python",
        "-m",
        "mixreorg_jax.train",
        "--config",
        "configs/mixreorg.py:demo",
    ]
    assert "--workdir" in train and train[train.index("--workdir") + 1] == "/tmp/demo"
    assert "--config.seed=3" in train
    assert evaluate[:3] == ["python", "-m", "mixreorg_jax.evaluate"]
    assert "--checkpoint=/tmp/demo" in evaluate
    data_flag = [a for a in train if a.startswith("--config.data.synthetic_dir=")]
    assert data_flag and data_flag[0].split("=", 1)[1] in " ".join(evaluate)


def test_gpu_slurm_runs_one_task_per_gpu():
    lines = [
        " ".join(line)
        for line in dry_run(
            "gpu_slurm.sh", "2", "8", "/shared/run", "configs/mixreorg.py:paper", "--config.seed=1"
        )
    ]
    text = "\n".join(lines)
    assert "--nodes=2" in text and "--ntasks-per-node=8" in text and "--gpus-per-task=1" in text
    assert "--signal=TERM@120" in text  # preemption warning -> checkpoint and clean stop
    srun = [line for line in lines if line.startswith("srun")]
    assert srun == [
        "srun python -m mixreorg_jax.train --config configs/mixreorg.py:paper "
        "--workdir /shared/run --config.seed=1"
    ]


def test_tpu_pod_runs_the_same_command_on_every_worker():
    commands = dry_run(
        "tpu_pod.sh", "pod", "us-central2-b", "v4-64", "gs://b/run", "configs/mixreorg.py:paper"
    )
    assert commands[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    ssh = [c for c in commands if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert len(ssh) == 2 and all("--worker=all" in c for c in ssh)
    assert (
        "python3 -m mixreorg_jax.train --config configs/mixreorg.py:paper --workdir gs://b/run"
        in ssh[-1][-1]
    )


@pytest.mark.parametrize("script", ["gpu_slurm.sh", "tpu_pod.sh"])
def test_missing_arguments_are_a_usage_error(script):
    result = subprocess.run(
        ["bash", str(LAUNCH / script), "--dry_run"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "usage:" in result.stderr


def test_ci_runs_the_readmes_test_command_on_the_locked_versions():
    repo = LAUNCH.parent
    ci = (repo / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = (repo / "README.md").read_text()
    assert ci in readme.splitlines()
    assert 'pip install -r requirements-test.lock -e ".[test]"' in ci
    assert "pip install -r requirements.lock -e . && bash launch/local.sh" in readme

    def pins(name):
        lines = (repo / name).read_text().splitlines()
        return dict(line.split("==") for line in lines if "==" in line and line[0] != "#")

    run, test = pins("requirements.lock"), pins("requirements-test.lock")
    assert {"jax", "flax", "optax", "orbax-checkpoint", "transformers"} <= set(run)
    assert {"torch", "libtpu"} <= set(test) - set(run)  # the test extra's, not the main job's
    assert all(test[name] == version for name, version in run.items())
