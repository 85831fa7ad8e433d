"""The trainer: `train_and_evaluate(config, workdir)` trains GroupViT or MixReorg from a config.

One loop for every config (MixReorg or GroupViT is `config.mix.enabled`), read top to bottom in
stages: mesh -> data -> model, optimiser and jitted step (`training.step.build`) -> restore
(the workdir's checkpoint, else `config.resume`, else `config.model_init`, else scratch) -> loop
(log, NaN check one step late, checkpoint, in-loop evaluators) -> export. `python -m
mixreorg_jax.train` is its command line; the synthetic benchmark calls it in-process.
"""

import json
import math
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath

from mixreorg_jax import evaluation
from mixreorg_jax.data import pipeline
from mixreorg_jax.formats import model_files
from mixreorg_jax.training import checkpointing, model_init, sharding
from mixreorg_jax.training import step as train_step


class TrainingDiverged(RuntimeError):
    """A non-finite loss; the message names the step, the loss terms and the last checkpoint."""


def train_steps(config: ml_collections.ConfigDict, num_examples: int | None) -> tuple[int, int]:
    """(total, warm-up) steps from the config's steps or epochs."""

    def steps(n_steps, n_epochs, name):
        if n_epochs:
            if not num_examples:
                raise ValueError(f"{name}_epochs needs a dataset of known size")
            return int(math.ceil(n_epochs * num_examples / config.data.batch_size))
        return int(n_steps)

    return (
        steps(config.total_steps, config.total_epochs, "total"),
        steps(config.warmup_steps, config.warmup_epochs, "warmup"),
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs training to `total_steps` (or until preempted); returns the last logged metrics."""
    workdir = epath.Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(
        str(workdir / "tensorboard"), just_logging=not is_main
    )
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    # ---------------------------------------------------------------- Mesh
    mesh = sharding.make_mesh(config.mesh)
    train_step.check_batch(config, mesh)  # Before the data pipeline starts its workers.
    logging.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())

    # ---------------------------------------------------------------- Data
    train_iter = pipeline.make_train_iterator(config.data)
    total_steps, warmup_steps = train_steps(config, getattr(train_iter, "num_examples", None))

    # ---------------------------------------------------------------- Model, optimiser, step
    built = train_step.build(config, mesh, total_steps, warmup_steps)
    abstract_state, state_sharding = built.abstract_state, built.state_sharding
    # Evaluators open their data now: a missing dataset fails here, before step 0.
    evals = evaluation.create(config.evals, model=built.model, mesh=mesh, config=config)

    # ---------------------------------------------------------------- Restore
    # Order: this workdir's latest checkpoint, else `config.resume` (another run), else
    # `config.model_init` (parameters only), else scratch.
    manager = checkpointing.make_manager(str(workdir), config.checkpoint)
    try:
        if manager.latest_step() is not None:
            state, _ = checkpointing.restore(manager, abstract_state, train_iter)
            logging.info("resumed from %s at step %d", workdir, int(state["step"]))
        elif config.resume:
            state, _ = checkpointing.restore(config.resume, abstract_state, train_iter)
            logging.info("resumed from %s at step %d", config.resume, int(state["step"]))
        else:
            model_init.check_source(config.model_init)
            state = jax.jit(built.init, out_shardings=state_sharding)(jax.random.key(config.seed))
            if config.model_init.lower() not in model_init.SCRATCH:
                state = model_init.initialize(
                    state,
                    config.model_init,
                    config.model,
                    state_sharding,
                    load=config.model_init_load,
                )
    except BaseException:
        manager.close()  # A bad resume or model_init source: no thread outlives the error.
        raise
    first_step = int(state["step"])
    export_dir = workdir / "export"
    if first_step >= total_steps:
        # A finished run (rerunning the command is how runs resume): nothing to train, and the
        # export is left as it is, or written if a crash lost it.
        if not export_dir.exists():
            export(state, config, export_dir)
        message = f"{workdir}: finished at step {first_step} of {total_steps}; export: {export_dir}"
        logging.info(message)
        if is_main:
            print(message)
        manager.close()
        writer.close()
        return {}
    report = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps
    )
    preemption = checkpointing.PreemptionWatch()
    metrics_file = (workdir / "metrics.jsonl").open("a") if is_main else None

    def write(step, scalars):
        # Evaluators may return pictures (uint8 [N, H, W, 3]) beside their numbers.
        images = {k: v for k, v in scalars.items() if np.ndim(v) == 4}
        scalars = {k: float(v) for k, v in scalars.items() if k not in images}
        if images:
            writer.write_images(step, images)
        writer.write_scalars(step, scalars)
        if metrics_file:
            metrics_file.write(json.dumps({"step": step, **scalars}) + "\n")
            metrics_file.flush()

    # ---------------------------------------------------------------- Loop
    logging.info("training steps %d -> %d", first_step, total_steps)
    last, pending, tick, tick_step = {}, None, time.time(), first_step
    try:
        with jax.set_mesh(mesh):
            for step in range(first_step + 1, total_steps + 1):
                batch = sharding.global_batch(next(train_iter), mesh)
                state, terms = built.update(state, batch)
                # Checked one step late so the host never waits on the step it just launched.
                if pending is not None:
                    check_finite(*pending, manager)
                pending = (step, terms)
                report(step)

                if step % config.log_every_steps == 0 or step == total_steps:
                    now = time.time()
                    last = {k: float(v) for k, v in jax.device_get(terms).items()}
                    last["examples_per_sec"] = (
                        (step - tick_step) * config.data.batch_size / (now - tick)
                    )
                    tick, tick_step = now, step
                    write(step, last)

                stop = preemption.should_stop()
                if stop or step % config.checkpoint.every_steps == 0 or step == total_steps:
                    check_finite(step, terms, manager)  # never save a diverged state
                    checkpointing.save(manager, step, state, train_iter, force=True)
                if stop:
                    logging.warning("preempted: saved step %d, stopping", step)
                    break

                for name, evaluator in evals:
                    if evaluator.due(step, total_steps):
                        started = time.time()
                        with report.timed(name):
                            results = evaluator.run(state)
                            write(step, {f"{name}/{k}": v for k, v in results.items()})
                        tick += time.time() - started  # examples_per_sec counts training only

        if pending is not None:
            check_finite(*pending, manager)
        manager.wait_until_finished()
        if int(state["step"]) == total_steps:
            export(state, config, export_dir)
    finally:
        # Also when the run fails (e.g. diverges): the caller's SIGTERM handling is back.
        preemption.close()
        if metrics_file:
            metrics_file.close()
    writer.flush()
    return last


def export(state: dict, config: ml_collections.ConfigDict, path: epath.Path) -> None:
    """The model's variables, for evaluation and conversion; replaces an older export (Orbax
    renames a finished save into place, so a crash leaves the old one or none)."""
    model_files.save_model(
        str(path), train_step.model_variables(state), config.model, overwrite=True
    )


def check_finite(step: int, terms: dict, manager) -> None:
    terms = {k: float(v) for k, v in jax.device_get(terms).items()}
    if not all(math.isfinite(v) for v in terms.values()):
        manager.wait_until_finished()  # The checkpoint named below is complete on disk.
        raise TrainingDiverged(
            f"non-finite loss at step {step}: {terms}; last good checkpoint: "
            f"step {manager.latest_step()} in {manager.directory}"
        )
