"""Runs that survive: SIGKILL/SIGTERM and resume, a second launch, every damaged file
of a checkpoint, a checkpoint holding a NaN, a failed save, non-finite values."""

import contextlib
import errno
import json
import os
import pathlib
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils.epath import testing as epath_testing
from flax import nnx

from polyjax import checkpoint as ckpt
from polyjax import metrics as mx
from polyjax import nonfinite, train
from polyjax import workdir as wd
from polyjax.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]


def argv(tiny, workdir, **overrides):
    return [*tiny.argv(**overrides), f"--workdir={workdir}"]


def losses(workdir):
    return [(r["step"], r["loss"]) for r in mx.read_jsonl(pathlib.Path(workdir) / mx.JSONL)]


def step_dir(workdir, step) -> pathlib.Path:
    return pathlib.Path(ckpt.directory(workdir)) / str(step)


def saved_state(workdir, step):
    """The arrays of a checkpoint's train state, restored without a target."""
    with ocp.StandardCheckpointer() as c:
        tree = c.restore(step_dir(workdir, step) / "state")
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree)}


def files(workdir, step):
    root = step_dir(workdir, step)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def assert_same_state(got, expected):
    assert got.keys() == expected.keys()
    for key in got:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def _launch(args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(ROOT / "launch.py"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"{path} never appeared"


FIRST = 40  # the first checkpoint's step in the kill test


def _kill_after_first_checkpoint(proc, workdir, signum, seed, go):
    go.wait()
    # The first checkpoint counts once its marker is written (after Orbax commits, in
    # the background): a kill before that leaves no intact checkpoint to resume from.
    first = step_dir(workdir, FIRST) / ckpt.MARKER
    while not first.exists() and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0.0, 0.3))
    proc.send_signal(signum)


def test_killed_runs_resume_to_the_same_result(tmp_path, tiny, launch_py, compiled):
    """launch.py processes killed at a random moment after their first checkpoint
    (SIGKILL, SIGTERM), then relaunched with the same command, end with the
    uninterrupted run's losses and parameters, bit for bit. SIGKILL loses at most
    the steps since the last checkpoint; SIGTERM none: it saves at the step it
    stopped and exits 143 with the command that resumes. While they run, a second
    launch on their workdir is refused naming them; after a SIGKILL, the relaunch
    takes over the dead run's lock."""
    # Saves do not block the loop: at least 4 x FIRST steps and 3 saves follow the first
    # checkpoint's appearance, so the signal lands before the end.
    run = {"train.steps": 6 * FIRST, "train.checkpoint_every": FIRST, "train.keep_checkpoints": 2}
    seed = random.randrange(1 << 30)
    cuts = {signum: tmp_path / signum.name for signum in (signal.SIGKILL, signal.SIGTERM)}
    procs = {signum: _launch(argv(tiny, workdir, **run)) for signum, workdir in cuts.items()}
    go = threading.Event()
    killers = [
        threading.Thread(target=_kill_after_first_checkpoint, args=(procs[s], w, s, seed, go))
        for s, w in cuts.items()
    ]
    try:
        for k in killers:
            k.start()
        for signum, workdir in cuts.items():  # the lock is taken before anything compiles
            _wait_for(workdir / wd.LOCK, procs[signum])
            second = launch_py(*argv(tiny, workdir, **run))
            second.error("is in use by another run", f"pid {procs[signum].pid}", "launch.py")
        assert compiled() == []
        go.set()
        train.train(tiny.spec(**run), tmp_path / "full")  # meanwhile: the uninterrupted run
        errs = {s: p.communicate(timeout=120)[1] for s, p in procs.items()}
    finally:
        go.set()
        for p in procs.values():
            p.kill()
        for k in killers:
            k.join()
    expected = saved_state(tmp_path / "full", 6 * FIRST)
    for signum, workdir in cuts.items():
        err = errs[signum]
        context = f"{signum.name}, seed {seed}: {err[-3000:]}"
        code = procs[signum].returncode
        assert code == (-signal.SIGKILL if signum == signal.SIGKILL else 143), context
        logged = losses(workdir)[-1][0]
        resume = ckpt.latest(workdir)[0]
        assert FIRST <= resume <= logged < run["train.steps"], context
        if signum == signal.SIGTERM:
            assert resume == logged, context  # no step lost
            assert f"stopped by SIGTERM at step {logged}" in err, context
            assert "launch.py" in err.split("resume with:")[1], context
            assert not (workdir / wd.LOCK).exists()  # released on the way out
        relaunched = launch_py(*argv(tiny, workdir, **run))  # the same command
        assert relaunched.code == 0 and f"at step {resume}" in relaunched.out, relaunched.err
        if signum == signal.SIGKILL:
            stale = f"process {procs[signum].pid} on"
            assert "took over the stale lock" in relaunched.err and stale in relaunched.err
        assert losses(workdir) == losses(tmp_path / "full"), context
        assert_same_state(saved_state(workdir, 6 * FIRST), expected)


def test_every_damaged_file_of_the_newest_checkpoint_sends_the_run_back(
    tmp_path, tiny, trained, launch_py, snapshot
):
    """Same-size garbage in each file of the newest checkpoint (the marker included),
    one at a time: the checks before anything compiles name the file and pick the
    previous step, touching nothing. Then, through launch.py, a newest checkpoint
    without its marker and with a garbage file (a save killed while it was being
    written, then damaged): set aside with a warning, and the run resumes from the
    previous step, bit for bit the uninterrupted run."""
    work = tmp_path / "run"
    shutil.copytree(trained.path, work)
    spec = tiny.spec(**trained.run)
    newest = step_dir(work, 6)
    names = sorted(str(p.relative_to(newest)) for p in newest.rglob("*") if p.is_file())
    assert ckpt.MARKER in names and any(n.startswith("state/") for n in names)
    rng = np.random.default_rng(0)
    for name in names:
        path = newest / name
        original = path.read_bytes()
        garbage = rng.integers(0, 256, len(original), np.uint8).tobytes()
        path.write_bytes(garbage if garbage != original else bytes(len(original)))
        before = snapshot(work)
        found = train.check_inputs(spec, work)
        assert found.step == 3 and [s for s, _ in found.bad] == [6], name
        why = found.bad[0][1]
        assert (name in why) if name != ckpt.MARKER else ("marker unreadable" in why), why
        assert snapshot(work) == before  # read only
        path.write_bytes(original)
    assert train.check_inputs(spec, work).step == 6  # the copy is whole again

    (newest / ckpt.MARKER).unlink()
    data_file = max(newest.glob("state/**/d/*"), key=lambda p: p.stat().st_size)
    damaged = rng.integers(0, 256, data_file.stat().st_size, np.uint8).tobytes()
    data_file.write_bytes(damaged)
    result = launch_py(*argv(tiny, work, **trained.run))
    assert result.code == 0, result.err
    assert "checkpoint 6 is damaged (no integrity marker" in result.err
    assert "resuming from step 3" in result.err and "at step 3" in result.out
    aside = pathlib.Path(ckpt.directory(work)) / "6.corrupt"
    assert (aside / data_file.relative_to(newest)).read_bytes() == damaged  # kept, not deleted
    assert losses(work) == losses(trained.path)  # steps 4..6 retrained, bit for bit
    assert_same_state(saved_state(work, 6), saved_state(trained.path, 6))


def test_a_checkpoint_holding_a_nan_is_never_restored(tmp_path, tiny, trained, launch_py, capsys):
    """A step whose files match its marker but whose state holds a NaN (an Adam moment):
    inference skips it with a warning and moves nothing; training resumes from the
    step before, sets it aside, and saves a finite state in its place."""
    work = tmp_path / "run"
    shutil.copytree(trained.path, work)
    spec = tiny.spec(**trained.run)
    with ocp.StandardCheckpointer() as c:
        raw = c.restore(step_dir(work, 6) / "state")
    flat, treedef = jax.tree_util.tree_flatten_with_path(raw)
    mu = next(i for i, (p, _) in enumerate(flat) if "'mu'" in jax.tree_util.keystr(p))
    leaves = [np.array(v) for _, v in flat]
    leaves[mu].flat[0] = np.nan
    data = json.loads((step_dir(work, 6) / "data" / "metadata").read_text())
    saver = ckpt.Checkpointer(work, every=1, keep=5, async_save=False)
    poisoned = jax.tree.unflatten(treedef, leaves)
    saver.save(9, poisoned, data["process_states"][0], spec.config)
    saver.close()
    assert ckpt.latest(work)[0] == 9  # its files are intact: only restoring finds it out

    model, step = train.restore_model(spec, work)
    assert step == 6 and "checkpoint 9: holds non-finite values" in capsys.readouterr().err
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert params and all(np.isfinite(np.asarray(p)).all() for p in params)
    assert step_dir(work, 9).is_dir()  # inference moves nothing

    result = launch_py(*argv(tiny, work, **{**trained.run, "train.steps": 9}))
    assert result.code == 0, result.err
    assert "checkpoint 9: holds non-finite values" in result.err and "at step 6" in result.out
    assert (pathlib.Path(ckpt.directory(work)) / "9.corrupt").is_dir()
    assert all(np.isfinite(v).all() for v in saved_state(work, 9).values() if v.dtype.kind == "f")


@contextlib.contextmanager
def _full_disk():
    """Files of this process cannot grow past 200 kB (EFBIG, as a full disk's ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        yield "File too large"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@contextlib.contextmanager
def _read_only_checkpoints():
    """No directory can be made under checkpoints/ (as root, chmod would not stop it)."""

    def refuse(original, path, **kwargs):
        if "/checkpoints/" in os.fspath(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return original(path, **kwargs)

    with epath_testing.mock_epath(mkdir=refuse, makedirs=refuse):
        yield "Permission denied"


@pytest.mark.parametrize("fault", [_full_disk, _read_only_checkpoints], ids=lambda f: f.__name__)
def test_a_failed_save_is_one_line_and_the_checkpoints_before_it_stay(
    fault, tmp_path, tiny, trained, launch_py
):
    work = tmp_path / "run"
    shutil.copytree(trained.path, work)
    with fault() as cause:
        result = launch_py(*argv(tiny, work, **{**trained.run, "train.steps": 12}))
    err = result.err.strip()
    assert result.code == 4 and "\n" not in err, err
    assert err.startswith(f"launch.py: could not save checkpoint 9 in {work}/checkpoints: "), err
    assert cause in err
    good, bad = ckpt.scan(work, full=True)
    assert [s for s, _ in good] == [6, 3] and not bad
    for step in (3, 6):
        assert files(work, step) == files(trained.path, step)
    assert not (work / wd.LOCK).exists()
    # Orbax's threads of the failed save are released (else they hold the exit 5 minutes)
    waiting = [t for t in threading.enumerate() if type(t).__name__ == "_SignalingThread"]
    for t in waiting:
        t.join(timeout=10)
    assert not [t for t in waiting if t.is_alive()]


def test_integrity_scan_and_keep_last_k(tmp_path):
    """Truncated, garbage and missing items are each found by the scan; keep-last-K
    deletes old steps only once a newer one is marked; a step without a marker does
    not count; an all-damaged workdir is refused with nothing changed."""
    config = {"model": {"d_model": 8}, "data": {}}
    saver = ckpt.Checkpointer(tmp_path, every=1, keep=2, async_save=True)
    for step in (1, 2, 3, 4):
        saver.save(step, _small_state(step), {"i": step}, config)
        assert (step_dir(tmp_path, step - 1) / ckpt.MARKER).is_file() or step == 1
    saver.close()
    root = pathlib.Path(ckpt.directory(tmp_path))
    assert sorted(int(p.name) for p in root.iterdir()) == [3, 4]
    assert all((root / s / ckpt.MARKER).is_file() for s in ("3", "4"))
    data = max((root / "4" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    data.write_bytes(b"\x00" * data.stat().st_size)  # garbage, same size
    good, bad = ckpt.scan(tmp_path)  # sizes only
    assert [s for s, _ in good] == [4, 3] and not bad
    good, bad = ckpt.scan(tmp_path, full=True)
    assert [s for s, _ in good] == [3] and bad[0][0] == 4 and "checksum" in bad[0][1]
    # A torn newest save (step 5, killed before completion) never triggers deletion.
    (root / "5.orbax-checkpoint-tmp").mkdir()
    assert ckpt.latest(tmp_path) == (3, config)
    (root / "3" / "data" / "metadata").unlink()
    with pytest.raises(ValueError, match="no intact checkpoint") as e:
        ckpt.latest(tmp_path)
    assert "step 4" in str(e.value) and "step 3: data/metadata missing" in str(e.value)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in root.iterdir())[:2] == ["3", "4"]
    (root / "4" / ckpt.MARKER).unlink()
    assert ckpt.scan(tmp_path)[1][0] == (4, "no integrity marker: its save did not finish")


def _small_state(seed):
    return {"w": np.full((4, 64), seed, np.float32), "step": np.int32(seed)}


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
    good one applies; stop: the state stays frozen after the first bad step; a
    non-finite new state (a NaN moment, finite gradients) is not applied either."""
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
    # A NaN in the state itself (an Adam moment, as restored from a damaged file): the
    # loss and the gradients of a good batch are finite, the update is not.
    poisoned = jax.tree.map(np.copy, before)
    moment = next(x for x in jax.tree.leaves(poisoned.opt_state) if np.ndim(x) >= 2)
    moment.flat[0] = np.nan
    s3, m3 = skip_steps.train(poisoned, good)
    s3 = jax.device_get(s3)
    assert np.isfinite(float(m3["loss"])) and np.isfinite(float(m3["grad_norm"]))
    assert int(s3.nonfinite) == 1 and int(s3.bad_step) == 1
    for a, b in zip(jax.tree.leaves(s3.params), jax.tree.leaves(before.params), strict=True):
        np.testing.assert_array_equal(a, b)


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
