"""bench.search_bench runs end to end on a tiny setting: its table and JSON, and the
packed search's scores equal GridSearchCV's with our estimator (never a timing)."""

import json

import pytest

pytest.importorskip("sklearn")

from bench import search_bench  # noqa: E402


def test_a_tiny_run_prints_the_table_and_writes_the_json(tmp_path, capsys):
    path = search_bench.main(["--rows", "150", "--max-iter", "2", "--folds", "2", "--repeats", "1",
                              "--out", str(tmp_path)])
    result = json.loads(open(path).read())
    assert path.endswith(f"search-{result['date']}.json")
    assert result["packed_scores_equal_gridsearch_ours"] is True
    assert [r["impl"] for r in result["rows"]] == list(search_bench.IMPLS)
    for r in result["rows"]:
        assert set(r["best_params"]) == set(search_bench.GRID) and 0.0 <= r["best_score"] <= 1.0
        assert len(r["times_s"]) == 1
    lines = result["table"].split("\n")
    assert lines[:2] == list(search_bench.HEADER) and len(lines) == 2 + len(search_bench.IMPLS)
    out = capsys.readouterr().out
    assert result["caption"] in out and result["table"] in out
