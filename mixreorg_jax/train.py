r"""Trains GroupViT or MixReorg from a config.

  python -m mixreorg_jax.train --config configs/mixreorg.py:demo --workdir /tmp/mixreorg_demo

Every config field can be overridden (`--config.optim.lr=1e-3`). Multi-process runs (TPU pods,
GPU clusters) start the same command on every host; `jax.distributed` is initialised when the
environment (or `--num_processes`) says there is more than one process.
"""

import json
import logging as pylogging
import math
import time

import jax
import ml_collections
from absl import app, flags, logging
from clu import metric_writers, periodic_actions
from etils import epath
from ml_collections import config_flags

from mixreorg_jax import evaluation
from mixreorg_jax.data import pipeline
from mixreorg_jax.formats import model_files
from mixreorg_jax.models import groupvit
from mixreorg_jax.training import checkpointing, model_init, optim, sharding
from mixreorg_jax.training import step as train_step

config_flags.DEFINE_config_file(
    "config", None, "Train config file (`path.py:variant`).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Checkpoints, logs and the exported model go here.")
sharding.define_distributed_flags()


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
    train_step.check_batch(config, mesh)
    logging.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())

    # ---------------------------------------------------------------- Data
    train_iter = pipeline.make_train_iterator(config.data)
    total_steps, warmup_steps = train_steps(config, getattr(train_iter, "num_examples", None))

    # ---------------------------------------------------------------- Model and optimiser
    model = groupvit.GroupViT(config.model)
    schedule = optim.make_schedule(config.optim, total_steps, warmup_steps, config.data.batch_size)
    tx = optim.make_optimizer(config.optim, schedule)
    base_rng = jax.random.key(config.seed)

    init = train_step.make_init_fn(model, config, tx)
    abstract_state, state_sharding = train_step.abstract_state(init, base_rng, mesh)
    update_fn = train_step.make_update_fn(
        model, config, tx, schedule, mesh, state_sharding, base_rng
    )

    # ---------------------------------------------------------------- Restore
    # Order: this workdir's latest checkpoint, else `config.resume` (another run), else
    # `config.model_init` (parameters only), else scratch.
    manager = checkpointing.make_manager(str(workdir), config.checkpoint)
    if manager.latest_step() is not None:
        state, _ = checkpointing.restore(str(workdir), abstract_state, train_iter)
        logging.info("resumed from %s at step %d", workdir, int(state["step"]))
    elif config.resume:
        state, _ = checkpointing.restore(config.resume, abstract_state, train_iter)
        logging.info("resumed from %s at step %d", config.resume, int(state["step"]))
    else:
        state = jax.jit(init, out_shardings=state_sharding)(base_rng)
        if config.model_init:
            state = model_init.initialize(
                state, config.model_init, config.model, state_sharding, load=config.model_init_load
            )
    first_step = int(state["step"])

    evals = evaluation.create(config.evals, model=model, mesh=mesh, config=config)
    report = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps
    )
    preemption = checkpointing.PreemptionWatch()
    metrics_file = (workdir / "metrics.jsonl").open("a") if is_main else None

    def write(step, scalars):
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
                state, terms = update_fn(state, batch)
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
                        with report.timed(name):
                            results = evaluator.run(state)
                            write(step, {f"{name}/{k}": v for k, v in results.items()})

        if pending is not None:
            check_finite(*pending, manager)
        manager.wait_until_finished()
        if int(state["step"]) == total_steps:
            model_files.save_model(
                str(workdir / "export"),
                {"params": state["params"]["model"], "batch_stats": state["batch_stats"]},
                config.model,
            )
    finally:
        # Also when the run fails (e.g. diverges): the caller's SIGTERM handling is back.
        preemption.close()
        if metrics_file:
            metrics_file.close()
    writer.flush()
    return last


def check_finite(step: int, terms: dict, manager) -> None:
    terms = {k: float(v) for k, v in jax.device_get(terms).items()}
    if not all(math.isfinite(v) for v in terms.values()):
        manager.wait_until_finished()  # The checkpoint named below is complete on disk.
        raise TrainingDiverged(
            f"non-finite loss at step {step}: {terms}; last good checkpoint: "
            f"step {manager.latest_step()} in {manager.directory}"
        )


def quiet_orbax_logs():
    """Orbax logs every file it writes at INFO; keep its warnings, drop the chatter."""

    class _Filter(pylogging.Filter):
        def filter(self, record):
            return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname

    logging.get_absl_handler().addFilter(_Filter())


def one_line(error: Exception, max_details: int = 3) -> str:
    """An error's message on one line: its first line and a few detail lines.

    A traceback quoted inside the message (ml_collections quotes the config file's) is reduced
    to its last line, the exception itself.
    """
    lines = [" ".join(line.split()) for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        lines = [lines[0], lines[-1]]
    more = len(lines) - 1 - max_details
    return "; ".join(lines[: 1 + max_details]) + (f"; ... ({more} more)" if more > 0 else "")


def _missing_config_field(error: Exception) -> str | None:
    """The key named by ml_collections' error for a missing field (AttributeError(KeyError))."""
    while isinstance(error, (AttributeError, KeyError)) and error.args:
        if not isinstance(error.args[0], Exception):
            return str(error.args[0])
        error = error.args[0]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a config mistake (an unknown field, a bad value) as one line.

    ml_collections raises a bare AttributeError for a `--config.x.y=...` override of a field the
    config does not have, which absl would show as a traceback.
    """
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        message = _missing_config_field(e) or str(e)
        key = message.splitlines()[0].strip("'\"")
        culprit = [
            a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")
        ]
        where = culprit[0] if culprit else "a --config override"
        raise SystemExit(
            f"error: {where}: no such config field {one_line(ValueError(message))}"
        ) from None
    except (flags.Error, TypeError, ValueError) as e:
        raise SystemExit(f"error: {one_line(e)}") from None


def main(argv):
    del argv
    quiet_orbax_logs()
    sharding.initialize_distributed()
    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (TrainingDiverged, ValueError, FileNotFoundError) as e:
        # Expected failures (bad config, missing data, a checkpoint of another model, divergence)
        # end with one clear line rather than a traceback through XLA.
        raise SystemExit(f"error: {one_line(e)}") from None


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
