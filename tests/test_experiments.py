"""Smoke runs of the studies at a toy size, and their numerical claims."""

import numpy as np

from experiments import theory


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
