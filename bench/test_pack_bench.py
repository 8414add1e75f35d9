"""bench.pack_bench runs end to end on a tiny setting and every library trains the
same members (no timing is asserted: the numbers are the benchmark's)."""

import json

import numpy as np

import gpubackprop as gb
from bench import pack_bench


def test_a_tiny_run_writes_the_table_and_the_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pack_bench, "CASES", (((6, 5, 3), 8, 32),))
    monkeypatch.setattr(pack_bench, "sgemm_ceiling", lambda: (100.0, None))
    pack_bench.main(["--members", "2", "--repeats", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith("| net @ batch | K | pack s / epoch |") and "| 6, 5, 3 @ 8 | 2 |" in out
    assert "| net @ batch | K | pack_shared s / epoch |" in out
    [path] = tmp_path.iterdir()
    row = json.loads(path.read_text())["rows"][0]
    available = set(pack_bench.available_impls())
    assert row["members"] == 2
    for pack, peers in pack_bench.PACKS.items():
        assert set(row[f"{pack}_speedup"]) == set(peers) & available


def test_every_implementation_trains_its_members_on_the_rows_given():
    """Each factory runs an epoch on a tiny case without error, own and shared batches alike."""
    X, y = pack_bench.make_data((6, 5, 3), 32)
    for name in pack_bench.available_impls():
        pack_bench.FACTORIES[name]((6, 5, 3), 8, X, y, 2)()


def test_the_peers_start_from_the_packs_weights():
    weights = pack_bench.start_weights((6, 5, 3), 2)
    for k in range(2):
        state = gb.MLP([6, 5, 3], seed=pack_bench.SEED + k).state_dict()
        for i, (W, b) in enumerate(weights):
            np.testing.assert_array_equal(W[k], state[f"layers.{i}.weight"])
            np.testing.assert_array_equal(b[k], state[f"layers.{i}.bias"])
