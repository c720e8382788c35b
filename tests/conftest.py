"""Shared fixtures: eight host CPU devices (set before anything imports jax), the tiny
configs (``tiny``), the launcher run in this process (``launch_py``), jax's
compilations since a test began (``compiled``) and a directory's contents
(``snapshot``)."""

import os

# The tests run on the CPU; with libtpu and the CUDA plugin installed (the aot extra,
# for tests/test_aot.py) jax would otherwise try to start a TPU and a GPU first.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["XLA_FLAGS"] = flags.strip()

import dataclasses
import pathlib

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
