"""Bad data and a workdir that cannot be used, through launch.py: one stderr line naming
the path and the fix, exit status 2, nothing compiled (jax's own compile events), the
workdir and the inputs as they were.

The full set of bad data inputs (tests/test_data_errors.py::CASES) is checked at the
library level against ``make_pipeline`` and ``validate``, which ``train.train`` calls
before it writes or compiles anything; here a representative subset goes through the
launcher: each kind of failure (missing, malformed, not UTF-8, a damaged store or
cache, a vocabulary larger than the model's, the size bound)."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import test_data_errors as data_cases
from conftest import Launched

from polyjax import checkpoint as ckpt
from polyjax import train
from polyjax import workdir as wd

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = {"train.steps": 2}
THROUGH_LAUNCH = [
    data_cases._text_missing,
    data_cases._jsonl_without_field,
    data_cases._text_not_utf8,
    data_cases._tokens_meta_garbage,
    data_cases._tokens_shard_truncated,
    data_cases._tokens_vocab_over_model,
    data_cases._vocab_file_over_model,
    data_cases._corpus_over_bound,
    data_cases._cached_shard_garbage,
]


bpe = data_cases.bpe  # the fixture: a BPE-600 tokenizer.json


@pytest.mark.parametrize("case", THROUGH_LAUNCH, ids=[f.__name__[1:] for f in THROUGH_LAUNCH])
def test_bad_data_is_one_line_before_anything_is_written_or_compiled(
    case, tmp_path, bpe, tiny, launch_py, compiled, snapshot
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    kwargs, model_vocab, names, _ = case(inputs, bpe)
    kwargs = {"val_fraction": 0.25, "cache_dir": str(tmp_path / "cache"), **kwargs}
    overrides = {f"data.{k}": v for k, v in kwargs.items()}
    before = snapshot(inputs)
    argv = tiny.argv(**RUN, **overrides, **{"model.vocab_size": model_vocab})
    err = launch_py(*argv, f"--workdir={tmp_path / 'run'}").error(names)
    assert data_cases._fix_named(err), err
    assert compiled() == []
    assert snapshot(inputs) == before and not (tmp_path / "run").exists()


def test_a_store_with_the_default_tokenizer_is_accepted(tmp_path, tiny):
    """A tokens: store carries its tokenizer: the default tokenizer ("bpe", whose
    vocab_size field is larger than the tiny model's vocabulary) takes the store's."""
    store = data_cases._store(tmp_path / "s")  # bytes: 257 tokens <= the model's 264
    spec = tiny.spec(**{"data.source": f"tokens:{store}", "data.tokenizer": "bpe"})
    assert spec.data.vocab_size > spec.model.vocab_size
    assert train.check_inputs(spec, tmp_path / "run") == ckpt.Resume(None, None, [])
    assert not (tmp_path / "run").exists()


def launch_subprocess(*args) -> Launched:
    """``python launch.py ARGS`` as a user runs it: absl's ``app.run`` and its parser,
    not ``launch.run``. jax logs every compile on stderr (``JAX_LOG_COMPILES``), so a
    refusal's one stderr line also says that nothing compiled."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "JAX_LOG_COMPILES": "1"}
    cmd = [sys.executable, str(ROOT / "launch.py"), *map(str, args)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return Launched(result.returncode, result.stdout, result.stderr)


def test_an_unknown_flag_is_one_line():
    err = launch_subprocess("--nosuchflag=1").error()
    assert err == "launch.py: error: Unknown command line flag 'nosuchflag'"


FLAG_CASES = {  # the command line after the tiny config -> what the line names
    "missing_config_with_overrides": (
        ["--config={tmp}/nowhere.py", "--config.train.steps=2", "--config.optim.lr=0.1"],
        ["--config: [Errno 2] No such file or directory", "nowhere.py"],
    ),
    "sweep_over_an_unknown_field": (
        ["--sweep", "train.stpes=1,2"],
        ["--sweep train.stpes=1: unknown config field 'train.stpes'", "train.steps"],
    ),
    "sweep_value_of_the_wrong_type": (
        ["--sweep", "train.steps=2,x"],
        ["--sweep train.steps=x", "--config.train.steps=x", "int"],
    ),
}


@pytest.mark.parametrize("case", FLAG_CASES)
def test_bad_flags_through_absl_are_one_line(case, tmp_path, tiny):
    """A missing config file with overrides (config_flags fails while parsing them)
    and a sweep point that does not parse (a second parse, inside main) are one line,
    exit 2, nothing compiled or written, when run as a user runs them."""
    args, fragments = FLAG_CASES[case]
    args = [a.format(tmp=tmp_path) for a in args]
    result = launch_subprocess(*tiny.argv(), *args, f"--workdir={tmp_path / 'run'}")
    result.error(*fragments)
    assert result.out == "" and sorted(tmp_path.iterdir()) == []


CORPUS_CASES = [data_cases._text_binary, data_cases._text_not_utf8, data_cases._text_too_small]


@pytest.mark.parametrize("case", CORPUS_CASES, ids=[f.__name__[1:] for f in CORPUS_CASES])
def test_a_bad_corpus_is_refused_before_it_is_tokenised(case, tmp_path, tiny, snapshot):
    """A text corpus with a binary or non-UTF-8 file, or too small for one window of a
    split: one line before any tokenising (no "pretokenize:" progress), the cache, the
    workdir and the inputs as they were."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    kwargs, _, names, _ = case(inputs, None)
    kwargs = {**kwargs, "val_fraction": 0.25, "seq_len": 31, "cache_dir": tmp_path / "cache"}
    before = snapshot(inputs)
    argv = tiny.argv(**{f"data.{k}": v for k, v in kwargs.items()})
    err = launch_subprocess(*argv, f"--workdir={tmp_path / 'run'}").error(names)
    assert data_cases._fix_named(err), err
    assert snapshot(inputs) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no cache, no workdir


def _lock(workdir, pid, host=None, age=0.0):
    workdir.mkdir(parents=True, exist_ok=True)
    record = {"host": host or socket.gethostname(), "pid": pid, "command": "launch.py --x"}
    record.update(started=1.0, heartbeat=time.time() - age, token="t")
    (workdir / wd.LOCK).write_text(json.dumps(record))


def test_a_workdir_in_use_is_refused_untouched(tmp_path, tiny, launch_py, compiled, snapshot):
    """A live run holds the lock (here a live process of this host, or another host's
    lock with a fresh heartbeat): the launch names it and touches nothing."""
    saver = ckpt.Checkpointer(tmp_path, every=1, keep=1, async_save=False)
    saver.save(1, {"w": np.zeros(2)}, {}, tiny.spec(**RUN).config)
    saver.close()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for host, pid in ((None, holder.pid), ("node-7", 12345)):
            _lock(tmp_path, pid, host)
            before = snapshot(tmp_path)
            err = launch_py(*tiny.argv(**RUN), f"--workdir={tmp_path}").error("in use by")
            assert f"pid {pid}" in err and "launch.py --x" in err and str(tmp_path / wd.LOCK) in err
            assert compiled() == [] and snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()


def test_stale_locks(tmp_path):
    """A lock is stale when its process is gone (this host) or its heartbeat is old
    (any host); a live one is not."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    record = {"host": socket.gethostname(), "pid": gone.pid, "heartbeat": 1e12}
    assert "is not running" in wd.stale(record)
    assert wd.stale({**record, "pid": os.getpid()}) is None
    assert "heartbeat" in wd.stale({"host": "node-7", "pid": 1, "heartbeat": 1.0})
    assert wd.stale({"host": "node-7", "pid": 1, "heartbeat": 1e12}) is None
    assert wd.stale({}) == "the lock file is unreadable"
    _lock(tmp_path, gone.pid)
    with wd.Lock(tmp_path) as lock:  # taken over
        assert json.loads((tmp_path / wd.LOCK).read_text())["token"] == lock.token
        with pytest.raises(ValueError, match="is in use by"):
            wd.check(tmp_path)
    assert not (tmp_path / wd.LOCK).exists()  # released


def test_checkpoints_of_differing_process_states_are_refused(
    tmp_path, tiny, launch_py, monkeypatch, compiled, snapshot
):
    """Data iterator states are per process; ours are the same on every process (the
    next global batch), so any process count resumes them. States that differ
    (another iterator) can only be resumed by as many processes: refused up front."""
    states = [{"next_batch": 3, "p": 0}, {"next_batch": 3, "p": 1}]
    monkeypatch.setattr(ckpt, "_gather_json", lambda state: states)
    saver = ckpt.Checkpointer(tmp_path, every=1, keep=1, async_save=False)
    saver.save(3, {"w": np.zeros(2)}, {}, tiny.spec(**RUN).config)
    saver.close()
    before = snapshot(tmp_path)
    err = launch_py(*tiny.argv(**RUN), f"--workdir={tmp_path}").error("--num_processes 2")
    assert "checkpoint 3" in err and "written by 2 processes" in err
    assert compiled() == [] and snapshot(tmp_path) == before
