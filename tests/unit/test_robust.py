"""Robust aggregation and the plausibility screens, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from common.robust import (
    coordinate_median,
    krum_scores,
    krum_select,
    multi_krum,
    norm_outliers,
    robust_centre,
    robust_reduce_conditions,
    robust_state_dicts,
    screen_uploads,
    trim_count,
    trimmed_centre,
    trimmed_mean,
    upload_parts,
    vector_outliers,
)


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def test_coordinate_median_by_hand():
    # coordinate 0: sorted [1, 2, 100] -> 2; coordinate 1: sorted [-5, 10, 20] -> 10
    got = coordinate_median([t(1, 10), t(2, 20), t(100, -5)])
    assert got.tolist() == [2.0, 10.0]
    # an even count: the mean of the two middle values, (0 + 4) / 2 = 2
    assert coordinate_median([t(0), t(4)]).tolist() == [2.0]
    with pytest.raises(ValueError, match="shape mismatch"):
        coordinate_median([t(1), t(1, 2)])


def test_trimmed_mean_by_hand():
    # [1, 2, 3, 100], one dropped at each end: (2 + 3) / 2 = 2.5
    assert trimmed_mean([t(1), t(100), t(3), t(2)], 1).tolist() == [2.5]
    assert trimmed_mean([t(7)], 0).tolist() == [7.0]
    with pytest.raises(ValueError, match="leaves nothing"):
        trimmed_mean([t(1), t(2)], 1)
    # floor(0.25 * 4) = 1; floor(0.4 * 2) = 0; floor(0.45 * 3) = 1; never all
    assert [trim_count(4, 0.25), trim_count(2, 0.4), trim_count(3, 0.45)] == [1, 0, 1]


def test_krum_scores_and_selection_by_hand():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    # f = 1: n - f - 2 = 1 neighbour: 0 -> 1 (1), 1 -> 0 (1), 2 -> 1 (1), 10 -> 2 (64)
    assert krum_scores(x, 1).tolist() == [1.0, 1.0, 1.0, 64.0]
    # f = 0: 2 neighbours: 0: 1 + 4 = 5; 1: 1 + 1 = 2; 2: 1 + 4 = 5; 10: 64 + 81
    assert krum_scores(x, 0).tolist() == [5.0, 2.0, 5.0, 145.0]
    # multi-Krum keeps m = n - f = 3 of the lowest scores; their mean is 1
    assert krum_select(x, 1) == [0, 1, 2]
    mean, kept = multi_krum(list(x), 1)
    assert kept == [0, 1, 2] and mean.tolist() == [1.0]
    # the kept ones keep their weights: (0 * 1 + 1 * 1 + 2 * 2) / 4 = 1.25
    mean, _ = multi_krum(list(x), 1, weights=[1, 1, 2, 100])
    assert mean.tolist() == [1.25]


def _states():
    return [
        {"w": t(1, 2), "n": torch.tensor(5)},
        {"w": t(3, 4), "n": torch.tensor(7)},
        {"w": t(1e30, -1e30), "n": torch.tensor(9)},
    ]


def test_robust_state_dicts_by_hand():
    states, w = _states(), [1.0, 1.0, 1.0]
    # median: coordinate 0 sorted [1, 3, 1e30] -> 3; coordinate 1 [-1e30, 2, 4] -> 2
    med, info = robust_state_dicts(states, w, "median", 0.34)
    assert med["w"].tolist() == [3.0, 2.0] and info["rule"] == "median"
    assert int(med["n"]) == 5  # integer buffers: the first client's, as in FedAvg
    # trimmed-mean, floor(0.34 * 3) = 1 at each end: the middle value, the median
    tm, info = robust_state_dicts(states, w, "trimmed-mean", 0.34)
    assert tm["w"].tolist() == [3.0, 2.0] and info["trimmed"] == 1
    # krum, f = floor(0.34 * 3) = 1, one neighbour: scores ||(1,2)-(3,4)||^2 = 8,
    # 8, ~1e60; the 2 kept average to (2, 3)
    kr, info = robust_state_dicts(states, w, "krum", 0.34)
    assert kr["w"].tolist() == [2.0, 3.0] and info["kept"] == [0, 1]
    # mean: one-shot FedAvg, the attacker moves it to ~1e30 / 3
    mean, _ = robust_state_dicts(states, w, "mean", 0.34)
    assert float(mean["w"][0]) == pytest.approx(1e30 / 3, rel=1e-6)
    with pytest.raises(ValueError, match="not one of"):
        robust_state_dicts(states, w, "mode", 0.2)


def test_trimmed_centre_by_hand():
    v = torch.tensor([[0.0], [1.0], [2.0], [100.0]])
    # median 1.5; distances 1.5, 0.5, 0.5, 98.5; floor(0.25 * 4) = 1 dropped: 100
    centre, kept = trimmed_centre(v, fraction=0.25)
    assert centre.tolist() == [1.0] and kept.tolist() == [True, True, True, False]
    # weights [1, 1, 2] over the kept: (0 + 1 + 2 * 2) / 4 = 1.25
    centre, _ = trimmed_centre(v, torch.tensor([1.0, 1.0, 2.0, 1.0]), 0.25)
    assert centre.tolist() == [1.25]
    # fraction 0: the plain mean, 103 / 4
    assert trimmed_centre(v)[0].tolist() == [25.75]
    # shape [M, tokens, dim] -> a centre [tokens, dim]
    assert trimmed_centre(torch.ones(3, 1, 4), fraction=0.3)[0].shape == (1, 4)


def test_norm_outliers_by_hand():
    # median of [0.9, 1, 1.2, 50] = (1 + 1.2) / 2 = 1.1; 50 > 5 x 1.1
    flags = norm_outliers([1.0, 1.2, 0.9, 50.0])
    assert flags[:3] == [None, None, None] and "over 5 x" in str(flags[3])
    # median 1; 0.1 < 1 / 5
    assert "under" in str(norm_outliers([1.0, 1.0, 0.1])[2])
    assert norm_outliers([1.0, 1e6]) == [None, None]  # two: no majority
    assert norm_outliers([1.0, 1.0, math.inf])[2] is not None


def test_vector_outliers_by_hand():
    vecs = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.8, 0.0], [-1.0, 0.0], [5.0, 5.0]])
    ids = torch.tensor([0, 0, 0, 0, 1])
    owners = torch.tensor([10, 11, 12, 13, 13])
    # class 0: median (0.9, 0); distances 0.1, sqrt(0.05) = 0.224, 0.1, 1.9;
    # their median (0.1 + 0.224) / 2 = 0.162 (one class: the floor is 1e-3 x the
    # median norm, 0.001); 1.9 > 4 x 0.162 = 0.647: owner 13.
    # class 1 has one owner: nothing to compare with.
    out = vector_outliers(vecs, ids, owners)
    assert list(out) == [13] and "class 0" in out[13]
    # class 2 from owners 20-23: (0, 5), (0, 5), (0.3, 5), (0, 15): median (0, 5),
    # distances 0, 0, 0.3, 10. Pooled with class 0's: [0, 0, 0.1, 0.1, 0.224,
    # 0.3, 1.9, 10], median 0.162; but the class centres (0.9, 0) and (0, 5) are
    # sqrt(25.81) = 5.080 apart, so the scale is at least 5.080 / 4 = 1.270: only
    # a point more than 5.080 from its centre is flagged: owner 23 (10), not
    # owner 13 (1.9, nearer its class than the classes are to each other)
    more = torch.tensor([[0.0, 5.0], [0.0, 5.0], [0.3, 5.0], [0.0, 15.0]])
    out = vector_outliers(
        torch.cat([vecs, more]),
        torch.cat([ids, torch.tensor([2, 2, 2, 2])]),
        torch.cat([owners, torch.tensor([20, 21, 22, 23])]),
    )
    assert list(out) == [23] and "class 2" in out[23]


def test_vector_outliers_average_an_owners_prototypes_first():
    # three owners each send two spread prototypes of class 0, (0, 1) and
    # (2, -1): each owner's point is their mean (1, 0), the same for all three
    protos = torch.tensor([[0.0, 1.0], [2.0, -1.0]]).repeat(3, 1)
    owners = torch.tensor([1, 1, 2, 2, 3, 3])
    assert vector_outliers(protos, torch.zeros(6, dtype=torch.int64), owners) == {}


def test_upload_parts_follows_the_payload_convention():
    lora = {
        "adapter/x.lora_A.weight": torch.ones(2, 3),
        "emb/mean": torch.ones(2, 1, 4, dtype=torch.float16),
        "emb/class_ids": torch.tensor([0, 3]),
        "emb/counts": torch.tensor([5, 6]),
    }
    p = upload_parts(lora)
    assert list(p.weights) == ["adapter/x.lora_A.weight"]
    assert len(p.vectors) == 1 and p.vectors[0][1].tolist() == [0, 3]
    assert p.vector_keys == [("emb/mean", "emb/class_ids")]
    state = {"w": torch.ones(2), "bn.num_batches_tracked": torch.tensor(3)}
    p = upload_parts(state)
    assert list(p.weights) == ["w"] and not p.vectors


def test_screen_uploads_flags_the_scaled_client_only():
    torch.manual_seed(0)
    base = {"w": torch.randn(8), "b": torch.randn(2)}
    honest = [
        {k: v + 0.05 * torch.randn_like(v) for k, v in base.items()} for _ in range(4)
    ]
    scaled = {k: 50 * v for k, v in base.items()}
    reasons = screen_uploads([*honest, scaled])
    assert reasons[:4] == [None] * 4 and "weight norm" in str(reasons[4])


def test_robust_centre_by_hand():
    v = torch.tensor([[0.0], [1.0], [2.0], [100.0]])
    w = torch.ones(4, dtype=torch.float64)
    assert robust_centre(v, w, "mean", 0.25).tolist() == [25.75]  # 103 / 4
    assert robust_centre(v, w, "median", 0.25).tolist() == [1.5]  # (1 + 2) / 2
    assert robust_centre(v, w, "trimmed-mean", 0.25).tolist() == [1.0]  # 100 out
    # krum, f = floor(0.25 * 4) = 1, one neighbour: scores 1, 1, 1, 98^2; the
    # three kept average to 1
    assert robust_centre(v, w, "krum", 0.25).tolist() == [1.0]


def test_robust_reduce_conditions_keeps_the_clusters_and_their_weights():
    # a class's four vectors reduced to k = 1 representative, one pushed to 100:
    # trimmed-mean drops it (floor(0.25 * 4) = 1), the centre is (0 + 1 + 2) / 3;
    # the representative still stands for all four (weight 4)
    v = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [100.0, 0.0]])
    w = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    c, cw, assign = robust_reduce_conditions(v, w, 1, 0, "trimmed-mean", 0.25)
    assert c.tolist() == [[1.0, 0.0]] and cw.tolist() == [4.0]
    assert assign.tolist() == [0, 0, 0, 0]
    c, _, _ = robust_reduce_conditions(v, w, 1, 0, "mean", 0.25)
    assert c.tolist() == [[25.75, 0.0]]  # the plain weighted k-means centre


def test_rules_are_the_config_choices():
    from typing import get_args

    from common.config import RobustRule
    from common.robust import RULES

    assert get_args(RobustRule) == RULES
