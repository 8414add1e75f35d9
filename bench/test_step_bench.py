"""step_bench: its CPU half runs here (CI); the GPU half, with -m gpu, where there is a GPU."""

import contextlib
import json

import pytest

from bench import step_bench as sb

ROW_KEYS = {"case", "net", "batch", "precision", "ceiling_flops", "ceiling_fraction"} | {
    f"{impl}_{what}" for impl in sb.IMPLS for what in ("samples_per_s", "timing", "peak_bytes")}


def test_cpu_half_writes_the_result_file(tmp_path):
    result = sb.main(["--device", "cpu", "--cases", "small", "--target-s", "0.01", "--repeats", "1", "--out", str(tmp_path)])
    [path] = tmp_path.iterdir()
    assert json.loads(path.read_text()) == result
    assert {"device", "date", "versions", "rows"} <= set(result)
    assert [(r["net"], r["batch"]) for r in result["rows"]] == [([784, 128, 10], 64), ([784, 128, 10], 256)]
    for row in result["rows"]:
        assert set(row) == ROW_KEYS
        assert row["ours_samples_per_s"] > 0 and row["ceiling_fraction"] > 0  # a ratio of timings: its value is not held
        assert row["torch_graph_samples_per_s"] is None  # no CUDA graphs on the CPU
        for impl in ("torch_eager", "jax"):
            if sb.have(impl.split("_")[0]):
                assert row[f"{impl}_samples_per_s"] > 0 and row[f"{impl}_timing"]["loop"] >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["float32", "tf32", "bf16", "fp16"])
def test_gpu_steps_run_in_every_precision(precision):
    pytest.importorskip("cupy")
    try:
        gb_backend = sb.gb.get_backend("cuda")
    except sb.gb.DeviceUnavailableError as e:
        pytest.skip(str(e))
    step, peak = sb.ours((784, 128, 10), 256, precision, "cuda")
    timing = sb.time_interleaved({"ours": step}, target_s=0.01, repeats=2, sync=lambda: sb.synchronize("cuda"),
                                 around={"ours": step.around})
    assert timing["ours"].best > 0 and peak > 0
    assert gb_backend.supports_graphs


GPU_CASES = [pytest.param(sizes, batch, id=f"{name}-b{batch}") for name, cases in sb.CASES.items() for sizes, batch in cases]


@pytest.mark.gpu
@pytest.mark.parametrize("sizes,batch", GPU_CASES)
@pytest.mark.parametrize("impl", ["ours", "torch_eager", "torch_graph"])
def test_bench_gpu_train_step(benchmark, impl, sizes, batch):
    """pytest bench/ -m gpu --benchmark-enable: one float32 step, synchronized."""
    cupy = pytest.importorskip("cupy")
    try:
        sb.gb.get_backend("cuda")
    except sb.gb.DeviceUnavailableError as e:
        pytest.skip(str(e))
    if impl == "ours":
        step, _ = sb.ours(sizes, batch, "float32", "cuda")
    else:
        torch = pytest.importorskip("torch")
        step, _ = sb.torch_step(sizes, batch, "float32", "cuda", graph=impl == "torch_graph")

    def synchronized():
        step()
        cupy.cuda.Device().synchronize()
        if impl != "ours":
            torch.cuda.synchronize()

    with getattr(step, "around", contextlib.nullcontext)():  # ours: the device context, once, as fit
        for _ in range(3):
            synchronized()
        benchmark.group = f"{'-'.join(map(str, sizes))}_b{batch}"
        benchmark.extra_info["batch"] = batch
        benchmark(synchronized)


@pytest.mark.gpu
def test_torch_graph_step_keeps_what_it_captured_alive():
    """A captured step reads its inputs by address: once the factory returns, other
    allocations must not be able to take their memory (they did, on the first GPU run)."""
    import gc

    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch")
    step, _ = sb.torch_step((784, 128, 10), 64, "float32", "cuda", graph=True)
    gc.collect()
    torch.cuda.empty_cache()
    junk = [torch.full((4096,), -(2**40), dtype=torch.int64, device="cuda") for _ in range(256)]
    step()
    torch.cuda.synchronize()  # raises on a device-side assert (an index out of bounds)
    assert len(junk) == 256


def _result(rows, date="2026-11-29"):
    return {"device": "X", "date": date, "versions": {}, "settings": {}, "rows": rows}


def _row(precision, **cells):
    row = {"case": "small", "net": [784, 128, 10], "batch": 64, "precision": precision,
           "ceiling_flops": 1e12, "ceiling_fraction": None}
    for impl in sb.IMPLS:
        row.update({f"{impl}_samples_per_s": None, f"{impl}_timing": None, f"{impl}_peak_bytes": None})
    row.update(cells)
    return row


def test_merge_takes_each_implementation_from_the_run_that_measured_it(tmp_path):
    ours = _result([_row("float32", ours_samples_per_s=10.0, ours_peak_bytes=5, ceiling_fraction=0.5,
                         jax_samples_per_s=8.0), _row("bf16", ours_samples_per_s=20.0)])
    torch = _result([_row("float32", torch_eager_samples_per_s=2.0, torch_eager_peak_bytes=7, ceiling_flops=9e12),
                     _row("tf32", torch_eager_samples_per_s=3.0)])
    paths = []
    for name, result in (("a.json", ours), ("b.json", torch)):
        paths.append(str(tmp_path / name))
        (tmp_path / name).write_text(json.dumps(result))
    merged = sb.main(["--merge", *paths, "--out", str(tmp_path / "out")])
    rows = {r["precision"]: r for r in merged["rows"]}
    assert set(rows) == {"float32", "bf16", "tf32"}
    f32 = rows["float32"]
    assert (f32["ours_samples_per_s"], f32["jax_samples_per_s"], f32["torch_eager_samples_per_s"]) == (10.0, 8.0, 2.0)
    assert (f32["ours_source"], f32["jax_source"], f32["torch_eager_source"]) == (paths[0], paths[0], paths[1])
    assert f32["ceiling_flops"] == 1e12 and f32["ceiling_fraction"] == 0.5  # ours' run's ceiling
    assert f32["torch_graph_samples_per_s"] is None and f32["torch_graph_source"] is None
    assert rows["tf32"]["ours_samples_per_s"] is None and rows["tf32"]["ceiling_fraction"] is None
    assert [m["source"] for m in merged["merged_from"]] == paths
    assert json.loads((tmp_path / "out" / "gpu-2026-11-29.json").read_text()) == merged


def test_merge_refuses_other_devices_and_keeps_errors(tmp_path):
    a = _result([_row("float32", ours_samples_per_s=10.0, jax_error="RuntimeError: no GPU plugin")])
    b = dict(_result([_row("float32", jax_samples_per_s=3.0)]), device="Y")
    with pytest.raises(ValueError, match="different devices"):
        sb.merge([a, b], ["a", "b"])
    b["device"] = "X"
    [row] = sb.merge([a, b], ["a", "b"])["rows"]
    assert row["jax_error"] == "RuntimeError: no GPU plugin (a)" and row["jax_samples_per_s"] == 3.0


def test_merge_will_not_overwrite_an_input(tmp_path):
    path = tmp_path / "gpu-2026-11-29.json"
    path.write_text(json.dumps(_result([_row("float32", ours_samples_per_s=1.0)])))
    with pytest.raises(SystemExit):
        sb.main(["--merge", str(path), "--out", str(tmp_path)])
    assert json.loads(path.read_text())["rows"][0]["ours_samples_per_s"] == 1.0
