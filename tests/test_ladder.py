"""The scaling ladder (experiments/ladder.py): what it plans from what has finished,
its fits and verdict on synthetic runs, its corpus guard, and a tiny ladder
interrupted mid-run that continues where it stopped."""

import json
import math
import shutil
import threading

import numpy as np
import pytest
import scipy.stats

from experiments import ladder, stats, study
from experiments.ladder import LadderControls, Rung
from polyjax import workdir
from polyjax.data import build, sources, tokenizers

RUNGS = (Rung("t0", "tiny"), Rung("t1", "tiny", (("model.d_model", 96),)))
ARMS = ("swiglu", "polyrelu")


def _finish(run, select, report=None, evals=3):
    """A finished run without training: its metrics.jsonl (``evals`` evaluations of
    two batches, the selection and the report half, ending at ``select``/``report``)
    and summary.json."""
    report = select if report is None else report
    run.workdir.mkdir(parents=True, exist_ok=True)
    recs = [
        {"step": k, "loss": report + 1.0, "val_batch_ce": [select + d, report + d],
         "val_batch_tokens": [1, 1]}
        for k, d in ((2 * (i + 1), 0.1 * (evals - 1 - i)) for i in range(evals))
    ]  # fmt: skip
    (run.workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run.workdir / "summary.json").write_text(json.dumps({"val_loss": report}))


def _plan(root, seeds=(0, 1), **controls):
    return ladder.plan(RUNGS, seeds, {}, root, LadderControls(arms=ARMS, **controls))


def _lrs(runs, rung, arm, seed):
    return [r.lr for r in runs if (r.rung, r.arm.label, r.seed) == (rung, arm, seed)]


def test_ladder_plans_each_rung_from_the_best_lr_of_the_rung_below(tmp_path):
    known, forecast, best = _plan(tmp_path)
    # nothing finished: the first rung's grids only (centre 3e-3 x 1/2, 1, 2, seed 0)
    assert {r.rung for r in known} == {"t0"} and {r.seed for r in known} == {0}
    assert _lrs(known, "t0", "swiglu", 0) == [1.5e-3, 3e-3, 6e-3] and not best
    # stand-ins: each arm's other seed here, and all of the next rung (3 grid + 1)
    assert len(forecast) == 2 * 1 + 2 * (3 + 1)
    # swiglu best inside its grid, polyrelu at the upper edge
    loss = {
        "swiglu": {1.5e-3: 3.3, 3e-3: 3.1, 6e-3: 3.2},
        "polyrelu": {1.5e-3: 3.2, 3e-3: 3.1, 6e-3: 3.0},
    }
    for r in known:
        _finish(r, loss[r.arm.label][r.lr])
    known, forecast, best = _plan(tmp_path)
    assert best == {("t0", "swiglu"): 3e-3}
    # polyrelu's grid grows past the edge; swiglu's other seed and next rung are known
    assert _lrs(known, "t0", "polyrelu", 0) == [1.5e-3, 3e-3, 6e-3, 1.2e-2]
    assert _lrs(known, "t0", "swiglu", 1) == [3e-3]
    assert _lrs(known, "t1", "swiglu", 0) == [1.5e-3, 3e-3, 6e-3]
    assert _lrs(known, "t1", "polyrelu", 0) == []  # waits for its rung-0 best
    # the training order: every run of the first rung before any of the second
    rungs = [r.rung for r in known]
    assert rungs == sorted(rungs)
    # the extension is worse: 6e-3 is the best, inside the grid now
    (ext,) = [r for r in known if r.lr == 1.2e-2]
    _finish(ext, 3.05)
    known, _, best = _plan(tmp_path)
    assert best[("t0", "polyrelu")] == 6e-3
    assert _lrs(known, "t1", "polyrelu", 0) == [3e-3, 6e-3, 1.2e-2]
    # a grid at its edge extends at most `extend` times; `first` sets the first grid
    known, _, _ = _plan(tmp_path, extend=0)
    assert _lrs(known, "t0", "polyrelu", 0) == [1.5e-3, 3e-3, 6e-3]
    known, _, _ = _plan(tmp_path / "other", first=(1e-3,), width=1, extend=0)
    assert _lrs(known, "t0", "swiglu", 0) == [1e-3]


def test_ladder_trains_the_activation_comparison_before_the_orders(tmp_path):
    """Within a rung: SwiGLU's and PolyReLU's grids, then their other seeds, then the
    order r = 1's grid and seeds, whichever arm the controls list first."""
    controls = LadderControls(arms=("r=1", "swiglu", "polyrelu"))
    known, _, _ = ladder.plan(RUNGS[:1], (0, 1), {}, tmp_path, controls)
    for r in known:  # every grid finished, 3e-3 the best of each
        _finish(r, {1.5e-3: 3.2, 3e-3: 3.1, 6e-3: 3.3}[r.lr])
    known, _, _ = ladder.plan(RUNGS[:1], (0, 1), {}, tmp_path, controls)
    order = [(r.arm.label, r.seed) for r in known]
    assert order == [("swiglu", 0)] * 3 + [("polyrelu", 0)] * 3 + [
        ("swiglu", 1), ("polyrelu", 1)] + [("r=1", 0)] * 3 + [("r=1", 1)]  # fmt: skip


RUNGS3 = (*RUNGS, Rung("t2", "tiny", (("model.d_model", 128),)))
SEEDS3 = (0, 1, 2)
CONTROLS3 = LadderControls(arms=ARMS, first=(3e-3,), width=1, extend=0)


def _synthetic_ladder(tmp_path, margin):
    """Three rungs of synthetic runs, PolyReLU's loss ``margin(k)`` off SwiGLU's at
    rung k (plus noise): the tables, and per rung row the seeds' (log10 C, Δ)."""
    root, out = tmp_path / "_runs", tmp_path / "scaling"
    rng = np.random.default_rng(1)
    while todo := [r for r in ladder.plan(RUNGS3, SEEDS3, {}, root, CONTROLS3)[0]
                   if not study.finished(r)]:  # fmt: skip
        for r in todo:  # what the plan knows now; then it knows more
            k = int(r.rung[1])
            off = margin(k) if r.arm.label == "polyrelu" else 0.0
            _finish(r, 3.0 - 0.1 * k + off + rng.normal(0, 0.005))
    tables = ladder.run(out, rungs=RUNGS3, seeds=SEEDS3, controls=CONTROLS3, run_missing=False)
    rows = [r for r in tables["swiglu"] if r["arm"] == "polyrelu"]
    assert [r["rung"] for r in rows] == ["t0", "t1", "t2"]
    x = [math.log10(r["flops"]) for r in rows for _ in SEEDS3]
    index = json.loads((out / "runs.json").read_text())
    loss = {(e["rung"], e["arm"], e["seed"]): json.loads(
        (study.pathlib.Path(e["workdir"]) / "summary.json").read_text())["val_loss"]
        for e in index.values()}  # fmt: skip
    y = [
        loss[(r["rung"], "polyrelu", s)] - loss[(r["rung"], "swiglu", s)]
        for r in rows
        for s in SEEDS3
    ]
    return tables, out, x, y


def test_ladder_report_fits_the_delta_trend_and_states_it(tmp_path):
    """Three rungs of synthetic runs whose Δ to SwiGLU grows toward 0 with compute:
    the fitted slope is scipy's, and the verdict says the margin shrinks."""
    tables, out, x, y = _synthetic_ladder(tmp_path, lambda k: -0.2 + 0.1 * k)
    # the fit over every seed's paired Δ against log10 compute, as scipy fits it
    ref = scipy.stats.linregress(x, y)
    (fit,) = [f for f in tables["fits"] if f["kind"] == "delta" and f["arm"] == "polyrelu"]
    assert fit["slope"] == pytest.approx(ref.slope, rel=1e-9)
    t = scipy.stats.t.ppf(0.975, len(x) - 2)
    assert fit["slope_low"] == pytest.approx(ref.slope - t * ref.stderr, rel=1e-9)
    (sentence,) = [v for v in tables["verdict"] if v.startswith("polyrelu vs swiglu")]
    assert "the margin shrinks" in sentence and "paper's" in sentence
    # is a line the right summary? the lack-of-fit F-test against a mean per rung
    # (three rungs: a quadratic through the points fits those three means exactly)
    x, y = np.asarray(x), np.asarray(y)
    rss = lambda deg: float(((y - np.polyval(np.polyfit(x, y, deg), x)) ** 2).sum())
    f = (rss(1) - rss(2)) / (rss(2) / (len(x) - 3))
    assert fit["lof_p"] == pytest.approx(scipy.stats.f.sf(f, 1, len(x) - 3), rel=1e-6)
    assert "lack-of-fit p" in sentence
    # a margin closing 0.1 nats per rung crosses zero long before the paper's compute
    assert "outside that interval, so if the settings compare, the line must bend" in sentence
    md = (out / "table.md").read_text()
    assert "### Verdict on scale" in md and (out / "scaling.png").stat().st_size > 0
    # a trend shown: the pooled Δ is in the fits, not the verdict
    assert "pooled" not in sentence
    # two rungs: the Δs, and no trend
    two = ladder.run(out, rungs=RUNGS3[:2], seeds=SEEDS3, controls=CONTROLS3, run_missing=False)
    (sentence,) = [v for v in two["verdict"] if v.startswith("polyrelu vs swiglu")]
    assert sentence.endswith(f"too few rungs to fit a trend (need {ladder.MIN_RUNGS}).")


def test_ladder_report_pools_a_margin_that_holds(tmp_path):
    """A margin of -0.1 at every rung: no trend, and the verdict gives the mean of
    every run's Δ with scipy's t-interval and one-sample p."""
    tables, out, _, y = _synthetic_ladder(tmp_path, lambda k: -0.1)
    (fit,) = [f for f in tables["fits"] if f["kind"] == "delta" and f["arm"] == "polyrelu"]
    low, high = scipy.stats.t.interval(0.95, len(y) - 1, np.mean(y), scipy.stats.sem(y))
    assert fit["pooled"] == pytest.approx(np.mean(y), rel=1e-12)
    assert (fit["pooled_low"], fit["pooled_high"]) == pytest.approx((low, high), rel=1e-9)
    assert fit["pooled_p"] == pytest.approx(scipy.stats.ttest_1samp(y, 0).pvalue, rel=1e-9)
    assert fit["slope_low"] < 0 < fit["slope_high"]
    (sentence,) = [v for v in tables["verdict"] if v.startswith("polyrelu vs swiglu")]
    assert "the margin holds (no trend shown)" in sentence
    assert f"pooled over the 9 runs, Δ {np.mean(y):+.3f} [{low:+.3f}, {high:+.3f}]" in sentence
    assert f"{np.mean(y):+.4f} [{low:+.4f}, {high:+.4f}]" in (out / "table.md").read_text()


def test_ladder_report_compares_a_rung_s_finished_arms_while_the_orders_train(tmp_path):
    """A rung whose SwiGLU and PolyReLU have every seed while r = 1 is still on its
    grid, then on its other seed: the finished pair is compared at that rung on all
    seeds, r = 1 is left out of it until its own seeds finish, and the earlier rungs
    are untouched."""
    rungs = (*RUNGS, Rung("t2", "tiny", (("model.d_model", 128),)))
    seeds = (0, 1)
    controls = LadderControls(arms=(*ARMS, "r=1"), first=(3e-3,), width=1, extend=0)
    root, out = tmp_path / "_runs", tmp_path / "scaling"
    loss = {"swiglu": 3.0, "polyrelu": 2.8, "r=1": 2.9}

    def finish(held):
        while todo := [r for r in ladder.plan(rungs, seeds, {}, root, controls)[0]
                       if not study.finished(r) and not held(r)]:  # fmt: skip
            for r in todo:
                _finish(r, loss[r.arm.label] - 0.1 * int(r.rung[1]) + 0.01 * r.seed)
        return ladder.run(out, rungs=rungs, seeds=seeds, controls=controls, run_missing=False)

    def compared(tables, name, rung):
        return {r["arm"]: r["seed_list"] for r in tables[name] if r["rung"] == rung}

    both = {"swiglu": [0, 1], "polyrelu": [0, 1]}
    # r = 1's grid at the top rung not run yet
    tables = finish(lambda r: r.rung == "t2" and r.arm.label == "r=1")
    assert compared(tables, "swiglu", "t2") == both
    assert compared(tables, "r3", "t2") == {}
    assert compared(tables, "swiglu", "t1") == {**both, "r=1": [0, 1]}
    (fit,) = [f for f in tables["fits"] if f["kind"] == "delta" and f["arm"] == "polyrelu"]
    assert fit["n"] == 3 * len(seeds)
    (fit,) = [f for f in tables["fits"] if f["kind"] == "delta" and f["arm"] == "r=1"
              and f["ref"] == "swiglu"]  # fmt: skip
    assert fit["n"] == 2 * len(seeds)
    # its grid finished (its lr chosen), its other seed not yet
    tables = finish(lambda r: r.rung == "t2" and r.arm.label == "r=1" and r.seed == 1)
    assert [g["best_lr"] for g in tables["grid"] if g["rung"] == "t2"] == [3e-3] * 3
    assert compared(tables, "swiglu", "t2") == both
    # all of it: r = 1 joins, Δ to SwiGLU -0.1 at every rung
    tables = finish(lambda r: False)
    assert compared(tables, "swiglu", "t2") == {**both, "r=1": [0, 1]}
    assert compared(tables, "r3", "t2") == {"polyrelu": [0, 1], "r=1": [0, 1]}
    rows = [r for r in tables["swiglu"] if r["arm"] == "r=1"]
    assert [r["delta"] for r in rows] == pytest.approx([-0.1] * 3)


def _byte_store(directory, n):
    shutil.rmtree(directory, ignore_errors=True)

    class Docs(list):
        fingerprint = f"scenes{n}"

    build.build_store(
        Docs(sources.shakespeare_scenes()[:n]), tokenizers.ByteTokenizer(), directory,
        spec="scenes", shard_docs=2,
    )  # fmt: skip


def test_ladder_refuses_a_workdir_whose_runs_trained_on_another_corpus(tmp_path):
    corpus = tmp_path / "tokens"
    rungs = (Rung("t0", "tiny", (("data.source", f"tokens:{corpus}"),)),)
    _byte_store(corpus, 6)
    ladder.check_corpus(rungs, {}, tmp_path / "scaling")
    ladder.check_corpus(rungs, {}, tmp_path / "scaling")  # the same corpus again: fine
    recorded = json.loads((tmp_path / "scaling" / "corpus.json").read_text())
    assert recorded[str(corpus)]["tokens"] > 0
    _byte_store(corpus, 5)  # rebuilt from other documents, at the same path
    with pytest.raises(ValueError, match="is not the corpus the runs of"):
        ladder.check_corpus(rungs, {}, tmp_path / "scaling")


SMOKE = {  # the tiny size, 6 steps, 3 evaluations
    "train.steps": 6,
    "train.log_every": 1,
    "train.eval_every": 2,
    "train.eval_batches": 2,
    "train.checkpoint_every": 6,
    "optim.warmup_steps": 2,
}


def test_an_interrupted_ladder_continues_where_it_stopped(tmp_path, monkeypatch):
    """Two tiny rungs, two arms, two seeds (8 runs); the third run is stopped at its
    third step (KeyboardInterrupt, as ^C). The second call trains the six runs not
    finished, the stopped one included, and none of the two finished before."""
    controls = LadderControls(arms=ARMS, first=(1e-3,), width=1, extend=0)
    kwargs = dict(rungs=RUNGS, seeds=(0, 1), extra=SMOKE, controls=controls)
    real, trained, calls = study.train, [], []

    def stopping(spec, workdir, out):
        trained.append(workdir)
        calls.append(workdir)
        if len(calls) == 3:  # the third call of the whole test

            def stop(step, total):
                if step >= 3:
                    raise KeyboardInterrupt

            out.on_step = stop  # fmt: skip
        return real(spec, workdir, out)

    monkeypatch.setattr(study, "train", stopping)
    out = tmp_path / "scaling"
    with pytest.raises(KeyboardInterrupt):
        ladder.run(out, **kwargs)
    first = list(trained)
    assert len(first) == 3 and not (first[2] / "summary.json").exists()
    # the two finished runs are tabulated already (their grid rows)
    assert len(json.loads((out / "runs.json").read_text())) == 2
    stamps = {w: (w / "metrics.jsonl").stat().st_mtime_ns for w in first[:2]}
    trained.clear()
    tables = ladder.run(out, **kwargs)
    assert len(trained) == 6 and first[2] in trained
    assert not set(first[:2]) & set(trained)
    assert {w: (w / "metrics.jsonl").stat().st_mtime_ns for w in first[:2]} == stamps
    index = json.loads((out / "runs.json").read_text())
    assert len(index) == 8
    # both rungs tabulated over both seeds, the second rung at the first one's best lr
    assert [(r["rung"], r["arm"], r["seeds"]) for r in tables["swiglu"]] == [
        ("t0", "swiglu", 2), ("t0", "polyrelu", 2), ("t1", "swiglu", 2), ("t1", "polyrelu", 2)
    ]  # fmt: skip
    assert all(r["evals"] == 3 and r["verdict"] != stats.TOO_FEW_EVALS for r in tables["swiglu"])
    # a third call trains nothing
    trained.clear()
    ladder.run(out, **kwargs)
    assert trained == []


def test_processes_sharing_a_ladder_leave_each_other_s_locked_runs_alone(tmp_path, monkeypatch):
    """Two processes on one ladder: a run whose workdir a live process has locked is
    that process's. train_planned trains the next free run instead, then waits for
    the locked one to finish rather than training it twice."""
    known, _, _ = _plan(tmp_path)
    busy, free = known[0], known[1]
    other = workdir.Lock(busy.workdir)  # the other process's run, live (a heartbeat)
    other.acquire()
    trained = []

    def finish_the_other():
        _finish(busy, 3.1)
        other.release()

    def fake_train(spec, run_dir, out):
        trained.append(run_dir)
        _finish(next(r for r in known if r.workdir == run_dir), 3.0)
        threading.Timer(0.3, finish_the_other).start()  # the other ends a little later
        return {"val_loss": 3.0}

    monkeypatch.setattr(study, "train", fake_train)
    monkeypatch.setattr(study, "WAIT_S", 0.05)
    try:
        study.train_planned("t", lambda: (known[:2], []))
    finally:
        other.release()
    assert trained == [free.workdir]
    assert study.finished(busy) and not workdir.held(busy.workdir)
