"""pytest-benchmark versions of cpu_bench's train steps, one test per case and implementation.

    pytest bench/                      each body once (pyproject sets --benchmark-disable): a smoke test
    pytest bench/ --benchmark-enable   timed by pytest-benchmark

Samples/s is the case's batch size divided by the reported time per round.
"""

import math

import pytest

from bench import cpu_bench as cb

CASE_PARAMS = [pytest.param(sizes, batch, id=cb.case_id(sizes, batch)) for sizes, batch in cb.CASES]
IMPL_PARAMS = [pytest.param(name, marks=pytest.mark.torch) if name == "torch" else name for name in cb.IMPLS]


@pytest.mark.parametrize("sizes,batch", CASE_PARAMS)
@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_train_step(benchmark, impl, sizes, batch):
    if impl in cb.NEEDS:
        pytest.importorskip(cb.NEEDS[impl])
    step = cb.STEPS[impl](sizes, batch)
    if not benchmark.disabled:
        cb.settle()  # the previous test's thread pool may still be spinning
    step()  # first call: workspace / state allocation, sklearn's initialisation
    benchmark.group = cb.case_id(sizes, batch)
    benchmark.extra_info.update(batch=batch, step_flops=cb.step_flops(sizes, batch))
    result = benchmark(step)
    assert math.isfinite(cb.loss_value(result))


@pytest.mark.parametrize("library", ["numpy", "mkl"])
def test_sgemm_ceiling(benchmark, library):
    if library not in cb.sgemm_libraries():
        pytest.skip("needs the mkl extra")
    call, flops = cb.sgemm_call(library=library)
    if not benchmark.disabled:
        cb.settle()
    call()
    benchmark.group = "sgemm"
    benchmark.extra_info["flops"] = flops
    benchmark(call)
