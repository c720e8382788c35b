"""A workdir on a bucket (``gs://``): every file of a run goes through etils epath (and
Orbax's TensorStore for the arrays), so a fake GCS backed by a local directory takes
the same code path as the real one.

The fake: fsspec's implementation of ``gs://`` (the one epath uses when TensorFlow is
absent) is replaced by a directory file system over a temporary directory that, like
GCS, cannot append to a file; Orbax's two calls to Google's clients (TensorStore's GCS
kvstore path, the hierarchical-namespace check) are pointed at the same directory."""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry as fsspec_registry
from orbax.checkpoint._src.path import gcs_utils
from orbax.checkpoint._src.serialization import tensorstore_utils

from polyjax import checkpoint as ckpt
from polyjax import metrics as mx
from polyjax import workdir as wd

RUN = "gs://bucket/run"


class FakeGCS(DirFileSystem):
    """``gs://bucket/x`` is ``<root>/bucket/x``; appending is refused, as on GCS."""

    protocol = ("gs", "gcs")
    cachable = False
    root = ""

    def __init__(self, *args, **kwargs):
        super().__init__(path=self.root, fs=LocalFileSystem())

    def open(self, path, mode="rb", *args, **kwargs):
        if "a" in mode:
            raise NotImplementedError("GCS objects cannot be appended to")
        return super().open(path, mode, *args, **kwargs)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The local directory behind ``gs://`` for this test; the working directory is
    another one, which must stay empty (nothing may treat a URI as a local path)."""
    root = tmp_path / "gcs"
    root.mkdir()
    monkeypatch.setattr(FakeGCS, "root", str(root))
    for name in ("gs", "gcs"):
        monkeypatch.setitem(fsspec_registry, name, FakeGCS)  # as register_implementation
    epath.backend.fsspec_backend._get_filesystem.cache_clear()
    normalize = tensorstore_utils._normalize_path
    local = lambda p: normalize(f"{root}/{str(p)[5:]}" if str(p).startswith("gs://") else p)
    monkeypatch.setattr(tensorstore_utils, "_normalize_path", local)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    monkeypatch.setattr(wd, "RACE_PAUSE_S", 0.0)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root
    assert not any(cwd.iterdir())
    epath.backend.fsspec_backend._get_filesystem.cache_clear()


def test_the_fake_is_gcs_through_epath(bucket):
    path = wd.path(f"{RUN}/x.txt")
    assert wd.is_remote(path) and os.fspath(path) == f"{RUN}/x.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("one")
    assert (bucket / "bucket" / "run" / "x.txt").read_text() == "one"
    with pytest.raises(NotImplementedError):
        path.open("a")


def test_checkpoints_locks_and_metrics_on_a_bucket(bucket):
    """Save (asynchronously, marked in the background), scan, verify, restore, set
    aside, lock and log through ``gs://``."""
    config = {"model": {"d_model": 8}, "data": {}}
    state = {"w": np.arange(64, dtype=np.float32).reshape(4, 16), "step": np.int32(2)}
    with wd.Lock(RUN):
        saver = ckpt.Checkpointer(RUN, every=1, keep=2, async_save=True)
        for step in (1, 2, 3):
            saver.save(step, {**state, "step": np.int32(step)}, {"i": step}, config)
        saver.close()
        with pytest.raises(ValueError, match="is in use by another run"):
            wd.check(RUN)
        with mx.Writer(RUN, 0) as writer:
            for step in (1, 2):
                writer.write(step, {"loss": 1.0 / step})
    local = bucket / "bucket" / "run"
    assert sorted(p.name for p in (local / "checkpoints").iterdir()) == ["2", "3"]
    assert (local / "checkpoints" / "3" / "commit_success.txt").is_file()  # GCS commits
    assert (local / "checkpoints" / "3" / ckpt.MARKER).is_file()
    assert not (local / wd.LOCK).exists()
    assert [r["step"] for r in mx.read_jsonl(f"{RUN}/{mx.JSONL}")] == [1, 2]
    assert any(p.name.startswith("events") for p in (local / "tensorboard").iterdir())
    assert ckpt.latest(RUN) == (3, config)
    loader = ckpt.Checkpointer(RUN, every=1, keep=2, async_save=False)
    restored, data = loader.restore(3, jax.tree.map(jnp.zeros_like, state))
    loader.close()
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert int(restored["step"]) == 3 and data == {"i": 3}
    shard = max((local / "checkpoints" / "3" / "state").rglob("d/*"), key=os.path.getsize)
    shard.write_bytes(bytes(shard.stat().st_size))
    found = ckpt.find_resume(RUN, config)
    assert found.step == 2 and found.bad[0][0] == 3 and "checksum" in found.bad[0][1]
    ckpt.set_aside(RUN, found.bad, found.step)
    assert (local / "checkpoints" / "3.corrupt").is_dir()


def test_a_run_resumes_on_a_bucket_bit_for_bit(bucket, tiny, trained, launch_py):
    """The shared local run's checkpoint 3, copied into the bucket: launch.py with
    ``--workdir gs://...`` resumes it, trains, saves and logs there, and ends with
    the local run's losses and state, bit for bit."""
    local = bucket / "bucket" / "run"
    shutil.copytree(pathlib.Path(ckpt.directory(trained.path)) / "3", local / "checkpoints" / "3")
    records = [r for r in mx.read_jsonl(trained.path / mx.JSONL) if r["step"] <= 3]
    (local / mx.JSONL).write_text("".join(json.dumps(r) + "\n" for r in records))
    result = launch_py(*tiny.argv(**trained.run), f"--workdir={RUN}")
    assert result.code == 0, result.err
    assert f"resumed from {RUN}/checkpoints at step 3" in result.out
    for name in ("config.json", "summary.json", mx.PLOT, mx.JSONL):
        assert (local / name).stat().st_size > 0, name
    assert any(p.name.startswith("events") for p in (local / "tensorboard").iterdir())
    assert not (local / wd.LOCK).exists()
    losses = lambda path: [(r["step"], r["loss"]) for r in mx.read_jsonl(path / mx.JSONL)]
    assert losses(epath.Path(RUN)) == losses(trained.path)
    assert [s for s, _ in ckpt.scan(RUN, full=True)[0]] == [6, 3]
    with ocp.StandardCheckpointer() as c:
        got = c.restore(local / "checkpoints" / "6" / "state")
        expected = c.restore(pathlib.Path(ckpt.directory(trained.path)) / "6" / "state")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
