"""Maths checked against values computed by hand."""

import numpy as np
import pytest
import torch

from common.maths import (
    fedavg_state_dicts,
    fid_proxy,
    frechet_distance,
    per_class_mean,
    weighted_average,
)


def test_per_class_mean_by_hand():
    emb = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 2, 0])
    ids, means, counts = per_class_mean(emb, labels, num_classes=3)
    assert ids.tolist() == [0, 2]  # class 1 absent: nothing is uploaded for it
    assert counts.tolist() == [3, 1]
    # class 0: ((1+3+0)/3, (0+2+1)/3) = (4/3, 1)
    assert torch.allclose(means, torch.tensor([[4 / 3, 1.0], [5.0, 5.0]]))


def test_per_class_mean_keeps_token_axis_and_rejects_bad_labels():
    emb = torch.ones(4, 1, 3)
    _, means, _ = per_class_mean(emb, torch.tensor([1, 1, 1, 1]), 2)
    assert means.shape == (1, 1, 3)
    with pytest.raises(ValueError, match="labels must be in"):
        per_class_mean(emb, torch.tensor([0, 1, 2, 5]), 3)


def test_weighted_average_and_fedavg():
    a, b = torch.tensor([0.0, 10.0]), torch.tensor([4.0, 2.0])
    # weights 1:3 -> 0.25*a + 0.75*b = (3, 4)
    assert torch.allclose(weighted_average([a, b], [1, 3]), torch.tensor([3.0, 4.0]))
    s1 = {"w": a, "n": torch.tensor(7)}
    s2 = {"w": b, "n": torch.tensor(9)}
    avg = fedavg_state_dicts([s1, s2], [100, 300])
    assert torch.allclose(avg["w"], torch.tensor([3.0, 4.0]))
    assert int(avg["n"]) == 7  # integer buffers are not averaged
    with pytest.raises(ValueError, match="positive sum"):
        weighted_average([a, b], [0, 0])


def test_frechet_distance_1d_by_hand():
    # 1-D: (m1-m2)^2 + s1 + s2 - 2 sqrt(s1 s2) = 4 + 1 + 4 - 2*2 = 5
    d = frechet_distance(
        np.array([1.0]), np.array([[1.0]]), np.array([3.0]), np.array([[4.0]])
    )
    assert d == pytest.approx(5.0)


def test_fid_proxy_zero_for_identical_sets_and_grows_with_shift():
    torch.manual_seed(0)
    f = torch.randn(500, 4)
    assert fid_proxy(f, f) == pytest.approx(0.0, abs=1e-6)
    assert fid_proxy(f, f + 2.0) == pytest.approx(16.0, rel=1e-3)  # 4 dims x 2^2


def test_kmeans_finds_separated_blobs_and_is_seeded():
    from common.maths import kmeans

    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 2, generator=g) * 0.1 + torch.tensor([5.0, 0.0])
    b = torch.randn(20, 2, generator=g) * 0.1 + torch.tensor([-5.0, 0.0])
    x = torch.cat([a, b])
    c, assign = kmeans(x, 2, seed=3)
    got = sorted(c.tolist())
    torch.testing.assert_close(torch.tensor(got[0]), b.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(got[1]), a.mean(0), atol=1e-5, rtol=0)
    assert len(set(assign[:30].tolist())) == 1 and len(set(assign[30:].tolist())) == 1
    c2, _ = kmeans(x, 2, seed=3)
    assert torch.equal(c, c2)
    assert kmeans(x[:3], 5)[0].shape == (3, 2)  # k' = min(k, N)


def test_linear_map_recovers_a_known_affine_map():
    from common.maths import apply_linear_map, fit_linear_map

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    w_true = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5], [0.25, -0.75]])  # +bias
    y = torch.cat([x, torch.ones(200, 1)], 1) @ w_true
    w = fit_linear_map(x, y, ridge=0.0)
    torch.testing.assert_close(w, w_true, atol=1e-4, rtol=0)
    out = apply_linear_map(x[:4], w)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
    # a target wider than one block of columns (a flattened token sequence):
    # each column is fitted on its own, so block j equals the narrow fit
    wide = torch.cat([y] * 4500, 1)  # 9,000 columns: blocks of 4,096
    ww = fit_linear_map(x, wide, ridge=0.0)
    assert ww.shape == (4, 9000)
    torch.testing.assert_close(ww[:, 8190:8200], w_true.repeat(1, 5), atol=1e-4, rtol=0)


def test_apportion_by_hand():
    from common.maths import apportion

    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(16, [3, 1]) == [12, 4]
    assert apportion(5, [0, 2, 1]) == [0, 3, 2]  # quotas 0, 3.33, 1.67
    assert sum(apportion(7, [0.2, 0.3, 0.5])) == 7
    with pytest.raises(ValueError):
        apportion(3, [0, 0])
