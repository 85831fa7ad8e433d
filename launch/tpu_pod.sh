#!/usr/bin/env bash
# Trains on a Cloud TPU VM pod slice: creates it (or reuses it), copies this checkout to every
# worker, installs, and runs the same train command on all workers. jax.distributed.initialize()
# picks up the TPU pod environment; the workdir should be on GCS (gs://...).
#
# Needs: gcloud, authenticated, with a project and quota for the accelerator type.
# Usage:  launch/tpu_pod.sh [--dry_run] TPU_NAME ZONE ACCELERATOR_TYPE WORKDIR CONFIG [train flags]
# Dry run (prints the gcloud commands):
#   $ launch/tpu_pod.sh --dry_run my-pod us-central2-b v4-64 gs://bucket/mixreorg configs/mixreorg.py:paper
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry_run" ]]; then dry_run=1; shift; fi
if (( $# < 5 )); then
  echo "usage: $0 [--dry_run] TPU_NAME ZONE ACCELERATOR_TYPE WORKDIR CONFIG [train flags...]" >&2
  exit 2
fi
name=$1 zone=$2 accel=$3 workdir=$4 config=$5; shift 5
version="${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}"
repo="$(cd "$(dirname "$0")/.." && pwd)"

run() {
  printf '%q ' "$@"; echo
  if (( ! dry_run )); then "$@"; fi
}

if (( dry_run )) || ! gcloud compute tpus tpu-vm describe "$name" --zone "$zone" >/dev/null 2>&1; then
  run gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" \
    --version "$version"
fi
archive=/tmp/mixreorg_jax_src.tar.gz
run tar -czf "$archive" -C "$repo" --exclude=.venv --exclude=.git --exclude=workdirs .
run gcloud compute tpus tpu-vm scp "$archive" "$name:~/" --zone "$zone" --worker=all
run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  "mkdir -p ~/mixreorg_jax && tar -xzf ~/mixreorg_jax_src.tar.gz -C ~/mixreorg_jax && cd ~/mixreorg_jax && pip install -q -e . 'jax[tpu]'"
run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  "cd ~/mixreorg_jax && python3 -m mixreorg_jax.train --config $config --workdir $workdir $*"
