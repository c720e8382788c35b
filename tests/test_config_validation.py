"""Every bad config is refused up front by launch.py: one line naming the field,
exit status 2, nothing built or compiled, a refused workdir left untouched."""

import pathlib

import numpy as np
import pytest

from polyjax import checkpoint as ckpt
from polyjax import sharding as shd
from polyjax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
DENSE = f"{ROOT}/configs/dense.py:size=tiny"
MOE = f"{ROOT}/configs/moe.py:size=tiny"
PATCHED = """
import ml_collections
from configs import dense

def get_config(arg=""):
    d = dense.get_config("size=tiny").to_dict()
    node = d
    *parents, leaf = {path!r}.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = {value!r}
    return ml_collections.ConfigDict(d)
"""

# (overrides on the command line, or a (field, value) patch of the config itself
#  for values the command line cannot express), the fragments of the message.
CASES = [
    (["--config.train.nonfinite=ignore"], "train.nonfinite", "stop, skip"),
    (["--config.train.max_skips=-1"], "train.max_skips", ">= 0"),
    (["--config.train.steps=0"], "train.steps", ">= 1"),
    (["--config.train.steps=ten"], "train.steps", "int"),
    (["--config.optim.lr=-1e-3"], "optim.lr", "> 0"),
    (["--config.optim.lr=inf"], "optim.lr", "finite"),
    (["--config.optim.final_lr=1.0"], "optim.final_lr", "optim.lr"),
    (["--config.optim.eps=0"], "optim.eps", "> 0"),
    (["--config.optim.grad_accum=3"], "global_batch", "grad_accum"),
    (["--config.model.activation.order=0"], "order", ">= 1"),
    (["--config.model.activation.eps=0"], "eps", "> 0"),
    (["--config.model.n_heads=3"], "n_heads", "d_model"),
    (["--config.model.vocab_size=200"], "model.vocab_size", "257"),
    (["--config.data.seq_len=1024"], "data.seq_len", "max_seq_len"),
    (["--config.data.global_batch=12"], "global_batch", "data-parallel"),
    (["--config.mesh.tensor=3"], "mesh"),
    (
        [
            "--config.model.d_model=36",
            "--config.model.n_heads=2",
            "--config.mesh.tensor=8",
            "--config.mesh.data=1",
        ],
        "divisible",
        "tensor",
    ),
    ([f"--config={MOE}", "--config.model.moe.top_k=9"], "moe.top_k", "num_experts"),
    (("optim.lr", "1e-3"), "optim.lr='1e-3'", "expected float"),
    (("train.steps", 10.5), "train.steps=10.5", "expected int"),
    (("model.n_heads", "2"), "model.n_heads='2'", "expected int"),
    (("model.activation.kernel", 1), "model.activation.kernel=1", "expected str"),
    (("train.async_checkpoint", "yes"), "train.async_checkpoint", "expected bool"),
    (("train.nonfinte", "skip"), "unknown", "nonfinte"),
    (("mesh.pipeline", 2), "mesh", "pipeline"),
]


@pytest.fixture
def nothing_built(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built or a run started")

    monkeypatch.setattr(shd, "create_model", refuse)
    monkeypatch.setattr(train, "make_steps", refuse)
    monkeypatch.setattr(train, "train", refuse)


@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c[0])[:60])
def test_bad_config_is_one_line_naming_the_field(case, tmp_path, launch_py, nothing_built):
    change, *fragments = case
    if isinstance(change, tuple):
        path, value = change
        config = tmp_path / "patched.py"
        config.write_text(PATCHED.format(path=path, value=value))
        argv = [f"--config={config}"]
    elif change[0].startswith("--config="):  # another config file
        argv = change
    else:
        argv = [f"--config={DENSE}", *change]
    launch_py(*argv, f"--workdir={tmp_path / 'run'}").error(*fragments)
    assert not (tmp_path / "run").exists()


def test_workdir_with_only_corrupt_checkpoints_is_refused_untouched(
    tmp_path, launch_py, nothing_built
):
    saver = ckpt.Checkpointer(tmp_path, every=1, keep=1, async_save=False)
    saver.save(1, {"w": np.zeros(64)}, {}, {"model": {}, "data": {}})
    saver.close()
    (ckpt.directory(tmp_path) / "1" / ckpt.MARKER).write_text("{garbage")
    before = {
        p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
        for p in tmp_path.rglob("*")
    }
    err = launch_py(f"--config={DENSE}", f"--workdir={tmp_path}").error()
    assert "no intact checkpoint" in err and "step 1: integrity marker unreadable" in err
    after = {
        p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
        for p in tmp_path.rglob("*")
    }
    assert after == before
