"""The fit benchmark: its bodies train, on a tiny case, and its table is built
(results only, never a timing); and, with ``--benchmark-enable``, each case's whole
training run timed by pytest-benchmark, one test per implementation:

    pytest bench/test_fit_bench.py --benchmark-enable -k test_fit_run

Samples/s is the case's rows x epochs divided by the reported time per round.
"""

import math

import pytest

from bench import fit_bench as fb
from bench.common import settle

CASE_PARAMS = [pytest.param(sizes, batch, steps, id=fb.case_id(sizes, batch)) for sizes, batch, steps in fb.CASES]


@pytest.mark.parametrize("activation", fb.ACTIVATIONS)
@pytest.mark.parametrize("impl", fb.available_impls())
def test_every_implementation_trains_the_same_network(impl, activation):
    sizes, batch = (12, 9, 4), 8
    X, y = fb.make_data(sizes, batch * 5)
    run = fb.FACTORIES[impl](sizes, batch, X, y, 3, activation)
    first, later = float(run()), float(run())
    assert math.isfinite(first) and math.isfinite(later)
    if impl.endswith("sklearn"):  # an estimator's fit starts over, from the same seed
        assert later == pytest.approx(first, rel=1e-6)
    else:  # a model trained on: more epochs of the same data, a lower loss
        assert later < first


def test_a_case_row_and_its_table(monkeypatch):
    impls = [i for i in ("ours", "torch") if i in fb.available_impls()]
    row = fb.measure_case((12, 9, 4), 8, 3, impls, epochs=1, repeats=1)
    assert row["rows"] == 24 and all(row[name]["samples_per_s"] > 0 for name in impls)
    assert ("torch" in impls) == (row["ours_over_faster_peer"] is not None)
    table = fb.markdown([row], impls)
    assert table.count("\n") == 2 and "12, 9, 4 @ 8" in table


@pytest.mark.parametrize("sizes,batch,steps", CASE_PARAMS)
@pytest.mark.parametrize("impl", fb.IMPLS)
def test_fit_run(benchmark, impl, sizes, batch, steps):
    if benchmark.disabled:
        pytest.skip("timed only with --benchmark-enable (the bodies train above, on a tiny case)")
    if impl not in fb.available_impls():
        pytest.skip(f"{impl} needs {fb.NEEDS[impl]}")
    X, y = fb.make_data(sizes, batch * steps)
    run = fb.FACTORIES[impl](sizes, batch, X, y, fb.EPOCHS)
    settle()  # the previous test's thread pool may still be spinning
    run()  # first run: workspaces, compiles, initialisation
    benchmark.group = fb.case_id(sizes, batch)
    benchmark.extra_info.update(rows=len(X), epochs=fb.EPOCHS)
    assert math.isfinite(float(benchmark.pedantic(run, rounds=3, iterations=1)))
