r"""The synthetic benchmark: GroupViT vs MixReorg, and MixReorg's ablations, on the synthetic world.

  python -m mixreorg_jax.experiments.synthetic --output_dir workdirs/synthetic_benchmark \
      --runs=groupvit,mixreorg --seeds=0,1,2

Every run trains a `demo` config (`configs/groupvit.py:demo` or `configs/mixreorg.py:demo`, with
the run's overrides and `--set`) for the same number of steps with its seed, then evaluates the
exported model on the world's test split with the eval binary's protocol (`configs/eval/
synthetic.py`: background threshold chosen on the validation split). Runs whose `eval/results.json`
exists are not repeated, so an interrupted benchmark continues where it stopped.

Writes to OUTPUT_DIR: `results.json` (every run's settings and numbers), `table.md` (mean ± std
over seeds), `miou.png` (mIoU of every run) and `curves.png` (training losses).
"""

import json
import pathlib
import shlex
import time

import numpy as np
from absl import app, flags, logging

from mixreorg_jax import cli
from mixreorg_jax.training import config as train_config

# name -> (config file, overrides of its demo variant). The ablations change one part of MixReorg.
RUNS = {
    "groupvit": ("groupvit", {}),
    "mixreorg": ("mixreorg", {}),
    # The paper's contextual (one block) and progressive mixing, off in the demo; progressive
    # in the method's "add" mode (the paper config's "average" is the last ablation).
    "contextual_mixing": ("mixreorg", {"mix.contextual_depth": 1}),
    "progressive_mixing": (
        "mixreorg",
        {"mix.progressive_weight": 1.0, "mix.progressive_mode": "add"},
    ),
    "contextual_progressive_mixing": (
        "mixreorg",
        {"mix.contextual_depth": 1, "mix.progressive_weight": 1.0, "mix.progressive_mode": "add"},
    ),
    "no_mixseg_loss": ("mixreorg", {"loss.mixseg": 0.0}),
    "mixseg_weight_1": ("mixreorg", {"loss.mixseg": 1.0}),  # the demo's is 4
    "group_size_4": ("mixreorg", {"mix.group_size": 4}),
    "block_size_2": ("mixreorg", {"mix.block_size": 2}),
    # The (ours) alternatives of docs/method.md §4.
    # Progressive mixing's "average" mode, with the paper's mixing stages on.
    "contextual_progressive_average": (
        "mixreorg",
        {
            "mix.contextual_depth": 1,
            "mix.progressive_weight": 1.0,
            "mix.progressive_mode": "average",
        },
    ),
    "mixseg_batch_negatives": ("mixreorg", {"loss.mixseg_negatives": "batch"}),
    "mixseg_soft_assignment": ("mixreorg", {"loss.mixseg_assignment": "soft"}),
}
# Loss terms plotted against the step; the caption-contrastive one is logged also at weight 0.
CURVE_TERMS = ("contrastive", "segment_multi_label", "mixseg")
ABLATIONS = tuple(name for name in RUNS if name not in ("groupvit", "mixreorg"))

flags.DEFINE_string(
    "output_dir", "workdirs/synthetic_benchmark", "Results, table and plots go here."
)
flags.DEFINE_string("workdir_root", None, "Runs' workdirs (default OUTPUT_DIR/runs).")
flags.DEFINE_list(
    "runs",
    ["groupvit", "mixreorg"],
    f"Runs to do, from: {', '.join(RUNS)}; 'ablations' adds every ablation.",
)
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every run.")
flags.DEFINE_multi_string(
    "set",
    [],
    "An override for every run's config, `key=value` "
    "(e.g. `total_steps=200`), applied after the run's own.",
)
flags.DEFINE_string(
    "synthetic_dir",
    "~/tensorflow_datasets/mixreorg_synthetic",
    "Where the synthetic world is prepared (config.data.synthetic_dir).",
)


def parse_value(text: str):
    """A command-line value as Python: numbers, booleans, lists; anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"True": True, "False": False}.get(text, text)


def run_config(name: str, seed: int, extra: dict, synthetic_dir: str):
    """The train config of run `name` with `seed` and the `extra` overrides."""
    if name not in RUNS:
        raise ValueError(f"unknown run {name!r}; known: {', '.join(RUNS)}")
    config_file, overrides = RUNS[name]
    config = train_config.from_file(cli.resolve_config(f"configs/{config_file}.py:demo"))
    config.seed = seed
    config.data.synthetic_dir = synthetic_dir
    config.evals.val.enabled = False  # each run is evaluated on the test split once, at the end
    return train_config.apply_overrides(config, {**overrides, **extra})


def eval_config(train_config):
    from mixreorg_jax.data import synthetic_tfds
    from mixreorg_jax.evaluation import segmentation_settings

    config = segmentation_settings.default_config("synthetic")
    config.data_dir = str(synthetic_tfds.prepare_synthetic_world(train_config.data))
    config.save_predictions = 8
    return config


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def steady_steps_per_second(metrics: list[dict], batch_size: int) -> float:
    """Median training speed over the logged intervals after the first (which holds the
    compilation); NaN when fewer than two intervals were logged."""
    speeds = [m["examples_per_sec"] for m in metrics[1:] if "examples_per_sec" in m]
    return float(np.median(speeds)) / batch_size if speeds else float("nan")


def run_one(name: str, seed: int, extra: dict, root: pathlib.Path, synthetic_dir: str) -> dict:
    """Trains and evaluates one run (or reads its results); returns its summary."""
    from mixreorg_jax import trainer
    from mixreorg_jax.evaluation import offline

    run_dir = root / f"{name}_seed{seed}"
    results_path = run_dir / "eval" / "results.json"
    config = run_config(name, seed, extra, synthetic_dir)
    if not results_path.exists():
        logging.info("run %s seed %d", name, seed)
        start = time.time()
        trainer.train_and_evaluate(config, str(run_dir / "workdir"))
        train_seconds = time.time() - start
        offline.evaluate_checkpoint(
            eval_config(config), str(run_dir / "workdir"), str(run_dir / "eval")
        )
        (run_dir / "train_seconds.txt").write_text(f"{train_seconds:.1f}\n")
    results = json.loads(results_path.read_text())
    metrics = read_metrics(run_dir / "workdir")
    train_seconds = float((run_dir / "train_seconds.txt").read_text())
    return dict(
        name=name,
        seed=seed,
        overrides={**RUNS[name][1], **extra},
        miou=results["miou"],
        bg_thresh=results["bg_thresh"],
        baselines=results["baselines"],
        steps=config.total_steps,
        train_seconds=train_seconds,
        steps_per_second=steady_steps_per_second(metrics, config.data.batch_size),
        curves=[
            {
                k: v
                for k, v in m.items()
                if k in ("step", "total", *CURVE_TERMS, "multi_label", "restore")
            }
            for m in metrics
        ],
    )


def all_background_miou(summaries: list[dict]) -> float:
    """The all-background baseline's mIoU (%); every run shares the test split."""
    return float(np.mean([100 * s["baselines"]["all_background"]["miou"] for s in summaries]))


def markdown_table(summaries: list[dict], command: str) -> str:
    names = list(dict.fromkeys(s["name"] for s in summaries))
    lines = [
        "| run | changed | mIoU (%) mean ± std | per seed | group oracle (%) | steps/s (steady) |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        runs = [s for s in summaries if s["name"] == name]
        miou = np.array([100 * s["miou"] for s in runs])
        oracle = np.array([100 * s["baselines"]["group_oracle"]["miou"] for s in runs])
        changed = ", ".join(f"{k}={v}" for k, v in RUNS[name][1].items()) or "-"
        lines.append(
            f"| {name} | {changed} | {miou.mean():.1f} ± {miou.std():.1f} | "
            + " / ".join(f"{m:.1f}" for m in miou)
            + f" | {oracle.mean():.1f} ± {oracle.std():.1f}"
            + f" | {np.mean([s['steps_per_second'] for s in runs]):.2f} |"
        )
    seeds = sorted({s["seed"] for s in summaries})
    lines += [
        "",
        f"Seeds {', '.join(map(str, seeds))}; produced by `{command}`. Group oracle: "
        "every predicted group labelled with its true majority class (what perfect "
        f"labelling of these groups would score). All background: "
        f"{all_background_miou(summaries):.1f}.",
    ]
    return "\n".join(lines) + "\n"


def plot(summaries: list[dict], output_dir: pathlib.Path):
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(s["name"] for s in summaries))
    fig = Figure(figsize=(1.2 * len(names) + 2, 3.5))
    ax = fig.subplots()
    for i, name in enumerate(names):
        values = [100 * s["miou"] for s in summaries if s["name"] == name]
        ax.scatter([i] * len(values), values, color=f"C{i}")
        ax.hlines(np.mean(values), i - 0.25, i + 0.25, color=f"C{i}")
    ax.axhline(all_background_miou(summaries), color="gray", linestyle="--", label="all background")
    ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("test mIoU (%)")
    ax.set_title("synthetic world, demo budget")
    fig.tight_layout()
    fig.savefig(output_dir / "miou.png", dpi=100)

    terms = CURVE_TERMS
    fig = Figure(figsize=(5 * len(terms), 3.5))
    axes = fig.subplots(1, len(terms))
    for ax, term in zip(axes, terms):
        for i, name in enumerate(names):
            for s in (s for s in summaries if s["name"] == name):
                points = [(m["step"], m[term]) for m in s["curves"] if term in m]
                if points:
                    ax.plot(
                        *zip(*points),
                        color=f"C{i}",
                        alpha=0.7,
                        label=name
                        if s["seed"] == min(t["seed"] for t in summaries if t["name"] == name)
                        else None,
                    )
        ax.set_xlabel("step")
        ax.set_title(f"{term} loss")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output_dir / "curves.png", dpi=100)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_orbax_logs()
    FLAGS = flags.FLAGS
    names = [n for r in FLAGS.runs for n in (ABLATIONS if r == "ablations" else [r])]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"error: unknown runs {unknown}; known: {', '.join(RUNS)}, ablations")
    extra = {}
    for item in FLAGS.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {item!r} is not key=value")
        extra[key] = parse_value(value)
    output_dir = pathlib.Path(FLAGS.output_dir)
    root = pathlib.Path(FLAGS.workdir_root or output_dir / "runs")
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        summaries = [
            run_one(name, int(seed), extra, root, FLAGS.synthetic_dir)
            for name in names
            for seed in FLAGS.seeds
        ]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    command = " ".join(
        [
            "python -m mixreorg_jax.experiments.synthetic",
            f"--output_dir={FLAGS.output_dir}",
            f"--runs={','.join(FLAGS.runs)}",
            f"--seeds={','.join(FLAGS.seeds)}",
            *(shlex.quote(f"--set={item}") for item in FLAGS.set),
        ]
    )
    (output_dir / "results.json").write_text(
        json.dumps(dict(command=command, runs=summaries), indent=1)
    )
    table = markdown_table(summaries, command)
    (output_dir / "table.md").write_text(table)
    plot(summaries, output_dir)
    print(table)


if __name__ == "__main__":
    app.run(main)
