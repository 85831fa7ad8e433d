#!/usr/bin/env bash
# Trains on a GPU cluster with SLURM: one process per GPU, all running the same train command.
# jax.distributed.initialize() reads SLURM's environment (coordinator, process count and index).
#
# Needs: sbatch; the package installed in $VENV on every node (shared filesystem); prepared data on
# a shared path or GCS. The workdir must be shared (NFS/Lustre, or gs:// through Orbax/etils).
# Usage:  launch/gpu_slurm.sh [--dry_run] NODES GPUS_PER_NODE WORKDIR CONFIG [train flags...]
# Dry run (prints the sbatch script instead of submitting it):
#   $ launch/gpu_slurm.sh --dry_run 2 8 /shared/mixreorg configs/mixreorg.py:paper
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry_run" ]]; then dry_run=1; shift; fi
if (( $# < 4 )); then
  echo "usage: $0 [--dry_run] NODES GPUS_PER_NODE WORKDIR CONFIG [train flags...]" >&2; exit 2
fi
nodes=$1 gpus=$2 workdir=$3 config=$4; shift 4
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
script=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=mixreorg
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$gpus
#SBATCH --gpus-per-task=1
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=$workdir/slurm-%j.out
source "$venv/bin/activate"
cd "$repo"
srun python -m mixreorg_jax.train --config $config --workdir $workdir $*
SBATCH
)
if (( dry_run )); then echo "$script"; else mkdir -p "$workdir"; echo "$script" | sbatch; fi
