"""Smoke runs of the studies at the tiny size, and their numerical claims."""

import io
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from flax import nnx

from configs import dense
from experiments import analysis, corpus, probes, progress, stats, study, theory
from polyjax import metrics as mx
from polyjax.analysis import effective_rank, layer_similarity
from polyjax.config import Spec
from polyjax.model import ModelConfig, Transformer, preset


def test_lemma1_table_is_exact_to_float_precision():
    for row in theory.lemma1_table():
        assert row["max_abs_error"] <= 1e-6 * max(1.0, row["max_abs_value"])


def test_theory_smoke(tmp_path):
    theory.main(["--out", str(tmp_path), "--widths", "2,3", "--seeds", "2", "--steps", "30"])
    for name in ("lemma1.md", "table.md", "table.csv", "approx.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = (tmp_path / "table.csv").read_text().splitlines()
    assert len(rows) == 1 + len(theory.TARGETS) * 2 * 2


def test_loglog_slope_recovers_a_power_law():
    p = np.array([10, 100, 1000])
    assert abs(theory.loglog_slope(list(p), list(3.0 * p**-1.5)) + 1.5) < 1e-9


def _tiny_model(scan_layers=False):
    cfg = ModelConfig.from_dict({**preset("dense", "tiny", "polynorm"), "scan_layers": scan_layers})
    return Transformer(cfg, rngs=nnx.Rngs(0))


def test_hidden_states_are_the_residual_stream():
    model = _tiny_model()
    tokens = jnp.arange(24).reshape(2, 12) % 200
    logits, aux = model(tokens, return_hidden=True)
    h = aux["hidden_states"]
    assert h.shape == (model.cfg.n_layers + 1, 2, 12, model.cfg.d_model)
    want = model.final_norm(h[-1]) @ model.head[...]
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h[0], model.embed[...][tokens], rtol=1e-6)
    scanned = _tiny_model(scan_layers=True)
    _, aux_s = scanned(tokens, return_hidden=True)
    assert aux_s["hidden_states"].shape == h.shape


def test_ffn_ranks_and_similarity_of_a_model():
    model = _tiny_model()
    ranks = analysis.ffn_ranks(model)
    assert set(ranks) == {"w_in", "w_out"} and len(ranks["w_in"]) == model.cfg.n_layers
    assert ranks["w_in"][1] == effective_rank(model.layers[1].ffn.w_in[...])
    scanned = analysis.ffn_ranks(_tiny_model(scan_layers=True))
    assert len(scanned["w_out"]) == model.cfg.n_layers
    tokens = jnp.arange(32).reshape(2, 16) % 200
    batch = {
        "inputs": tokens,
        "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
        "segment_ids": jnp.ones((2, 16), jnp.int32),
        "weights": jnp.ones((2, 16)),
    }
    sim = analysis.hidden_similarity(model, [batch])
    # block outputs only: the embedding output (hidden_states[0]) is left out
    assert sim.shape == (model.cfg.n_layers,) * 2
    h = np.asarray(model(tokens, return_hidden=True)[1]["hidden_states"])
    blocks = h[1:].reshape(model.cfg.n_layers, -1, h.shape[-1])
    np.testing.assert_allclose(sim, layer_similarity(blocks), rtol=1e-5, atol=1e-6)
    with_embedding = layer_similarity(h.reshape(h.shape[0], -1, h.shape[-1]))
    assert not np.allclose(sim, with_embedding[:-1, :-1], atol=1e-3)


def test_tokens_to_target_interpolates_on_a_known_curve():
    tokens = np.array([100.0, 200.0, 300.0, 400.0])
    loss = 5.0 - 0.01 * tokens  # 4.0, 3.0, 2.0, 1.0
    assert stats.tokens_to_target(tokens, loss, 2.5) == pytest.approx(250.0)
    assert stats.tokens_to_target(tokens, loss, 3.0) == pytest.approx(200.0)  # on a point
    assert stats.tokens_to_target(tokens, loss, 4.5) == pytest.approx(100.0)  # at the first
    assert stats.tokens_to_target(tokens, loss, 0.5) is None  # never reached
    # the first crossing counts, not a later one after a bump
    bumpy = np.array([4.0, 2.0, 3.0, 1.0])
    assert stats.tokens_to_target(tokens, bumpy, 2.5) == pytest.approx(175.0)


def test_best_lr_is_the_lowest_mean_and_diverged_runs_lose():
    grid = {1e-3: [3.1, 3.3], 3e-3: [3.0, 3.1], 1e-2: [2.9, float("inf")]}
    assert stats.best_lr(grid) == 3e-3  # 1e-2 has the lowest seed but diverged in one
    assert stats.best_lr({1e-3: [3.0], 1e-2: [float("nan")]}) == 1e-3
    assert stats.at_edge(1e-2, list(grid)) and not stats.at_edge(3e-3, list(grid))
    with pytest.raises(ValueError, match="no learning rate"):
        stats.best_lr({})


def test_expert_loads_find_a_dead_expert_in_the_second_half_only():
    """A dead expert before the half-way step is not reported; one after it is, even
    when it has recovered by the last step; records without loads are skipped."""
    uniform = [[0.25] * 4, [0.25] * 4]
    dead_early = [[0.0, 0.3, 0.35, 0.35], [0.25] * 4]
    dead_late = [[0.25] * 4, [0.3, 0.3, 0.39, 0.01]]
    records = [
        {"step": 10, "expert_load": dead_early},
        {"step": 50, "val_loss": 3.0},
        {"step": 60, "expert_load": dead_late},
        {"step": 100, "expert_load": uniform},
    ]
    final_L_E, late_min_L = probes.expert_loads(records)
    np.testing.assert_array_equal(final_L_E, np.asarray(uniform))
    np.testing.assert_allclose(late_min_L, [0.25, 0.01])
    with pytest.raises(ValueError, match="not an MoE run"):
        probes.expert_loads([{"step": 1, "loss": 2.0}])


def test_halves_and_paired_t_against_direct_computation():
    ce, n = [10.0, 20.0, 30.0, 5.0, 7.0], [5.0, 5.0, 10.0, 2.0, 1.0]
    h = stats.halves(ce, n)
    assert h["select"] == pytest.approx(30 / 10) and h["report"] == pytest.approx(42 / 13)
    assert h["all"] == pytest.approx(72 / 23)
    d = np.array([0.1, 0.3, 0.2])
    t, p = stats.paired_t(d)
    assert t == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(3)))
    assert p == pytest.approx(2 * scipy.stats.t.sf(abs(t), 2))
    assert p == pytest.approx(scipy.stats.ttest_1samp(d, 0.0).pvalue)


def test_mean_ci_is_the_t_interval_of_scipy_and_of_the_closed_form():
    d = np.array([-0.19, -0.17, -0.21, -0.18])
    low, high = stats.mean_ci(d)
    want = scipy.stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert (low, high) == pytest.approx((want.low, want.high), rel=1e-12)
    # closed form with two seeds: t_{1, 0.975} = tan(pi (0.975 - 1/2)) = 12.706...
    two = np.array([0.10, 0.14])
    half = np.tan(np.pi * 0.475) * two.std(ddof=1) / np.sqrt(2)
    assert stats.mean_ci(two) == pytest.approx((0.12 - half, 0.12 + half), rel=1e-9)
    assert all(np.isnan(stats.mean_ci([0.1])))  # one seed: no interval
    assert all(np.isnan(stats.mean_ci([0.1, float("inf")])))  # a diverged seed


def test_verdict_is_withheld_where_it_would_be_noise():
    assert stats.verdict(-0.2, 0.001) == "better"
    assert stats.verdict(+0.2, 0.001) == "worse"
    assert stats.verdict(-0.2, 0.2) == "no difference shown"
    # a curve of one or two evaluations (a smoke run of 4 steps): no verdict at any p
    assert stats.verdict(-0.2, 0.008, evals=1, seeds=3) == stats.TOO_FEW_EVALS
    assert stats.verdict(-0.2, 0.008, evals=stats.MIN_EVALS, seeds=3) == "better"
    assert stats.verdict(-0.2, float("nan"), evals=5, seeds=1) == stats.TOO_FEW_SEEDS


def test_line_fit_slope_interval_against_scipy_linregress():
    rng = np.random.default_rng(0)
    x = np.repeat([12.6, 13.1, 13.5, 14.2], 3)
    y = -0.2 + 0.03 * (x - 12.6) + rng.normal(0, 0.01, len(x))
    fit = stats.line_fit(x, y)
    ref = scipy.stats.linregress(x, y)
    t = scipy.stats.t.ppf(0.975, len(x) - 2)
    assert fit["slope"] == pytest.approx(ref.slope, rel=1e-10)
    assert fit["intercept"] == pytest.approx(ref.intercept, rel=1e-10)
    assert fit["slope_low"] == pytest.approx(ref.slope - t * ref.stderr, rel=1e-10)
    assert fit["slope_high"] == pytest.approx(ref.slope + t * ref.stderr, rel=1e-10)
    # at the mean x the line's interval is the mean's: t s / sqrt(n); far out it widens
    value, low, high = stats.line_at(fit, x.mean())
    assert value == pytest.approx(y.mean(), rel=1e-10)
    assert (high - low) / 2 == pytest.approx(t * fit["resid_sd"] / np.sqrt(len(x)), rel=1e-10)
    far = stats.line_at(fit, 21.4)
    assert far[2] - far[1] > 10 * (high - low)
    # two points: a line, no interval; one distinct x: no line
    assert np.isnan(stats.line_fit([1.0, 2.0], [0.0, 1.0])["slope_low"])
    assert np.isnan(stats.line_fit([1.0, 1.0, 1.0], [0.0, 1.0, 2.0])["slope"])


def test_line_fit_lack_of_fit_test_against_the_nested_model_comparison():
    # the F-test of the line against a mean per x: with 4 distinct x, a cubic through
    # the points (np.polyfit) fits those 4 means exactly, so it is that model
    rng = np.random.default_rng(1)
    x = np.repeat([12.6, 13.1, 13.5, 14.2], 3)
    kink = np.where(x < 14, -0.3, -0.08) + rng.normal(0, 0.01, len(x))
    rss = lambda deg: float(((kink - np.polyval(np.polyfit(x, kink, deg), x)) ** 2).sum())
    f = ((rss(1) - rss(3)) / 2) / (rss(3) / (len(x) - 4))
    fit = stats.line_fit(x, kink)
    assert fit["lof_p"] == pytest.approx(scipy.stats.f.sf(f, 2, len(x) - 4), rel=1e-8)
    assert fit["lof_p"] < 1e-4  # flat, then a step: not a line
    # the points of a line plus the same noise: the test does not reject it
    line = -0.3 + 0.15 * (x - 12.6) + rng.normal(0, 0.01, len(x))
    assert stats.line_fit(x, line)["lof_p"] > 0.05
    # no repeated x, or only two distinct x: no test
    assert np.isnan(stats.line_fit([1.0, 2.0, 3.0], [0.0, 1.0, 3.0])["lof_p"])
    assert np.isnan(stats.line_fit([1.0, 1.0, 2.0, 2.0], [0.0, 0.1, 1.0, 1.2])["lof_p"])


def test_run_log_forwards_the_trainer_progress_and_reports_its_steps():
    log, seen = io.StringIO(), []
    out = progress.RunLog(log, lambda step, total: seen.append((step, total)))
    meter = mx.Progress(300, 0, out)  # what train() writes its progress with
    meter.update(20, 4.1, 1000.0)
    meter.message("summary: ...")
    meter.update(40, 3.9, 1000.0, "  val 3.95")
    assert seen == [(20, 300), (40, 300)]
    assert log.getvalue().count("step ") == 2 and "summary" in log.getvalue()


def test_study_progress_counts_runs_and_gives_the_eta_from_the_measured_rate():
    now = [0.0]
    stream = io.StringIO()
    p = progress.StudyProgress("order", stream=stream, every_s=0.0, clock=lambda: now[0])
    cfg = lambda: dense.get_config("act=polyrelu,size=tiny")  # 100 steps
    a, b, c = cfg(), cfg(), cfg()
    p.plan([cfg(), cfg()], [a, b, c])  # two runs done before, three to go
    p.start(a, "r=3 lr 0.001 seed 0")
    p.step(10, 100)  # the first report: compile time is not counted
    now[0] = 20.0
    p.step(60, 100)  # 50 steps in 20 s
    per_step = 20.0 / 50
    # the rest of this run (40 steps) and two more runs of the same shape (100 each)
    assert p.eta() == pytest.approx(per_step * (40 + 100 + 100), rel=1e-9)
    line = stream.getvalue().splitlines()[-1]
    assert line.startswith("[order] 2/5 runs done; now r=3 lr 0.001 seed 0 step 60/100")
    assert line.endswith(f"study ETA {progress.duration(per_step * 240)}")
    now[0] = 36.0
    p.step(100, 100)
    p.end()  # measured: 36 - 0 s over the 90 steps after the first report
    p.plan([cfg(), cfg(), a], [b, c])
    assert p.eta() == pytest.approx(36.0 / 90 * 200, rel=1e-9)
    # a shape never run: the rate over every shape, per FLOP
    big = dense.get_config("act=polyrelu,size=cpu")
    p.plan([], [big])
    rate = 36.0 / (progress.run_flops(a) * 0.9)
    assert p.eta() == pytest.approx(rate * progress.run_flops(big), rel=1e-9)
    # a run that reports once (4 steps, logged at the last): its whole time counts
    tiny = progress.StudyProgress("smoke", stream=stream, every_s=0.0, clock=lambda: now[0])
    short = dense.get_config("act=polyrelu,size=tiny")
    short.train.steps = 4
    tiny.plan([], [short, cfg()])
    tiny.start(short, "r=3 lr 0.001 seed 0")
    now[0] += 8.0
    tiny.step(4, 4)
    tiny.end()
    tiny.plan([short], [cfg()])
    assert tiny.eta() == pytest.approx(8.0 / 4 * 100, rel=1e-9)
    # three processes share the study: each trains a third of what is left
    shared = [cfg(), cfg(), cfg()]
    tiny.plan([short], shared, processes=3)
    assert tiny.eta() == pytest.approx(8.0 / 4 * 100, rel=1e-9)
    tiny.start(shared[0], "r=3 lr 0.003 seed 0")
    assert tiny.line().endswith(f"study ETA {progress.duration(200)} (3 processes)")
    assert progress.duration(3725) == "1:02:05" and progress.duration(float("nan")) == "?"


def test_corpus_keeps_one_file_per_path_and_leaves_out_editable_finders(tmp_path):
    for version, text in (("a", "x = 1\n"), ("b", "x = 2\n")):
        pkg = tmp_path / version / "site-packages" / "pkg"
        pkg.mkdir(parents=True)
        (pkg / "mod.py").write_text(text)  # the same path in two interpreters
        (pkg / f"only_{version}.md").write_text(f"# {version}\n")
        (pkg.parent / "__editable___pkg_finder.py").write_text(f"MAPPING = '{tmp_path}'\n")
    roots = [str(tmp_path / "a"), str(tmp_path / "b")]
    names = lambda docs: sorted(pathlib.Path(d["path"]).name for d in docs)
    assert names(corpus.collect(roots, 1.0)) == ["mod.py", "mod.py", "only_a.md", "only_b.md"]
    one = corpus.collect(roots, 1.0, one_per_path=True)
    assert names(one) == ["mod.py", "only_a.md", "only_b.md"]
    assert not any("__editable__" in d["path"] for d in one)


def test_study_report_selects_on_one_half_and_reports_the_other(tmp_path):
    """Synthetic runs (metrics.jsonl only): the best lr is chosen on the selection
    half even where the report half would choose another, and the tables follow."""
    s = study.Study(
        "syn", "Synthetic", "none", (study.Arm("a", "relu"), study.Arm("b", "relu")), "a"
    )
    # per (arm, lr, seed): (selection-half, report-half) losses at steps 10, 20
    finals = {
        ("a", 1e-3): [(3.0, 3.0), (3.0, 3.1)],
        ("a", 3e-3): [(2.9, 3.5), (2.9, 3.4)],  # best on selection, worse on report
        ("b", 1e-3): [(3.2, 3.2), (3.2, 3.3)],
        ("b", 3e-3): [(3.3, 3.0), (3.3, 2.9)],
    }
    index = {}
    for (arm, lr), per_seed in finals.items():
        for seed, (sel, rep) in enumerate(per_seed):
            if lr == 3e-3 and seed > 0 and arm == "b":
                continue  # b's best lr (1e-3) is the shared one: nothing more to run
            wd = tmp_path / f"{arm}-{lr}-{seed}"
            wd.mkdir()
            recs = [
                {
                    "step": step,
                    "loss": rep + 1,
                    "val_batch_ce": [sel + k, rep + k],
                    "val_batch_tokens": [1, 1],
                }
                for step, k in ((10, 0.5), (20, 0.0))
            ]
            (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            index[f"{arm}/lr{lr:g}/seed{seed}"] = {
                "workdir": str(wd), "arm": arm, "lr": lr, "seed": seed,
                "shared": lr == 1e-3, "tokens_per_step": 100,
            }  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs.json").write_text(json.dumps(index))
    tables = study.report(s, out, (0, 1), study.Controls(lrs=(3e-3,)))
    assert {r["arm"]: r["best_lr"] for r in tables["grid"]} == {"a": 3e-3, "b": 1e-3}
    shared = {r["arm"]: r for r in tables["shared"]}
    assert shared["b"]["val_loss"] == pytest.approx(3.25)  # the report half
    assert shared["b"]["delta"] == pytest.approx(0.2)
    best = {r["arm"]: r for r in tables["best"]}
    assert best["a"]["val_loss"] == pytest.approx(3.45) and best["a"]["lr"] == 3e-3
    assert best["b"]["delta"] == pytest.approx(3.25 - 3.45)
    # tokens to a's final loss (3.5, 3.4): b's curves (3.7 -> 3.2, 3.8 -> 3.3 over
    # 1000 -> 2000 tokens) reach them at 1400 and 1800
    assert best["b"]["tokens_to_target"] == pytest.approx(1600.0)
    assert (out / "table.md").read_text().count("|") > 20 and (out / "curves.png").exists()


SMOKE = {  # the tiny size, a few steps
    "train.steps": 4,
    "train.log_every": 1,
    "train.eval_every": 2,
    "train.eval_batches": 1,
    "train.checkpoint_every": 4,
}


def test_study_smoke_runs_tabulates_and_resumes(tmp_path):
    arms = (study.Arm("relu", "relu"), study.Arm("polynorm", "polynorm"))
    s = study.Study("smoke", "Smoke", "none", arms, reference="relu")
    tables = study.run(s, tmp_path / "smoke", size="tiny", seeds=(0, 1), extra=SMOKE)
    assert set(tables) == {"shared", "grid"} and not tables["grid"]  # no lr grid asked
    rows = tables["shared"]
    assert [r["arm"] for r in rows] == ["relu", "polynorm"]
    # the table against the runs' own summaries (one evaluation batch: the report
    # half is all of it): mean and paired difference over seeds
    index = json.loads((tmp_path / "smoke" / "runs.json").read_text())
    final = {
        key: json.loads((pathlib.Path(e["workdir"]) / "summary.json").read_text())["val_loss"]
        for key, e in index.items()
    }
    val = [final[f"polynorm/lr0.001/seed{seed}"] for seed in (0, 1)]
    delta = [
        final[f"polynorm/lr0.001/seed{seed}"] - final[f"relu/lr0.001/seed{seed}"] for seed in (0, 1)
    ]
    assert rows[1]["val_loss"] == pytest.approx(np.mean(val), rel=1e-6)
    assert rows[1]["val_loss_std"] == pytest.approx(np.std(val, ddof=1), rel=1e-6)
    assert rows[1]["delta"] == pytest.approx(np.mean(delta), rel=1e-6)
    assert rows[1]["delta_std"] == pytest.approx(np.std(delta, ddof=1), rel=1e-6)
    # 4 steps, evaluated at 2 and 4: no verdict, whatever p says
    assert rows[1]["evals"] == 2 and rows[1]["verdict"] == stats.TOO_FEW_EVALS
    assert stats.TOO_FEW_EVALS in (tmp_path / "smoke" / "table.md").read_text()
    for name in ("table.md", "table.csv", "curves.png", "runs.json"):
        assert (tmp_path / "smoke" / name).stat().st_size > 0
    # seeds differ (the spread is real), and a second call reruns nothing
    assert rows[1]["val_loss_std"] > 0
    runs = sorted((tmp_path / "_runs").glob("*/seed*/metrics.jsonl"))
    assert len(runs) == 4
    mtimes = [p.stat().st_mtime for p in runs]
    # another study with the same arm under another label trains nothing new
    same = study.Arm("polynorm-r3", "polynorm", overrides=(("model.activation.order", 3),))
    again = study.Study("again", "Again", "none", (same,), reference="polynorm-r3")
    study.run(again, tmp_path / "again", size="tiny", seeds=(0, 1), extra=SMOKE)
    assert sorted((tmp_path / "_runs").glob("*/seed*/metrics.jsonl")) == runs
    assert [p.stat().st_mtime for p in runs] == mtimes
    # a study cut short: run_missing=False tabulates the finished runs, trains none
    grid = study.Controls(lrs=(3e-3,))
    cut = study.run(s, tmp_path / "cut", size="tiny", seeds=(0, 1), extra=SMOKE, controls=grid,
                    run_missing=False)  # fmt: skip
    assert sorted((tmp_path / "_runs").glob("*/seed*/metrics.jsonl")) == runs
    assert [sorted(k for k in row if k[0].isdigit()) for row in cut["grid"]] == [["0.001"]] * 2
    assert [r["val_loss"] for r in cut["shared"]] == [r["val_loss"] for r in rows]


def test_analysis_loads_a_trained_checkpoint(tmp_path):
    s = study.Study("one", "One", "none", (study.Arm("polynorm", "polynorm"),), "polynorm")
    study.run(s, tmp_path / "one", size="tiny", seeds=(0,), extra=SMOKE)
    workdir = next((tmp_path / "_runs").glob("*/seed0"))
    spec = Spec.from_config(s.config(s.arms[0], "tiny", 0, SMOKE))
    model, batches = analysis.load_trained(spec, workdir, n=spec.train.eval_batches)
    summary = json.loads((workdir / "summary.json").read_text())
    # the restored model reproduces the run's final validation loss
    ce, n = 0.0, 0.0
    for b in batches:
        logits, _ = model(
            b["inputs"], positions_BxL=b["positions"], segment_ids_BxL=b["segment_ids"]
        )
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"])
        ce += float((per_token * b["weights"]).sum())
        n += float(b["weights"].sum())
    assert abs(ce / n - summary["val_loss"]) < 1e-4
    assert len(analysis.ffn_ranks(model)["w_in"]) == model.cfg.n_layers
