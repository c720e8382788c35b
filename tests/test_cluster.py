"""Multi-process launches without flags (polyjax.cluster): the launcher's environment
read as jax reads it, two processes started by a SLURM-like or Open-MPI-like
environment train the run that the explicit flags give, and a cluster of one process
trains alone."""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import free_port, launch_processes
from jax._src import clusters

from polyjax import checkpoint as ckpt
from polyjax import cluster
from polyjax import metrics as mx

# jax's SLURM and Open MPI (< 5) detectors derive the coordinator's port from the job id:
# SLURM 61440 + job % 4096; Open MPI 61440 + (job // 4096) % 4096.
PORTS = (61440, 65535)


def slurm(rank: int, size: int, port: int) -> dict:
    """What ``srun`` sets for task ``rank`` of ``size`` on one node (127.0.0.1)."""
    return {
        "SLURM_JOB_ID": str(port - PORTS[0]),
        "SLURM_STEP_NODELIST": "127.0.0.1",
        "SLURM_NTASKS": str(size),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
    }


def open_mpi(rank: int, size: int, port: int) -> dict:
    """What Open MPI 4's ``mpirun`` sets for rank ``rank`` of ``size`` on 127.0.0.1."""
    job = (port - PORTS[0]) * 4096
    return {
        "OMPI_MCA_orte_hnp_uri": f"{job}.0;tcp://127.0.0.1:{free_port()}",
        "OMPI_COMM_WORLD_SIZE": str(size),
        "OMPI_COMM_WORLD_RANK": str(rank),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(rank),
    }


def mpich(rank: int, size: int, port: int) -> dict:
    """What MPICH's (Hydra's) ``mpiexec`` sets."""
    return {"PMI_RANK": str(rank), "PMI_SIZE": str(size), "PMI_FD": "9"}


LAUNCHERS = {"SLURM": slurm, "Open MPI": open_mpi}


def jax_reads(env: dict, monkeypatch) -> tuple:
    """(coordinator, process count, process id) as ``jax.distributed.initialize()``
    would find them in ``env``."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    found = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, 10
    )
    return found[:3]


@pytest.mark.parametrize("launcher", [*LAUNCHERS, "MPICH"])
@pytest.mark.parametrize("fallback", [False, True], ids=["jax's detectors", "fallback"])
def test_detect_reads_the_launcher_as_jax_does(launcher, fallback, monkeypatch):
    """Each launcher's environment gives the process count and id that jax's own
    detection reads (MPICH: jax's mpi4py method; here its variables), also when jax's
    private detectors cannot be imported (``fallback``)."""
    if fallback:
        monkeypatch.setattr(cluster, "_jax_detectors", lambda: [])
    assert cluster.detect() is None
    make = {**LAUNCHERS, "MPICH": mpich}[launcher]
    env = make(rank=1, size=3, port=61441)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    found = cluster.detect()
    assert found is not None and found.name == launcher
    assert (found.processes, found.process_id) == (3, 1)
    if launcher == "MPICH":
        assert found.method == "mpi4py"
    else:
        coordinator, count, rank = jax_reads(env, monkeypatch)
        assert coordinator == "127.0.0.1:61441" and (count, rank) == (3, 1)
        method = {"SLURM": "slurm", "Open MPI": "ompi"}[launcher]
        assert found.method == (None if fallback else method)


def test_a_partial_slurm_environment_is_no_cluster(monkeypatch):
    """A shell on a node of an allocation (ssh, salloc) has the job's variables but
    no step's: it is no cluster launch, for jax and for us."""
    for name, value in slurm(rank=0, size=2, port=61441).items():
        if name != "SLURM_STEP_NODELIST":
            monkeypatch.setenv(name, value)
    assert cluster.detect() is None
    assert jax_reads({}, monkeypatch)[1] is None
    monkeypatch.setattr(cluster, "_jax_detectors", lambda: [])
    assert cluster.detect() is None


def _state(workdir: pathlib.Path, step: int):
    """A checkpoint's whole train state, on this process's first device (it was saved
    by two processes: Orbax needs the target's shardings)."""
    path = pathlib.Path(ckpt.directory(workdir)) / str(step) / "state"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as c:
        saved = c.metadata(path)
        saved = getattr(saved, "item_metadata", saved)
        return c.restore(
            path,
            jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved),
        )


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_launch_by_the_cluster_equals_the_explicit_run(launcher, tmp_path, tiny, two_processes):
    """Two local processes started with a launcher's environment (no multi-host flag)
    join as one run: the losses and the final state (parameters, optimizer, step) are
    those of the run joined by --coordinator/--num_processes/--process_id, bit for
    bit; each process says at start which cluster it found."""
    port = free_port(*PORTS)
    envs = [LAUNCHERS[launcher](rank=i, size=2, port=port) for i in range(2)]
    argv = [*tiny.argv(**two_processes.run), f"--workdir={tmp_path / 'run'}"]
    outs = launch_processes([argv, argv], envs)
    for i, out in enumerate(outs):
        assert f"launch.py: {launcher}: process {i} of 2 (jax.distributed)\n" in out, out
    losses = lambda path: [(r["step"], r["loss"]) for r in mx.read_jsonl(path / mx.JSONL)]
    assert losses(tmp_path / "run") == losses(two_processes.path)
    assert [s for s, _ in losses(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    data = pathlib.Path(ckpt.directory(tmp_path / "run")) / "6" / "data" / "metadata"
    assert len(json.loads(data.read_text())["process_states"]) == 2  # one run of two processes
    got, expected = _state(tmp_path / "run", 6), _state(two_processes.path, 6)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_cluster_of_one_process_trains_alone(tmp_path, tiny, trained, launch_py, monkeypatch):
    """``srun -n 1``: one process starts no jax.distributed (here it could not: this
    process's backend is up) and keeps its devices; the run is the single-process one."""
    for name, value in slurm(rank=0, size=1, port=61441).items():
        monkeypatch.setenv(name, value)
    result = launch_py(*tiny.argv(**trained.run), f"--workdir={tmp_path / 'run'}")
    assert result.code == 0, result.err
    assert result.out.startswith("launch.py: SLURM: 1 process; no jax.distributed"), result.out
    read = lambda path: [(r["step"], r["loss"]) for r in mx.read_jsonl(path / mx.JSONL)]
    assert read(tmp_path / "run") == read(trained.path)
    assert jax.process_count() == 1 and jax.device_count() == 8


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is not None, reason="mpi4py is here")
def test_mpich_without_mpi4py_is_one_line(tmp_path, tiny, launch_py, monkeypatch):
    for name, value in mpich(rank=0, size=2, port=0).items():
        monkeypatch.setenv(name, value)
    launch_py(*tiny.argv(), f"--workdir={tmp_path / 'run'}").error("MPICH", "pip install mpi4py")
    assert not (tmp_path / "run").exists()
