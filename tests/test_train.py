"""The trainer end to end, on the suite's 8 fake CPU devices.

Whole tiny runs of GroupViT and MixReorg through `train_and_evaluate` (the loss goes down), the
same steps on 1 device, on 8 (data parallel) and on 8 (data x fsdp), resuming after a preemption
exactly where an uninterrupted run would be, a SIGTERM to a real training process, `model_init`
from Hugging Face ViT/DeiT checkpoints, and clear errors for bad input and a diverged loss.

Compiling a train step of even the tiny model takes about a minute of CPU, so every test trains
the same two configs (`tiny_config`): a persistent compilation cache, shared by the pytest
workers and the training subprocesses, compiles each distinct program once per session, and
within a worker later runs of a config reuse its jitted functions.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from mixreorg_jax import cli, trainer
from mixreorg_jax.data import pipeline, synthetic_tfds
from mixreorg_jax.formats import model_files
from mixreorg_jax.models import groupvit
from mixreorg_jax.training import checkpointing, model_init, objective, optim, sharding
from mixreorg_jax.training import config as train_config
from mixreorg_jax.training import step as train_step

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 12


# ---------------------------------------------------------------- shared set-up
@pytest.fixture(scope="session")
def shared_root(tmp_path_factory) -> pathlib.Path:
    """A directory every pytest worker of this session sees (the session's own when not xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def exclusive(lock_file: pathlib.Path):
    """Holds an exclusive lock on `lock_file` (between pytest workers)."""
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def compile_cache_dir(shared_root) -> pathlib.Path:
    path = shared_root / "jax_compilation_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module", autouse=True)
def persistent_compile_cache(compile_cache_dir):
    """The persistent compilation cache, on for this module's tests only."""
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(compile_cache_dir))
    compilation_cache.reset_cache()  # Takes effect even after earlier compilations.
    yield
    jax.config.update("jax_compilation_cache_dir", previous)
    compilation_cache.reset_cache()


_PROGRAMS = {}


def _program_key(config: ml_collections.ConfigDict, mesh=None):
    """What the init and update programs depend on: all but where data, logs and checkpoints go."""
    relevant = {
        k: v
        for k, v in config.to_dict().items()
        if k
        not in (
            "data",
            "checkpoint",
            "log_every_steps",
            "resume",
            "model_init",
            "model_init_load",
            "evals",
        )
    }
    relevant["batch_size"] = config.data.batch_size
    return json.dumps(relevant, sort_keys=True, default=str), mesh


@pytest.fixture(scope="module", autouse=True)
def reuse_train_programs():
    """Runs of an equal config on an equal mesh reuse the jitted init and update functions.

    Saves each later `train_and_evaluate` of a config its tracing (~10 s of CPU here).
    """

    def memoized(make):
        def make_or_reuse(model, config, *args):
            if config.total_epochs or config.warmup_epochs:  # steps would depend on the data
                return make(model, config, *args)
            mesh = next((a for a in args if isinstance(a, jax.sharding.Mesh)), None)
            key = (make.__name__, *_program_key(config, mesh))
            if key not in _PROGRAMS:
                _PROGRAMS[key] = make(model, config, *args)
            return _PROGRAMS[key]

        return make_or_reuse

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(train_step, "make_init_fn", memoized(train_step.make_init_fn))
        monkeypatch.setattr(train_step, "make_update_fn", memoized(train_step.make_update_fn))
        yield


@pytest.fixture(scope="session")
def synthetic_dir(shared_root) -> pathlib.Path:
    """The tiny synthetic world, prepared once for all workers (what `tiny` configs train on)."""
    path = shared_root / "synthetic"
    with exclusive(shared_root / "synthetic.lock"):
        synthetic_tfds.prepare_synthetic_world(tiny_config("mixreorg", path).data)
    return path


def trainer_parts(config: ml_collections.ConfigDict):
    """(model, schedule, optimiser, init fn, base key), built as `train_and_evaluate` does."""
    model = groupvit.GroupViT(config.model)
    schedule = optim.make_schedule(
        config.optim, config.total_steps, config.warmup_steps, config.data.batch_size
    )
    tx = optim.make_optimizer(config.optim, schedule)
    return (
        model,
        schedule,
        tx,
        train_step.make_init_fn(model, config, tx),
        jax.random.key(config.seed),
    )


_DONE_IN_THIS_PROCESS = set()


def compile_init_once(shared_root, synthetic_dir):
    """Compiles the trainer's init on the 8-device mesh (one program for both configs) once for
    all workers: the first compiles it into the shared cache while the others wait."""
    if "init" in _DONE_IN_THIS_PROCESS:
        return
    with exclusive(shared_root / "init.lock"):
        config = tiny_config("mixreorg", synthetic_dir)
        *_, init, rng = trainer_parts(config)
        _, shardings = train_step.abstract_state(init, rng, sharding.make_mesh(config.mesh))
        jax.block_until_ready(jax.jit(init, out_shardings=shardings)(rng))
    _DONE_IN_THIS_PROCESS.add("init")


@pytest.fixture(scope="module")
def compiled_init(shared_root, synthetic_dir, persistent_compile_cache, reuse_train_programs):
    compile_init_once(shared_root, synthetic_dir)


def tiny_config(name: str, synthetic_dir, extra: dict | None = None) -> ml_collections.ConfigDict:
    """`configs/<name>.py:tiny` as every test here trains it, with `extra` overrides (see
    `cli_overrides`)."""
    return train_config.apply_overrides(
        train_config.from_file(f"{REPO}/configs/{name}.py:tiny"), _overrides(synthetic_dir, extra)
    )


def _overrides(synthetic_dir, extra: dict | None = None) -> dict:
    return {
        "data.synthetic_dir": str(synthetic_dir),
        "total_steps": TOTAL_STEPS,
        "log_every_steps": 1,
        "checkpoint.every_steps": 1000,
        **(extra or {}),
    }


def cli_overrides(synthetic_dir, extra: dict | None = None) -> list[str]:
    """`tiny_config`'s changes as command-line flags (the same programs, so cache hits)."""
    return [f"--config.{k}={v}" for k, v in _overrides(synthetic_dir, extra).items()]


def subprocess_env(compile_cache_dir, **extra) -> dict:
    """This environment for a training subprocess, with the compilation cache if given."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    if compile_cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = str(compile_cache_dir)
    return env


class TappedIterator(pipeline.TrainIterator):
    """The pipeline's iterator with `hook(index, batch) -> batch` on each batch it hands out.

    Its state is the wrapped iterator's, so checkpoints and resumption work as without it.
    """

    def __init__(self, inner: pipeline.TrainIterator, hook):
        super().__init__(inner, inner.dataset_sizes)
        self._hook = hook
        self._index = 0

    def __next__(self):
        batch = self._hook(self._index, next(self._parent))
        self._index += 1
        return batch


def tap_pipeline(monkeypatch, hook):
    make = pipeline.make_train_iterator
    monkeypatch.setattr(
        pipeline,
        "make_train_iterator",
        lambda *args, **kwargs: TappedIterator(make(*args, **kwargs), hook),
    )


def fingerprint(batch: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(batch):
        digest.update(np.ascontiguousarray(batch[key]).tobytes())
    return digest.hexdigest()[:16]


def read_state(workdir, step: int) -> dict:
    """A training checkpoint's state as host numpy arrays, whatever devices or processes wrote it."""
    manager = ocp.CheckpointManager(
        pathlib.Path(workdir) / "checkpoints",
        item_handlers={"state": ocp.StandardCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        manager.item_metadata(step)["state"],
    )
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))[
        "state"
    ]
    manager.close()
    return jax.device_get(state)


def read_metrics(workdir) -> list[dict]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses_only(metrics: list[dict]) -> list[dict]:
    """Drops the throughput, which is the only logged number that may differ between runs."""
    return [{k: v for k, v in m.items() if k != "examples_per_sec"} for m in metrics]


def assert_trees_equal(actual, expected, rtol=0.0, atol=0.0):
    """Same structure, and every leaf equal (or within rtol/atol)."""
    actual_leaves, actual_structure = jax.tree_util.tree_flatten_with_path(actual)
    expected_leaves, expected_structure = jax.tree_util.tree_flatten_with_path(expected)
    assert actual_structure == expected_structure
    for (path, value), (_, expected_value) in zip(actual_leaves, expected_leaves):
        np.testing.assert_allclose(
            np.asarray(value),
            np.asarray(expected_value),
            rtol=rtol,
            atol=atol,
            err_msg=jax.tree_util.keystr(path),
        )


def assert_loss_went_down(metrics: list[dict]):
    """The last 3 logged totals average at least 15% below the first 3 (measured: ~30%)."""
    totals = [m["total"] for m in metrics]
    assert len(totals) == TOTAL_STEPS
    early, late = np.mean(totals[:3]), np.mean(totals[-3:])
    assert late < 0.85 * early, totals


# ---------------------------------------------------------------- whole runs
def shared_mixreorg_run(shared_root, synthetic_dir) -> tuple[pathlib.Path, list[str], dict]:
    """The uninterrupted MixReorg run that tests compare with, trained once for all workers.

    Returns (its workdir, fingerprints of the batches it trained on, its last logged metrics).
    """
    workdir, record = shared_root / "mixreorg_run", shared_root / "mixreorg_run.json"
    compile_init_once(shared_root, synthetic_dir)
    with exclusive(shared_root / "mixreorg_run.lock"):
        if not record.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # what a failed attempt left
            seen = []

            def record_batch(index, batch):
                seen.append(fingerprint(batch))
                return batch

            with pytest.MonkeyPatch.context() as monkeypatch:
                tap_pipeline(monkeypatch, record_batch)
                last = trainer.train_and_evaluate(
                    tiny_config("mixreorg", synthetic_dir), str(workdir)
                )
            record.write_text(json.dumps({"batches": seen, "last": last}))
    saved = json.loads(record.read_text())
    assert len(saved["batches"]) == TOTAL_STEPS
    return workdir, saved["batches"], saved["last"]


@pytest.fixture(scope="module")
def mixreorg_run(shared_root, synthetic_dir, persistent_compile_cache, reuse_train_programs):
    return shared_mixreorg_run(shared_root, synthetic_dir)


def test_groupvit_trains(tmp_path, synthetic_dir, compiled_init, monkeypatch):
    # A workdir relative to the working directory, as users type it (Orbax wants absolute paths).
    monkeypatch.chdir(tmp_path.parent)
    last = trainer.train_and_evaluate(tiny_config("groupvit", synthetic_dir), tmp_path.name)
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, TOTAL_STEPS + 1))
    assert {"contrastive", "multi_label"} <= set(last)
    assert not {"restore", "mixseg"} & set(last)  # GroupViT has no mixing losses
    assert_loss_went_down(metrics)
    # The exported model loads as the one trained.
    variables, model_config = model_files.load_model(str(tmp_path / "export"))
    final = read_state(tmp_path, TOTAL_STEPS)
    # Read back through the relative path too (what --config.resume or --checkpoint get).
    state, step = checkpointing.restore(tmp_path.name)
    assert step == TOTAL_STEPS
    assert_trees_equal(state["params"]["model"], final["params"]["model"])
    assert_trees_equal(variables["params"], final["params"]["model"])
    assert model_config.width == tiny_config("groupvit", "").model.width


def test_rerunning_a_finished_run_is_one_line_and_more_steps_continue(
    tmp_path, synthetic_dir, capsys
):
    config = tiny_config("groupvit", synthetic_dir)
    trainer.train_and_evaluate(config, str(tmp_path))
    exported = {p: p.stat().st_mtime_ns for p in (tmp_path / "export").rglob("*") if p.is_file()}
    capsys.readouterr()
    # The same command again: nothing trained, nothing rewritten, one line.
    assert trainer.train_and_evaluate(config, str(tmp_path)) == {}
    assert capsys.readouterr().out == (
        f"{tmp_path}: finished at step {TOTAL_STEPS} of {TOTAL_STEPS}; "
        f"export: {tmp_path / 'export'}\n"
    )
    assert {p: p.stat().st_mtime_ns for p in exported} == exported
    assert len(read_metrics(tmp_path)) == TOTAL_STEPS
    # A lost export (a crash while writing it) is written again.
    shutil.rmtree(tmp_path / "export")
    trainer.train_and_evaluate(config, str(tmp_path))
    variables, _ = model_files.load_model(str(tmp_path / "export"))
    assert_trees_equal(variables["params"], read_state(tmp_path, TOTAL_STEPS)["params"]["model"])
    # More steps continue the run, and the export follows.
    config.total_steps = TOTAL_STEPS + 2
    last = trainer.train_and_evaluate(config, str(tmp_path))
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, TOTAL_STEPS + 3))
    assert "total" in last
    variables, _ = model_files.load_model(str(tmp_path / "export"))
    final = read_state(tmp_path, TOTAL_STEPS + 2)["params"]["model"]
    assert_trees_equal(variables["params"], final)


def test_mixreorg_trains(mixreorg_run):
    workdir, _, last = mixreorg_run
    metrics = read_metrics(workdir)
    assert {"contrastive", "multi_label", "restore", "mixseg"} <= set(last)
    assert last["total"] == metrics[-1]["total"]
    assert_loss_went_down(metrics)
    assert (workdir / "export").is_dir()
    assert read_state(workdir, TOTAL_STEPS)["step"] == TOTAL_STEPS


def test_trained_workdir_evaluates_on_a_voc_layout(mixreorg_run, tmp_path):
    """The eval binary on a VOC-layout fixture, from the few-step MixReorg run's workdir."""
    from test_evaluate import IMAGE_SIZES, SMALL_PROTOCOL, run_binary, write_voc_fixture

    workdir, _, _ = mixreorg_run
    labels = write_voc_fixture(str(tmp_path / "voc"), IMAGE_SIZES)
    results = run_binary(
        [
            f"--config={REPO / 'configs' / 'eval' / 'voc.py'}",
            f"--config.data_dir={tmp_path / 'voc'}",
            *[f"--config.{k}={v}" for k, v in SMALL_PROTOCOL.items()],
            "--config.save_predictions=1",
            f"--checkpoint={workdir}",
            f"--output_dir={tmp_path / 'out'}",
        ]
    )
    assert results["num_images"] == len(labels)
    assert results["checkpoint"] == str(workdir)
    confusion = np.asarray(results["confusion_matrix"])
    assert confusion.sum() == sum(int((label != 255).sum()) for label in labels.values())
    assert 0.0 <= results["miou"] <= 1.0
    assert set(results["baselines"]) == {"all_background", "top_class", "group_oracle"}
    first = sorted(labels)[0]
    assert (tmp_path / "out" / "pictures" / f"{first}.png").stat().st_size > 0


# ---------------------------------------------------------------- meshes
def test_same_steps_on_1_device_8_devices_and_fsdp(synthetic_dir, mixreorg_run):
    config = tiny_config("mixreorg", synthetic_dir)  # mixreorg_run's: its programs are reused
    data = pipeline.make_train_iterator(config.data)
    batches = [next(data) for _ in range(3)]
    model, schedule, tx, init, rng = trainer_parts(config)

    def mesh_of(data_axis, fsdp_axis, devices=None):
        return sharding.make_mesh(
            ml_collections.ConfigDict(dict(data=data_axis, fsdp=fsdp_axis)), devices=devices
        )

    # One initial state (the trainer's jitted, sharded init), copied onto each mesh.
    _, shardings8 = train_step.abstract_state(init, rng, mesh_of(8, 1))
    initial = jax.device_get(jax.jit(init, out_shardings=shardings8)(rng))

    results = {}
    for name, mesh in [
        ("1 device", mesh_of(1, 1, jax.devices()[:1])),
        ("data=8", mesh_of(8, 1)),
        ("data=4 fsdp=2", mesh_of(4, 2)),
    ]:
        _, shardings = train_step.abstract_state(init, rng, mesh)
        update = train_step.make_update_fn(model, config, tx, schedule, mesh, shardings, rng)
        state, metrics = jax.device_put(initial, shardings), []
        with jax.set_mesh(mesh):
            for batch in batches:
                state, terms = update(state, sharding.global_batch(batch, mesh))
                metrics.append(jax.device_get(terms))
        results[name] = (jax.device_get(state), metrics, state)

    # FSDP really splits the state: each device of an fsdp pair holds half of every array above
    # sharding.fsdp_sharding's size threshold (in the tiny model: the token embedding, and its
    # Adam moments), the rest is replicated.
    fsdp_state = results["data=4 fsdp=2"][2]
    leaves = [
        (jax.tree_util.keystr(path), x)
        for path, x in jax.tree_util.tree_leaves_with_path(fsdp_state)
    ]
    split = [name for name, x in leaves if x.addressable_shards[0].data.size * 2 == x.size]
    large = [name for name, x in leaves if x.size >= 2**14]
    assert split == large and len(split) == 3, (split, large)
    assert any("token_embedding" in name for name in split)

    reference_state, reference_metrics, _ = results["1 device"]
    assert reference_state["step"] == 3
    learning_rates = [float(m["learning_rate"]) for m in reference_metrics]
    for name in ("data=8", "data=4 fsdp=2"):
        state, metrics, _ = results[name]
        for step_metrics, step_reference in zip(metrics, reference_metrics):
            assert_trees_equal(step_metrics, step_reference, rtol=1e-5, atol=1e-5)
        assert_same_training_state(
            state, reference_state, config.optim, learning_rates, tolerance=1e-5
        )


def adam_moments(state) -> dict:
    """{'mu', 'nu'}: Adam's moments (trees like the params) in a train state's optimiser state
    (optax's own, or the nested dicts and lists that `read_state` restores)."""
    if isinstance(state, optax.ScaleByAdamState):
        return {"mu": state.mu, "nu": state.nu}
    if isinstance(state, dict) and {"mu", "nu"} <= state.keys():
        return {"mu": state["mu"], "nu": state["nu"]}
    children = (
        state.values()
        if isinstance(state, dict)
        else (state if isinstance(state, (list, tuple)) else ())
    )
    found = [m for child in children if (m := adam_moments(child)) is not None]
    return found[0] if found else None


def assert_same_training_state(
    state, reference, optim_config, learning_rates, *, tolerance, compare_moments=True
):
    """Train states after the same steps with another device or process layout: equal up to
    float32 reassociation (`tolerance`, relative and absolute).

    A parameter leaf whose RMS gradient stays below 1e-4 of the largest is one the loss does not
    depend on (a bias that a following BatchNorm, LayerNorm or softmax cancels): its gradient is
    rounding noise, which differs with the order of summation. Adam divides each gradient element
    by its own RMS and turns that noise into steps of about +-lr, so those leaves, and the
    BatchNorm running means they feed, are compared at the scale of the learning rate.
    """
    moments = adam_moments(state["opt_state"])
    reference_moments = adam_moments(reference["opt_state"])
    steps = int(reference["step"])
    rms_gradient = [
        np.sqrt(np.asarray(nu) / (1 - optim_config.b2**steps))
        for nu in jax.tree.leaves(reference_moments["nu"])
    ]
    largest = max(float(rms.max()) for rms in rms_gradient)
    noise = [float(rms.max()) < 1e-4 * largest for rms in rms_gradient]
    # Most leaves are compared tightly (measured: 35 of 209 are below the threshold after 12
    # MixReorg steps, among them every bias named above).
    assert 0 < sum(noise) < len(noise) / 3, sum(noise)
    noise_step = 4 * sum(learning_rates)

    def compare(tree, reference_tree, noise_atol):
        leaves = zip(
            jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(reference_tree), noise
        )
        for (path, value), expected, is_noise in leaves:
            np.testing.assert_allclose(
                np.asarray(value),
                np.asarray(expected),
                rtol=0 if is_noise else tolerance,
                atol=noise_atol if is_noise else tolerance,
                err_msg=jax.tree_util.keystr(path),
            )

    compare(state["params"], reference["params"], noise_step)
    if compare_moments:  # the gradients' moments; the noise is tiny in absolute terms
        compare(moments["mu"], reference_moments["mu"], tolerance)
        compare(moments["nu"], reference_moments["nu"], tolerance)
    for (path, value), expected in zip(
        jax.tree_util.tree_leaves_with_path(state["batch_stats"]),
        jax.tree.leaves(reference["batch_stats"]),
    ):
        name = jax.tree_util.keystr(path)
        np.testing.assert_allclose(
            value,
            expected,
            rtol=tolerance,
            atol=noise_step if name.endswith("['mean']") else tolerance,
            err_msg=name,
        )
    assert state["step"] == reference["step"]


# ---------------------------------------------------------------- preemption and resume
def test_resume_after_preemption_equals_uninterrupted_run(
    tmp_path, synthetic_dir, monkeypatch, mixreorg_run
):
    """N steps, a SIGTERM, N more steps from the checkpoint == 2N steps without a stop."""
    uninterrupted_dir, uninterrupted_batches, _ = mixreorg_run
    stop_at = TOTAL_STEPS // 2
    seen = []

    def record_and_preempt(index, batch):
        seen.append(fingerprint(batch))
        if len(seen) == stop_at:  # A real SIGTERM while step `stop_at` is being prepared.
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    tap_pipeline(monkeypatch, record_and_preempt)
    config = tiny_config("mixreorg", synthetic_dir)
    trainer.train_and_evaluate(config, str(tmp_path))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [stop_at]
    assert not (tmp_path / "export").exists()  # stopped, not finished
    assert len(seen) == stop_at

    trainer.train_and_evaluate(config, str(tmp_path))  # the same command again resumes
    assert seen == uninterrupted_batches  # the data order, across the stop
    assert losses_only(read_metrics(tmp_path)) == losses_only(read_metrics(uninterrupted_dir))
    assert_trees_equal(
        read_state(tmp_path, TOTAL_STEPS), read_state(uninterrupted_dir, TOTAL_STEPS)
    )
    data_state = f"checkpoints/{TOTAL_STEPS}/data/process_0-of-1.json"
    assert (tmp_path / data_state).read_text() == (uninterrupted_dir / data_state).read_text()


def _stderr_watcher(process: subprocess.Popen, marker: str):
    """(collected stderr lines, an Event set when a line contains `marker`), read by a thread."""
    lines, seen = [], threading.Event()

    def read():
        for line in process.stderr:
            lines.append(line)
            if marker in line:
                seen.set()
        seen.set()  # the stream closed: the process ended

    threading.Thread(target=read, daemon=True).start()
    return lines, seen


def test_sigterm_to_training_process_saves_a_checkpoint_to_resume_from(
    tmp_path, synthetic_dir, compile_cache_dir, mixreorg_run
):
    uninterrupted_dir, _, _ = mixreorg_run
    command = [
        sys.executable,
        "-m",
        "mixreorg_jax.train",
        f"--config={REPO / 'configs' / 'mixreorg.py'}:tiny",
        f"--workdir={tmp_path}",
        *cli_overrides(synthetic_dir),
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=subprocess_env(compile_cache_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Logged once the preemption handler is installed, just before the first step.
        lines, started = _stderr_watcher(process, "training steps 0 -> ")
        assert started.wait(timeout=300), "".join(lines[-30:])
        assert process.poll() is None, "".join(lines[-30:])
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=300)
    finally:
        process.kill()
    log = "".join(lines)
    assert returncode == 0, log[-3000:]
    assert "preempted: saved step" in log
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 1 <= saved[0] < TOTAL_STEPS, saved
    assert not (tmp_path / "export").exists()

    # Running the same config on that workdir resumes from the checkpoint and finishes where an
    # uninterrupted run does.
    trainer.train_and_evaluate(tiny_config("mixreorg", synthetic_dir), str(tmp_path))
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, TOTAL_STEPS + 1))
    assert_trees_equal(
        read_state(tmp_path, TOTAL_STEPS), read_state(uninterrupted_dir, TOTAL_STEPS)
    )


# ---------------------------------------------------------------- hard crashes (SIGKILL)
# Runs `python -m mixreorg_jax.train`'s main with one trap that SIGKILLs the process (no handler,
# no cleanup: what the OOM killer, `kill -9` or a lost host does) at a chosen point:
#   batch N AFTER   as the process prepares its N-th batch, once checkpoints/AFTER is committed
#                   (between two saves);
#   commit NAME     as Orbax commits the directory NAME (a checkpoint step, or `export`): its
#                   data is written to a temporary directory, which is not yet renamed into place.
_KILLING_TRAIN = """
import os, pathlib, signal, sys, time
from absl import app
from orbax.checkpoint._src.path import atomicity
from mixreorg_jax import cli, train
from mixreorg_jax.training import sharding

kind, where, workdir = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
del sys.argv[1:4]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if kind == "batch":
    at, after = (int(v) for v in where.split(":"))
    global_batch, calls = sharding.global_batch, []

    def global_batch_or_die(*args):
        calls.append(1)
        if len(calls) == at:
            deadline = time.time() + 120
            while not (workdir / "checkpoints" / str(after)).exists() and time.time() < deadline:
                time.sleep(0.05)
            die()
        return global_batch(*args)

    sharding.global_batch = global_batch_or_die
else:
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_or_die(self):
        if self._final_path.name == where:
            die()
        return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die
app.run(train.main, flags_parser=cli.parse_flags)
"""


def test_sigkill_at_any_point_costs_only_the_steps_since_the_last_complete_checkpoint(
    tmp_path, synthetic_dir, compile_cache_dir, mixreorg_run
):
    """Killed between saves, during an asynchronous save and during the export, and restarted
    with the same command each time: every restart resumes from the last complete checkpoint,
    never from a half-written one, and the run ends bit for bit where an uninterrupted run does."""
    uninterrupted_dir, _, _ = mixreorg_run
    flags = [
        f"--config={REPO / 'configs' / 'mixreorg.py'}:tiny",
        f"--workdir={tmp_path}",
        *cli_overrides(synthetic_dir, {"checkpoint.every_steps": 4}),
    ]

    def run(*trap) -> tuple[int, str]:
        command = (
            [sys.executable, "-c", _KILLING_TRAIN, *trap, str(tmp_path)]
            if trap
            else [sys.executable, "-m", "mixreorg_jax.train"]
        )
        done = subprocess.run(
            [*command, *flags],
            cwd=REPO,
            env=subprocess_env(compile_cache_dir),
            capture_output=True,
            text=True,
            timeout=600,
        )
        return done.returncode, done.stdout + done.stderr

    def saved() -> list[str]:
        return sorted(p.name for p in (tmp_path / "checkpoints").iterdir())

    # Killed as step 6 is prepared, checkpoint 4 complete.
    returncode, log = run("batch", "6:4")
    assert returncode == -signal.SIGKILL, log[-3000:]
    assert saved() == ["4"]

    # Killed while checkpoint 8 is being saved: its files are written, not committed.
    returncode, log = run("commit", "8")
    assert returncode == -signal.SIGKILL, log[-3000:]
    assert "at step 4" in log and "training steps 4 -> 12" in log, log[-3000:]
    assert saved()[0] == "4" and saved()[1].startswith("8.orbax-checkpoint-tmp"), saved()

    # The half-written 8 is not read (resumes from 4 again, deletes it); killed in the export.
    returncode, log = run("commit", "export")
    assert returncode == -signal.SIGKILL, log[-3000:]
    assert "training steps 4 -> 12" in log, log[-3000:]
    assert saved() == ["12", "4", "8"]
    assert not (tmp_path / "export").exists()
    assert [p.name for p in tmp_path.glob("export.orbax-checkpoint-tmp*")], list(tmp_path.iterdir())

    # The same command once more: nothing to train, the export written.
    returncode, log = run()
    assert returncode == 0, log[-3000:]
    assert f"finished at step {TOTAL_STEPS} of {TOTAL_STEPS}" in log
    assert_trees_equal(
        read_state(tmp_path, TOTAL_STEPS), read_state(uninterrupted_dir, TOTAL_STEPS)
    )
    exported, _ = model_files.load_model(str(tmp_path / "export"))
    reference, _ = model_files.load_model(str(uninterrupted_dir / "export"))
    assert_trees_equal(exported, reference)
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == []


# ---------------------------------------------------------------- divergence
def test_non_finite_loss_stops_naming_step_terms_and_last_checkpoint(
    tmp_path, synthetic_dir, monkeypatch, mixreorg_run
):
    config = tiny_config("mixreorg", synthetic_dir)  # mixreorg_run's: its programs are reused
    config.checkpoint.every_steps = 2
    bad_step = 3

    def poison(index, batch):  # a corrupt example: NaN pixels make every loss term NaN
        if index + 1 == bad_step:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return batch

    tap_pipeline(monkeypatch, poison)
    with pytest.raises(trainer.TrainingDiverged) as error:
        trainer.train_and_evaluate(config, str(tmp_path))
    message = str(error.value)
    assert f"non-finite loss at step {bad_step}:" in message
    for term in ("total", "contrastive", "multi_label", "restore", "mixseg"):
        assert f"'{term}': nan" in message
    assert f"last good checkpoint: step 2 in {tmp_path / 'checkpoints'}" in message
    assert len(message.splitlines()) == 1
    # It stopped at once: nothing logged after the bad step, and no diverged state saved.
    assert read_metrics(tmp_path)[-1]["step"] == bad_step
    checkpoints = ocp.CheckpointManager(tmp_path / "checkpoints")
    checkpoints.wait_until_finished()
    assert checkpoints.all_steps() == [2]
    assert np.isfinite(read_state(tmp_path, 2)["params"]["model"]["logit_scale"])


# ---------------------------------------------------------------- model_init from ViT/DeiT
@pytest.fixture(scope="module")
def initial_state(synthetic_dir, compiled_init):
    """(config, state, its shardings): the trainer's freshly initialised MixReorg state."""
    config = tiny_config("mixreorg", synthetic_dir)
    *_, init, rng = trainer_parts(config)
    _, shardings = train_step.abstract_state(init, rng, sharding.make_mesh(config.mesh))
    return config, jax.jit(init, out_shardings=shardings)(rng), shardings


def _save_hf_vit(folder, model_config, *, width=None, patch_size=None, deit=False):
    """A random Hugging Face ViTModel (or DeiTModel) sized like the tiny model, in `folder`."""
    import torch
    import transformers

    torch.manual_seed(0)
    width = width or model_config.width
    kwargs = dict(
        hidden_size=width,
        num_hidden_layers=sum(model_config.depths),
        num_attention_heads=model_config.num_heads,
        intermediate_size=int(width * model_config.mlp_ratio),
        image_size=model_config.image_size,
        patch_size=patch_size or model_config.patch_size,
        num_channels=3,
        qkv_bias=True,
    )
    if deit:
        model = transformers.DeiTModel(transformers.DeiTConfig(**kwargs), add_pooling_layer=False)
    else:
        model = transformers.ViTModel(transformers.ViTConfig(**kwargs), add_pooling_layer=False)
    with torch.no_grad():  # every tensor random, so none equals our fresh initialisation by chance
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == (
        "deit" if deit else "vit"
    )
    # The tensors as saved (the Hub's names, e.g. encoder.layer.0.attention.attention.query).
    return model_files.read_safetensors(str(folder / "model.safetensors"))


@pytest.mark.parametrize("deit", [False, True], ids=["vit", "deit_with_distillation_token"])
def test_model_init_from_hf_vit_copies_patch_embedding_positions_and_blocks(
    tmp_path, initial_state, deit
):
    config, state, shardings = initial_state
    source = _save_hf_vit(tmp_path, config.model, deit=deit)
    before = jax.device_get(state)
    after_state = model_init.initialize(state, str(tmp_path), config.model, shardings)
    after = jax.device_get(after_state)

    vision = after["params"]["model"]["vision"]
    patch = source["embeddings.patch_embeddings.projection.weight"]  # [out, in, kh, kw]
    np.testing.assert_array_equal(vision["patch_embed"]["kernel"], patch.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        vision["patch_embed"]["bias"], source["embeddings.patch_embeddings.projection.bias"]
    )
    extra_tokens = 2 if deit else 1  # class (+ distillation) positions are dropped
    np.testing.assert_array_equal(
        vision["position_embedding"], source["embeddings.position_embeddings"][:, extra_tokens:]
    )
    layer = 0
    for stage, depth in enumerate(config.model.depths):
        for block in range(depth):
            ours, theirs = vision[f"stages_{stage}"][f"blocks_{block}"], f"encoder.layer.{layer}."
            for our_proj, their_proj in (
                ("query", "attention.attention.query"),
                ("key", "attention.attention.key"),
                ("value", "attention.attention.value"),
                ("out", "attention.output.dense"),
            ):
                np.testing.assert_array_equal(
                    ours["attn"][our_proj]["kernel"], source[f"{theirs}{their_proj}.weight"].T
                )
                np.testing.assert_array_equal(
                    ours["attn"][our_proj]["bias"], source[f"{theirs}{their_proj}.bias"]
                )
            for our_fc, their_fc in (("fc1", "intermediate.dense"), ("fc2", "output.dense")):
                np.testing.assert_array_equal(
                    ours["mlp"][our_fc]["kernel"], source[f"{theirs}{their_fc}.weight"].T
                )
                np.testing.assert_array_equal(
                    ours["mlp"][our_fc]["bias"], source[f"{theirs}{their_fc}.bias"]
                )
            for our_norm, their_norm in (
                ("norm1", "layernorm_before"),
                ("norm2", "layernorm_after"),
            ):
                np.testing.assert_array_equal(
                    ours[our_norm]["scale"], source[f"{theirs}{their_norm}.weight"]
                )
                np.testing.assert_array_equal(
                    ours[our_norm]["bias"], source[f"{theirs}{their_norm}.bias"]
                )
            layer += 1
    assert layer == len({k.split(".")[2] for k in source if k.startswith("encoder.layer.")})

    # Everything a ViT does not have starts as initialised: grouping, text tower, projectors,
    # the optimiser state and the step.
    def named_leaves(tree):
        return {
            jax.tree_util.keystr(path): np.asarray(x)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)
        }

    flat_before, flat_after = named_leaves(before), named_leaves(after)
    assert flat_before.keys() == flat_after.keys()
    changed = {k for k in flat_before if not np.array_equal(flat_before[k], flat_after[k])}
    assert all(k.startswith("['params']['model']['vision']") for k in changed), changed
    assert not any("group" in k for k in changed)
    assert len(changed) == 3 + 16 * layer  # patch embedding (2), positions, 16 per block
    # The same layout on the mesh as a fresh state.
    assert jax.tree.map(lambda x: x.sharding, after_state) == shardings


def test_model_init_load_takes_only_the_matching_tensors(tmp_path, initial_state):
    config, state, shardings = initial_state
    before = model_files.flatten_tree(
        jax.device_get({"params": state["params"]["model"], "batch_stats": state["batch_stats"]})
    )
    rng = np.random.default_rng(0)
    source = {k: rng.normal(size=np.shape(v)).astype(np.float32) for k, v in before.items()}
    model_files.save_model(
        str(tmp_path / "source"), model_files.unflatten_tree(source), config.model
    )

    after_state = model_init.initialize(
        state, str(tmp_path / "source"), config.model, shardings, load=model_init.BACKBONE
    )
    after = model_files.flatten_tree(
        jax.device_get(
            {"params": after_state["params"]["model"], "batch_stats": after_state["batch_stats"]}
        )
    )
    loaded = {k for k in after if np.array_equal(after[k], source[k])}
    kept = {k for k in after if np.array_equal(after[k], before[k])}
    assert loaded | kept == set(after) and not loaded & kept
    blocks = config.model.depths[0]
    assert loaded == (
        {
            "params/vision/patch_embed/kernel",
            "params/vision/patch_embed/bias",
            "params/vision/patch_norm/scale",
            "params/vision/patch_norm/bias",
            "params/vision/position_embedding",
        }
        | {
            k
            for k in after
            if k.startswith(tuple(f"params/vision/stages_0/blocks_{i}/" for i in range(blocks)))
        }
    )
    assert len(loaded) == 5 + 16 * blocks
    assert jax.tree.map(lambda x: x.sharding, after_state) == shardings

    with pytest.raises(ValueError, match="model_init_load 'params/nothing' matches none"):
        model_init.initialize(
            state, str(tmp_path / "source"), config.model, shardings, load="params/nothing"
        )


@pytest.mark.parametrize("change", ["width", "patch_size"])
def test_model_init_refuses_a_vit_of_another_width_or_patch_size(tmp_path, initial_state, change):
    config, state, shardings = initial_state
    width, patch = config.model.width, config.model.patch_size
    theirs = (2 * width, 3, patch, patch) if change == "width" else (width, 3, 2 * patch, 2 * patch)
    _save_hf_vit(tmp_path, config.model, **{change: 2 * config.model[change]})
    message = (
        f"model_init {tmp_path}: embeddings.patch_embeddings.projection.weight has shape "
        f"{theirs}; the model needs {(width, 3, patch, patch)} (params/vision/patch_embed/kernel)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        model_init.initialize(state, str(tmp_path), config.model, shardings)


def test_model_init_names_the_flag_when_the_source_is_missing(tmp_path):
    for scratch in ("", "none", "None"):
        model_init.check_source(scratch)
    model_init.check_source(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"--config.model_init=none to train from scratch"):
        model_init.check_source(str(tmp_path / "deit-small-patch16-224"))


# ---------------------------------------------------------------- bad input
def test_missing_data_directory_is_a_clear_error(tmp_path, synthetic_dir):
    config = tiny_config("mixreorg", synthetic_dir)
    missing = tmp_path / "no_such_dataset"
    config.data.dir = str(missing)
    with pytest.raises(
        FileNotFoundError, match=f"prepared dataset directory {missing} does not exist"
    ):
        trainer.train_and_evaluate(config, str(tmp_path / "workdir"))


def test_unknown_config_key_on_the_command_line_is_one_error_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mixreorg_jax.train",
            f"--config={REPO / 'configs' / 'mixreorg.py'}:tiny",
            f"--workdir={tmp_path}",
            "--config.optim.lrr=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    # TensorFlow (imported for the data and metric writers) logs a few lines from C++ at import
    # (2.21: the oneDNN notice, which TF_CPP_MIN_LOG_LEVEL no longer silences); not ours.
    tf_log = re.compile(r"WARNING: All log messages before absl::InitializeLog|[IWEF]\d{4} ")
    errors = [
        line for line in result.stderr.splitlines() if line.strip() and not tf_log.match(line)
    ]
    assert errors == [
        "error: --config.optim.lrr=1: no such config field 'lrr'; Did you mean "
        '"lr" instead of "lrr"?'
    ], result.stderr[-3000:]
    assert not (tmp_path / "checkpoints").exists()


def _other_shape(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    other = config.copy_and_resolve_references()
    other.model.width = 2 * config.model.width
    return other


def test_resume_from_a_checkpoint_of_another_model_shape_is_a_clear_error(tmp_path, synthetic_dir):
    config = tiny_config("mixreorg", synthetic_dir)
    # A training checkpoint of a twice as wide model (zeros; only shapes matter here).
    other = _other_shape(config)
    *_, init, rng = trainer_parts(other)
    shapes = jax.eval_shape(init, rng)
    manager = checkpointing.make_manager(str(tmp_path / "other"), other.checkpoint)
    checkpointing.save(
        manager, 5, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes), force=True
    )
    manager.wait_until_finished()

    config.resume = str(tmp_path / "other")
    with pytest.raises(ValueError) as error:
        trainer.train_and_evaluate(config, str(tmp_path / "workdir"))
    message = cli.one_line(error.value)
    assert message.startswith(
        f"checkpoint {tmp_path / 'other' / 'checkpoints'}/5 does not fit "
        "this model/optimiser (another model shape or config?)"
    ), message


def test_model_init_from_a_checkpoint_of_another_model_shape_is_a_clear_error(
    tmp_path, synthetic_dir, compiled_init
):
    config = tiny_config("mixreorg", synthetic_dir)
    other = _other_shape(config).model
    variables = jax.tree.map(
        lambda x: np.zeros(x.shape, x.dtype), model_files.abstract_variables(other)
    )
    model_files.save_model(str(tmp_path / "other"), variables, other)

    config.model_init = str(tmp_path / "other")
    with pytest.raises(ValueError) as error:
        trainer.train_and_evaluate(config, str(tmp_path / "workdir"))
    message = cli.one_line(error.value)
    assert message.startswith(f"model_init {tmp_path / 'other'} does not match the model"), message
    assert "shape mismatch params/" in message
    assert "\n" not in message


def test_backbone_pretraining_is_a_train_config_whose_export_the_demo_loads(
    tmp_path, synthetic_dir, initial_state
):
    """configs/backbone.py trains the image-level classifier with the one trainer; the MixReorg
    run then takes exactly the backbone tensors (`model_init.BACKBONE`) from its workdir."""
    config = tiny_config("backbone", synthetic_dir)
    last = trainer.train_and_evaluate(config, str(tmp_path / "backbone"))
    logged = set(read_metrics(tmp_path / "backbone")[-1])
    assert {"classification", "total", "grad_norm"} <= logged
    assert not logged & {"contrastive", "multi_label", "mixseg"}  # no text, no grouping computed
    assert np.isfinite(last["classification"])
    exported, _ = checkpointing.load_variables(str(tmp_path / "backbone"))
    assert "classifier" not in exported["params"]  # the head is training-only

    demo_config, state, shardings = initial_state
    after = model_init.initialize(
        state, str(tmp_path / "backbone"), demo_config.model, shardings, load=model_init.BACKBONE
    )
    source = model_files.flatten_tree(exported)
    loaded = model_files.flatten_tree(jax.device_get({"params": after["params"]["model"]}))
    backbone = [k for k in loaded if re.fullmatch(model_init.BACKBONE, k)]
    assert len(backbone) == 5 + 16 * demo_config.model.depths[0]
    for key in backbone:
        np.testing.assert_array_equal(loaded[key], source[key])


def test_classification_trains_only_the_backbone_and_its_head(synthetic_dir):
    """The gradient of the classification objective reaches the patch embedding, the stage-1
    blocks (and their group tokens) and the head; nothing else is computed."""
    config = tiny_config("backbone", synthetic_dir)
    model, _, tx, init, rng = trainer_parts(config)
    state = jax.jit(init)(rng)
    head = state["params"]["classifier"]
    assert not np.any(head["kernel"]) and not np.any(head["bias"])  # starts at zero, as a probe
    # A head that is not zero passes the gradient on to the features.
    head["kernel"] = jax.random.normal(jax.random.key(2), head["kernel"].shape)
    batch = next(pipeline.make_train_iterator(config.data, process_index=0, process_count=1))
    assert batch["labels"].shape == (config.data.batch_size, 8)
    grads = jax.grad(
        lambda p: objective.loss_fn(
            p, state["batch_stats"], batch, jax.random.key(1), model=model, config=config
        )[0]
    )(state["params"])
    flat = model_files.flatten_tree(jax.device_get(grads))
    trained = {k for k, g in flat.items() if np.any(g != 0)}
    stage1 = "model/vision/stages_0/"
    assert {"classifier/kernel", "classifier/bias"} <= trained
    assert all(
        k.startswith(("classifier/", "model/vision/patch_", "model/vision/position_", stage1))
        for k in trained
    ), sorted(trained)
    assert not any("grouping" in k or "text" in k for k in trained)
    assert any(k.startswith(stage1 + "blocks_") for k in trained)
