"""lbfgs_bench's measurement runs and scores both libraries: results only, never a timing."""

import pytest

pytest.importorskip("sklearn")


def test_wine_is_fitted_and_scored_by_both():
    from bench import lbfgs_bench

    row = lbfgs_bench.measure("wine", "classifier", repeats=1)
    assert set(row) == {"ours", "sklearn"}
    assert all(r["score"] > 0.85 and r["n_iter"] >= 1 and r["fit_s"] > 0 for r in row.values())
