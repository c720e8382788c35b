"""Shared fixtures: eight host CPU devices (set before anything imports jax), the tiny
configs (``tiny``), the launcher run in this process (``launch_py``) or as local
processes (``launch_processes``), the shared trained runs (``trained``,
``two_processes``), jax's compilations since a test began (``compiled``) and a
directory's contents (``snapshot``)."""

import fcntl
import os

# The tests run on the CPU; with libtpu and the CUDA plugin installed (the aot extra,
# for tests/test_aot.py) jax would otherwise try to start a TPU and a GPU first.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["XLA_FLAGS"] = flags.strip()

import dataclasses
import pathlib
import random
import socket
import subprocess
import sys

import jax
import jax.monitoring
import pytest
from flax import nnx

import launch
from configs import dense, moe
from polyjax import sharding as shd
from polyjax import train
from polyjax.config import Spec
from polyjax.data import make_pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The tests run as on a workstation, under no cluster launcher (polyjax.cluster reads
# these when the launcher starts; the tests of it set their own).
LAUNCHERS = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "JAX_COORDINATOR", "TPU_WORKER", "MEGASCALE_")
for name in [n for n in os.environ if n.startswith(LAUNCHERS)]:
    del os.environ[name]


FAST = {  # the tiny size made faster still
    "train.log_every": 1,
    "train.eval_every": 0,
    "train.eval_batches": 1,
    "data.seq_len": 16,
    "data.global_batch": 8,
    "optim.warmup_steps": 2,
}
FAMILIES = {"dense": dense, "moe": moe}


class Tiny:
    """The tiny configs (``configs/<family>.py:size=tiny``) with ``FAST``, then the
    test's overrides (``**{"train.steps": 6}``). ``config``, ``spec`` and the
    launcher's flags (``argv``) all describe the same run."""

    def config(self, family: str = "dense", **overrides):
        cfg = FAMILIES[family].get_config("size=tiny")
        cfg.lock()  # a misspelt override is an error
        cfg.update_from_flattened_dict({**FAST, **overrides})
        return cfg

    def spec(self, family: str = "dense", **overrides) -> Spec:
        return Spec.from_config(self.config(family, **overrides))

    def argv(self, family: str = "dense", **overrides) -> list[str]:
        flags = [f"--config.{k}={v}" for k, v in {**FAST, **overrides}.items()]
        return [f"--config={ROOT}/configs/{family}.py:size=tiny", *flags]

    def build(self, spec: Spec):
        """What ``train.train`` builds for ``spec`` before its loop: (graphdef, the
        jitted steps, the initial state, an iterator over its global batches)."""
        model = shd.create_model(spec.model, spec.mesh, spec.rules, spec.train.seed)
        steps = train.make_steps(spec, model)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        state = steps.init(params, rest)
        pipeline = make_pipeline(
            spec.data, process_index=jax.process_index(), process_count=jax.process_count()
        )
        batches = (shd.put_batch(b, steps.batch_sharding) for b in pipeline.train_iter())
        return graphdef, steps, state, batches


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    return Tiny()


@dataclasses.dataclass
class Launched:
    """What a launcher run gave: its exit status, stdout and stderr."""

    code: int
    out: str
    err: str

    def error(self, *fragments: str) -> str:
        """Assert a refusal: exit status 2 and one stderr line holding ``fragments``."""
        err = self.err.strip()
        assert self.code == 2, (self.code, err)
        assert err.startswith("launch.py: error:") and "\n" not in err, err
        for fragment in fragments:
            assert fragment in err, err
        return err


@pytest.fixture
def launch_py(capsys):
    """``launch_py(*args)``: ``python launch.py ARGS`` run in this process (absl's
    flags are global: ``launch.run`` parses afresh each time)."""

    def call(*args) -> Launched:
        capsys.readouterr()
        code = launch.run([str(a) for a in args])
        out, err = capsys.readouterr()
        return Launched(code, out, err)

    yield call
    launch.FLAGS.unparse_flags()


# jax reports each executable it compiles: the evidence that a refused run compiled
# nothing (abstract evaluation, e.g. the config's shape checks, compiles nothing). The
# listener stays registered for the session.
_COMPILED: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: (
        _COMPILED.append(event) if event.endswith("/backend_compile_duration") else None
    )
)


@dataclasses.dataclass(frozen=True)
class Trained:
    """A finished tiny run in ``path`` (the overrides ``run``): copy it, never change it."""

    path: pathlib.Path
    run: dict


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny) -> Trained:
    """A tiny run of 6 steps with checkpoints at 3 and 6, shared by the tests that
    damage, resume or move a copy of it (one compile for all of them)."""
    run = {"train.steps": 6, "train.checkpoint_every": 3, "train.keep_checkpoints": 3}
    path = tmp_path_factory.mktemp("trained") / "run"
    train.train(tiny.spec(**run), path)
    return Trained(path, run)


def launch_processes(argvs: list[list], envs: list[dict], timeout: float = 300) -> list[str]:
    """``python launch.py ARGV`` for each ARGV of ``argvs``, each with its environment of
    ``envs`` over this one (one host device each), as local CPU processes run together;
    their outputs. Asserts that all exit 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), *map(str, argv)],
            cwd=ROOT,
            env={**env, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for argv, extra in zip(argvs, envs, strict=True)
    ]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:  # a hung collective ignores SIGTERM
            p.kill()
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(o[-2000:] for o in outs)
    return outs


def free_port(low: int = 0, high: int = 0) -> int:
    """A port of 127.0.0.1 that is free now: the kernel's choice, or one in [low, high]."""
    for port in random.sample(range(low, high + 1), high - low + 1) if low else [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in [{low}, {high}]")


@pytest.fixture(scope="session")
def two_processes(tmp_path_factory, tiny) -> Trained:
    """The ``trained`` run's config trained by two local CPU processes (one device
    each) joined by the explicit flags (``--coordinator 127.0.0.1:PORT
    --num_processes 2 --process_id I``): the reference of every multi-process
    launch. Run once for all of the session's xdist workers."""
    run = {"train.steps": 6, "train.checkpoint_every": 3, "train.keep_checkpoints": 3}
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # an xdist worker: the session's folder
        shared = shared.parent
    path = shared / "two_processes" / "run"
    with open(shared / "two_processes.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker trains, the others wait for it
        if not (path.parent / "done").exists():
            argv = [*tiny.argv(**run), "--workdir", path, "--num_processes", "2"]
            argv += ["--coordinator", f"127.0.0.1:{free_port()}"]
            launch_processes([[*argv, "--process_id", i] for i in range(2)], [{}, {}])
            (path.parent / "done").write_text("")
    return Trained(path, run)


@pytest.fixture
def compiled():
    """``compiled()``: the executables jax compiled since the test began (its events)."""
    start = len(_COMPILED)
    return lambda: _COMPILED[start:]


@pytest.fixture
def snapshot():
    """``snapshot(root)``: every path under ``root`` -> (mtime, bytes of a file);
    None when ``root`` does not exist."""

    def take(root):
        root = pathlib.Path(root)
        if not root.exists():
            return None
        return {
            str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))
        }

    return take
