"""Multi-process start-up: which cluster launcher started this process, and
``jax.distributed.initialize`` from it.

``detect()`` asks jax's own detectors (``jax._src.clusters``: the ones
``jax.distributed.initialize()`` tries, in its order) whether their launcher's
environment is present: SLURM (``srun``), Open MPI (``mpirun``), Cloud TPU on
GKE or a TPU VM. MPICH and Intel MPI (``mpiexec``/Hydra: ``PMI_RANK``,
``PMI_SIZE``) come last; jax reaches them through mpi4py. Should jax's private
module move, the same launchers are recognised by their variables.

A cluster of one process starts no ``jax.distributed``: there is no one to meet,
the coordinator's port (derived from the job id on SLURM) could collide with
another one-task step of the job on the same node, and jax would narrow the
process to the one GPU of its local rank where it can use all of the node's.
"""

from __future__ import annotations

import dataclasses
import os

import jax

# jax's detectors by their ``name`` (its ``cluster_detection_method``), as said at start-up
NAMES = {
    "ompi": "Open MPI",
    "slurm": "SLURM",
    "gketpu": "Cloud TPU (GKE)",
    "gcetpu": "Cloud TPU VM",
}
MPICH = ("PMI_SIZE", "PMI_RANK")  # MPICH/Intel MPI's mpiexec; jax's "mpi4py" method
# Without jax's detectors, their variables: the process count and rank first, all set
FALLBACK = {
    "ompi": ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    "slurm": (
        "SLURM_NTASKS",
        "SLURM_PROCID",
        "SLURM_JOB_ID",
        "SLURM_STEP_NODELIST",
        "SLURM_LOCALID",
    ),
}
# Set on a pod whose launcher jax reads but that no detector above names
POD_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A launcher's view of this process: ``method`` is the
    ``cluster_detection_method`` that ``jax.distributed.initialize`` takes (None:
    its own search)."""

    name: str
    method: str | None
    processes: int
    process_id: int


def _jax_detectors() -> list:
    """jax's cluster detectors that ``initialize()`` tries by itself and ``NAMES``
    names, in jax's order; [] if jax's private module has moved."""
    try:
        from jax._src import clusters

        kinds = clusters.ClusterEnv._cluster_types
    except (ImportError, AttributeError):
        return []
    return [
        k
        for k in kinds
        if getattr(k, "name", None) in NAMES and not getattr(k, "opt_in_only_method", False)
    ]


def detect() -> Cluster | None:
    """The launcher this process runs under, or None. ValueError (one line) when a
    launcher is found but cannot say how many processes it started."""
    detectors = _jax_detectors()
    for kind in detectors:
        name = NAMES[kind.name]
        try:
            if kind.is_env_present():
                return Cluster(name, kind.name, kind.get_process_count(), kind.get_process_id())
        except Exception as e:  # e.g. Open MPI 5 without mpi4py, a metadata server down
            raise ValueError(
                f"{name} found, but jax cannot read its processes ({' '.join(str(e).split())}); "
                "pip install mpi4py for Open MPI 5, or give --coordinator, --num_processes "
                "and --process_id"
            ) from None
    if not detectors:
        for method, needed in FALLBACK.items():
            if all(v in os.environ for v in needed):
                return Cluster(NAMES[method], None, _int(needed[0]), _int(needed[1]))
    if all(v in os.environ for v in MPICH):
        return Cluster("MPICH", "mpi4py", _int(MPICH[0]), _int(MPICH[1]))
    return None


def _int(variable: str) -> int:
    try:
        return int(os.environ[variable])
    except ValueError:
        raise ValueError(f"${variable}={os.environ[variable]!r}: expected an integer") from None


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> str:
    """``jax.distributed.initialize`` from the flags when given (all three), else
    from the cluster ``detect`` finds (more than one process), else from
    ``POD_ENV``; nothing otherwise. Returns the line that says what it did ("" when
    no cluster or flag was found). ValueError: a bad combination of flags, an
    unreadable launcher, or MPICH without mpi4py."""
    given = (coordinator, num_processes, process_id)
    if any(v is not None for v in given) and any(v is None for v in given):
        raise ValueError("--coordinator, --num_processes and --process_id go together")
    if coordinator is not None:
        _start(coordinator, num_processes, process_id)
        return f"--coordinator {coordinator}: process {process_id} of {num_processes}"
    found = detect()
    if found is None:
        pod = [v for v in POD_ENV if os.environ.get(v)]
        if not pod:
            return ""
        _start()
        return f"${pod[0]} set: process {jax.process_index()} of {jax.process_count()}"
    if found.processes <= 1:
        return (
            f"{found.name}: 1 process; no jax.distributed (one process needs no "
            "coordinator and keeps every local device)"
        )
    if found.method == "mpi4py":
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            raise ValueError(
                f"{found.name} found ({found.processes} processes), but jax reaches it "
                "through mpi4py: pip install mpi4py, or give --coordinator, "
                "--num_processes and --process_id"
            ) from None
    _start(cluster_detection_method=found.method)
    return f"{found.name}: process {found.process_id} of {found.processes} (jax.distributed)"


def _start(*args, **kwargs) -> None:
    # CPU processes need a collectives implementation (no effect on GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(*args, **kwargs)
