"""The device mesh and how arrays are laid out on it.

The mesh has a `data` axis and an `fsdp` axis over all devices of all processes. The batch is
split over both; parameters and optimiser state are split over `fsdp` (each large parameter along
its largest dimension that divides evenly) and replicated over `data`. With `fsdp=1` this is plain
data parallelism.
"""

import os

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp) mesh over `devices` (default all); `data=-1` takes what `fsdp` leaves."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    fsdp = mesh_config.fsdp
    data = mesh_config.data if mesh_config.data != -1 else n // max(fsdp, 1)
    if fsdp < 1 or data < 1 or data * fsdp != n:
        raise ValueError(
            f"mesh data={mesh_config.data} x fsdp={fsdp} does not cover the {n} devices"
        )
    return jax.make_mesh(
        (data, fsdp), BATCH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 2
    )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_sharding(tree, mesh: jax.sharding.Mesh, min_size: int = 2**14):
    """Per-leaf shardings: big arrays split along their largest dimension divisible by `fsdp`.

    Args:
      tree: a pytree of arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).
      mesh: the mesh; its `fsdp` axis size decides what is split.
      min_size: arrays with fewer elements stay replicated (splitting them costs more than it saves).
    """
    fsdp = mesh.shape["fsdp"]

    def leaf_sharding(x):
        shape = getattr(x, "shape", ())
        if fsdp == 1 or np.prod(shape, dtype=np.int64) < min_size:
            return replicated(mesh)
        for axis in np.argsort(shape)[::-1]:
            if shape[axis] % fsdp == 0:
                spec = [None] * len(shape)
                spec[axis] = "fsdp"
                return NamedSharding(mesh, P(*spec))
        return replicated(mesh)

    return jax.tree.map(leaf_sharding, tree)


def global_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Assembles per-process numpy batches into global arrays split over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def define_distributed_flags():
    """Flags for starting `jax.distributed` by hand (clusters and TPU pods are auto-detected)."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")


def _cluster_has_several_processes() -> bool:
    env = os.environ
    return (
        int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or "JAX_COORDINATOR_ADDRESS" in env
    )


def initialize_distributed():
    """Initialises `jax.distributed` only when there is more than one process.

    Explicit flags win; otherwise SLURM/Open MPI/TPU-pod environments are detected and
    `jax.distributed.initialize()` reads them. On CPU the collectives go through gloo.
    """
    from absl import flags

    fl = flags.FLAGS
    explicit = fl.num_processes is not None and fl.num_processes > 1
    if not explicit and not _cluster_has_several_processes():
        return
    # Only the CPU backend reads this; without it CPU processes cannot run collectives together.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            fl.coordinator_address, num_processes=fl.num_processes, process_id=fl.process_id
        )
    else:
        jax.distributed.initialize()
