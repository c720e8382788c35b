"""Smoke runs of the studies at the tiny size, and their numerical claims."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from flax import nnx

from experiments import analysis, probes, stats, study, theory
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
