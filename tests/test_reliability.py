"""Runs that survive: SIGKILL/SIGTERM and resume, torn checkpoints, non-finite values."""

import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from polyjax import checkpoint as ckpt
from polyjax import metrics as mx
from polyjax import nonfinite, train
from polyjax.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]


def argv(tiny, workdir, **overrides):
    return [*tiny.argv(**overrides), f"--workdir={workdir}"]


def losses(workdir):
    return [(r["step"], r["loss"]) for r in mx.read_jsonl(pathlib.Path(workdir) / mx.JSONL)]


def saved_state(workdir, step):
    """The arrays of a checkpoint's train state, restored without a target."""
    path = ckpt.directory(workdir) / str(step) / "state"
    with ocp.StandardCheckpointer() as c:
        tree = c.restore(path)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree)}


def digest(workdir, step):
    root = ckpt.directory(workdir) / str(step)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _launch(args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(ROOT / "launch.py"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)


def _kill_after_first_checkpoint(proc, workdir, signum, seed):
    first = ckpt.directory(workdir) / "20"
    while not first.is_dir() and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0.0, 0.5))
    proc.send_signal(signum)


def test_killed_runs_resume_to_the_same_result(tmp_path, tiny, launch_py):
    """launch.py processes killed at a random moment after their first checkpoint
    (SIGKILL, SIGTERM), then relaunched with the same command, end with the
    uninterrupted run's losses and parameters, bit for bit. SIGKILL loses at most
    the steps since the last checkpoint; SIGTERM none: it saves at the step it
    stopped and exits 143 with the command that resumes."""
    run = {"train.steps": 80, "train.checkpoint_every": 20, "train.keep_checkpoints": 2}
    seed = random.randrange(1 << 30)
    cuts = {signum: tmp_path / signum.name for signum in (signal.SIGKILL, signal.SIGTERM)}
    procs = {signum: _launch(argv(tiny, workdir, **run)) for signum, workdir in cuts.items()}
    killers = [
        threading.Thread(target=_kill_after_first_checkpoint, args=(procs[s], w, s, seed))
        for s, w in cuts.items()
    ]
    try:
        for k in killers:
            k.start()
        train.train(tiny.spec(**run), tmp_path / "full")  # meanwhile: the uninterrupted run
        errs = {s: p.communicate(timeout=120)[1] for s, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
        for k in killers:
            k.join()
    expected = saved_state(tmp_path / "full", 80)
    for signum, workdir in cuts.items():
        err = errs[signum]
        context = f"{signum.name}, seed {seed}: {err[-3000:]}"
        code = procs[signum].returncode
        assert code == (-signal.SIGKILL if signum == signal.SIGKILL else 143), context
        logged = losses(workdir)[-1][0]
        resume = ckpt.latest(workdir)[0]
        assert 20 <= resume <= logged < run["train.steps"], context
        if signum == signal.SIGTERM:
            assert resume == logged, context  # no step lost
            assert f"stopped by SIGTERM at step {logged}" in err, context
            assert "launch.py" in err.split("resume with:")[1], context
        relaunched = launch_py(*argv(tiny, workdir, **run))  # the same command
        assert relaunched.code == 0 and f"at step {resume}" in relaunched.out, relaunched.err
        assert losses(workdir) == losses(tmp_path / "full"), context
        got = saved_state(workdir, 80)
        assert got.keys() == expected.keys()
        for key in got:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_torn_newest_checkpoint_is_set_aside_and_the_previous_one_resumed(tmp_path, tiny, capsys):
    run = {"train.steps": 6, "train.checkpoint_every": 3}
    train.train(tiny.spec(**run), tmp_path)
    before = losses(tmp_path)
    biggest = max((ckpt.directory(tmp_path) / "6").rglob("*"), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    capsys.readouterr()
    train.train(tiny.spec(**run), tmp_path)
    out, err = capsys.readouterr()
    assert "checkpoint 6 is torn or corrupt" in err and "truncated" in err
    assert "resuming from step 3" in err and "resumed from" in out and "at step 3" in out
    assert (ckpt.directory(tmp_path) / "6.corrupt").is_dir()  # set aside, not deleted
    assert losses(tmp_path) == before  # steps 4..6 retrained, bit for bit
    assert [s for s, _ in ckpt.scan(tmp_path)[0]] == [6, 3]


def _small_state(seed):
    return {"w": np.full((4, 64), seed, np.float32), "step": np.int32(seed)}


def test_integrity_scan_and_keep_last_k(tmp_path):
    """Truncated, garbage and missing items are each found by the scan; keep-last-K
    deletes old steps only once a newer one is complete; an all-corrupt workdir is
    refused with nothing changed."""
    config = {"model": {"d_model": 8}, "data": {}}
    saver = ckpt.Checkpointer(tmp_path, every=1, keep=2, async_save=True)
    for step in (1, 2, 3, 4):
        saver.save(step, _small_state(step), {"i": step}, config)
    saver.close()
    root = ckpt.directory(tmp_path)
    assert sorted(int(p.name) for p in root.iterdir()) == [3, 4]
    assert all((root / s / ckpt.MARKER).is_file() for s in ("3", "4"))
    files = sorted(p for p in (root / "4" / "state").rglob("*") if p.is_file())
    data = max(files, key=lambda p: p.stat().st_size)
    data.write_bytes(b"\x00" * data.stat().st_size)  # garbage, same size
    good, bad = ckpt.scan(tmp_path)
    assert [s for s, _ in good] == [3] and bad[0][0] == 4 and "checksum" in bad[0][1]
    # A torn newest save (step 5, killed before completion) never triggers deletion.
    (root / "5.orbax-checkpoint-tmp-123").mkdir()
    assert ckpt.latest(tmp_path) == (3, config)
    (root / "3" / "data").rename(root / "3" / "data_gone")
    with pytest.raises(ValueError, match="no intact checkpoint") as e:
        ckpt.latest(tmp_path)
    assert "step 4" in str(e.value) and "step 3" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in root.iterdir())[:2] == ["3", "4"]


@pytest.fixture
def poison(monkeypatch):
    """Poison the loss weights (NaN) of the batch with the given 0-based index, in
    the data stream itself, so that a replay of that batch sees it too."""

    def at(index):
        real = pipeline.TrainIterator.__next__

        def poisoned(self):
            position = self._it.get_state()["next_index"]
            batch = real(self)
            if position == index:
                batch = dict(batch, weights=np.full_like(batch["weights"], np.nan))
            return batch

        monkeypatch.setattr(pipeline.TrainIterator, "__next__", poisoned)

    return at


def test_stop_policy_reports_and_keeps_the_last_good_checkpoint(tmp_path, tiny, poison):
    poison(3)  # step 4
    run = {"train.steps": 6, "train.log_every": 2, "train.checkpoint_every": 2}
    with pytest.raises(nonfinite.NonFiniteError) as e:
        train.train(tiny.spec(**run), tmp_path)
    report = str(e.value)
    n = len(jax.tree.leaves(tiny.build(tiny.spec(**run))[2].params))  # NaN weights: every gradient
    assert e.value.step == 4 and "non-finite values at step 4" in report
    assert "(non-finite)" in report and f"non-finite gradient leaves ({n} of {n})" in report
    assert "layers.0" in report and "coeffs.weight" in report and "coeffs.bias" in report
    good, bad = ckpt.scan(tmp_path)
    assert [s for s, _ in good] == [2] and not bad  # 4 never written; 2 intact (marker)
    assert [(r["step"], r["nonfinite"]) for r in mx.read_jsonl(tmp_path / mx.JSONL)] == [
        (2, 0),
        (4, 1),
    ]
    print(report)


def test_skip_policy_skips_the_update_and_goes_on(tmp_path, tiny, poison, capsys):
    poison(3)
    run = {"train.steps": 6, "train.checkpoint_every": 3, "train.nonfinite": "skip"}
    train.train(tiny.spec(**run, **{"train.max_skips": 1}), tmp_path)
    records = {r["step"]: r for r in mx.read_jsonl(tmp_path / mx.JSONL)}
    assert [records[s]["nonfinite"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    assert np.isnan(records[4]["loss"]) and np.isfinite(records[6]["loss"])
    assert "skipped 1 non-finite update(s) by step 4" in capsys.readouterr().err
    assert [s for s, _ in ckpt.scan(tmp_path)[0]] == [6, 3]


def test_the_step_keeps_the_state_on_a_non_finite_update(tiny):
    """Skip: the bad update leaves params and optimizer state as they were, the next
    good one applies; stop: the state stays frozen after the first bad step."""
    run = {"train.steps": 4}
    _, stop_steps, before, batches = tiny.build(tiny.spec(**run))
    _, skip_steps, _, _ = tiny.build(tiny.spec(**run, **{"train.nonfinite": "skip"}))
    good = next(batches)
    bad = dict(good, weights=good["weights"] * np.nan)
    before = jax.device_get(before)
    for steps, after_good_changes in ((skip_steps, True), (stop_steps, False)):
        s1, m1 = steps.train(jax.tree.map(np.copy, before), bad)
        s1 = jax.device_get(s1)
        assert int(s1.step) == 1 and int(s1.nonfinite) == 1 and int(s1.bad_step) == 1
        assert not np.isfinite(float(m1["loss"]))
        for a, b in zip(
            jax.tree.leaves((s1.params, s1.opt_state)),
            jax.tree.leaves((before.params, before.opt_state)),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
        s2, _ = steps.train(s1, good)
        changed = any(
            not np.array_equal(a, b)
            for a, b in zip(
                jax.tree.leaves(jax.device_get(s2.params)),
                jax.tree.leaves(before.params),
                strict=True,
            )
        )
        assert changed == after_good_changes


def test_huge_lr_under_skip_stops_after_max_skips(tmp_path, tiny, launch_py):
    run = {"train.steps": 8, "train.checkpoint_every": 1, "train.nonfinite": "skip"}
    run.update({"train.max_skips": 2, "optim.lr": "1e30", "optim.final_lr": 0})
    result = launch_py(*argv(tiny, tmp_path, **run))
    assert result.code == 3, result.err
    good, bad = ckpt.scan(tmp_path)
    counts = {r["step"]: r["nonfinite"] for r in mx.read_jsonl(tmp_path / mx.JSONL)}
    third = min(s for s, n in counts.items() if n == 3)  # the skip that went over the limit
    assert "more than train.max_skips=2" in result.err
    assert f"non-finite values at step {third}:" in result.err
    assert not bad and max(s for s, _ in good) == max(s for s, n in counts.items() if n <= 2)
    for step, _ in good:
        state = saved_state(tmp_path, step)
        assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f")
