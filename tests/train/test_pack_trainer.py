"""SharedBatches' groups: how members are split, and that the split changes no result."""

import numpy as np
import pytest

from gpubackprop.nn.pack import MLPPack
from gpubackprop.train import pack_trainer

from ..helpers import random_batch


@pytest.mark.parametrize("members,batch,sizes,dtype,expected", [
    (16, 64, [784, 128, 10], "float32", [slice(0, 16)]),  # 32 KiB a member: all in one group
    (16, 4096, [64, 64, 64, 16], "float32", [slice(k, k + 4) for k in range(0, 16, 4)]),  # 1 MiB each: 4 a group
    (5, 4096, [64, 64, 16], "float64", [slice(0, 2), slice(2, 4), slice(4, 5)]),
    (3, 1 << 16, [8, 512, 2], "float32", [slice(k, k + 1) for k in range(3)]),  # a member beyond: alone
])
def test_members_are_grouped_by_what_a_layers_activations_take(members, batch, sizes, dtype, expected):
    assert pack_trainer.member_groups(members, batch, sizes, dtype) == expected
    assert pack_trainer.member_groups(members, batch, sizes, dtype, cpu=False) == [slice(0, members)]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_groups_change_no_members_bits(optimizer, monkeypatch, rng):
    X, y = random_batch(rng, [6, 10, 3], "cross_entropy", 45)
    w = rng.random((5, 45))
    results = []
    for group_bytes in (pack_trainer.GROUP_BYTES, 16 * 10 * 8 * 2):  # one group; groups of two members
        monkeypatch.setattr(pack_trainer, "GROUP_BYTES", group_bytes)
        pack = MLPPack([6, 10, 3], members=5, seed=3, dtype="float64")
        histories = pack.fit(X, y, epochs=2, batch_size=16, optimizer=optimizer, lr=[0.01, 0.02, 0.03, 0.04, 0.05],
                             sample_weight=w, batches="shared")
        results.append((pack.params, histories, [pack.member(k).optimizer.state_dict() for k in range(5)]))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]
    for one, two in zip(results[0][2], results[1][2]):
        assert one["steps"] == two["steps"]
        for name in one["state"]:
            np.testing.assert_array_equal(one["state"][name], two["state"][name])
