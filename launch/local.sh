#!/usr/bin/env bash
# The quick start: pre-trains the demo's backbone on the built-in synthetic world's image-level
# labels (configs/backbone.py, once; the stand-in for MixReorg's ImageNet weights, about a
# minute), trains MixReorg (configs/mixreorg.py:demo) from it, then evaluates zero-shot
# segmentation on the world's test split (background threshold picked on validation).
#
# Needs: the package installed (`pip install -e .`). Runs on CPU, GPU or one TPU host.
# Usage:  launch/local.sh [--dry_run] [WORKDIR] [extra train flags, e.g. --config.seed=1]
#   --dry_run   print the commands instead of running them.
# Dry run:
#   $ launch/local.sh --dry_run /tmp/demo
#   python -m mixreorg_jax.train --config configs/backbone.py --workdir ...backbone ...
#   python -m mixreorg_jax.train --config configs/mixreorg.py:demo --workdir /tmp/demo ...
#   python -m mixreorg_jax.evaluate --config configs/eval/synthetic.py ... --output_dir /tmp/demo/eval
set -euo pipefail
# glibc's malloc maps XLA:CPU's per-step buffers in transparent huge pages (mixreorg_jax/cli.py).
export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
cd "$(dirname "$0")/.."
dry_run=0
if [[ "${1:-}" == "--dry_run" ]]; then dry_run=1; shift; fi
workdir="${1:-${WORKDIR:-$PWD/workdirs/mixreorg_demo}}"
shift || true
data_dir="${SYNTHETIC_DIR:-$HOME/tensorflow_datasets/mixreorg_synthetic}"
backbone="${BACKBONE_DIR:-$HOME/tensorflow_datasets/mixreorg_backbone}"

run() {
  printf '%q ' "$@"; echo
  if (( ! dry_run )); then "$@"; fi
}

if [[ ! -e "$backbone/export" ]]; then  # An interrupted pre-training resumes.
  run python -m mixreorg_jax.train --config configs/backbone.py --workdir "$backbone" \
    --config.data.synthetic_dir="$data_dir"
fi
run python -m mixreorg_jax.train --config configs/mixreorg.py:demo --workdir "$workdir" \
  --config.data.synthetic_dir="$data_dir" --config.model_init="$backbone" "$@"
# The world the demo trained on (prepared by then; this only finds its directory).
world_dir="$data_dir"
if (( ! dry_run )); then
  world_dir=$(python -c "from mixreorg_jax.training import config as train_config; from mixreorg_jax.data import synthetic_tfds
c = train_config.from_file('configs/mixreorg.py:demo')
c.data.synthetic_dir = '$data_dir'
print(synthetic_tfds.prepare_synthetic_world(c.data))" | tail -1)
fi
run python -m mixreorg_jax.evaluate --config configs/eval/synthetic.py \
  --config.data_dir="$world_dir" --checkpoint="$workdir" --output_dir="$workdir/eval" \
  --config.save_predictions=8
if (( ! dry_run )); then
  echo "TensorBoard logs: $workdir/tensorboard  (tensorboard --logdir $workdir/tensorboard)"
  echo "Results: $workdir/eval/results.json; mask overlays: $(find "$workdir/eval" -name "*.png" 2>/dev/null | sort | head -1)"
fi
