"""bench poison's attacks and its choice of malicious clients (pure parts)."""

from __future__ import annotations

import torch

from bench.poison import attack_tensors, defence_keys, malicious_partitions


def test_malicious_partitions_are_nested_and_seeded():
    ten = malicious_partitions(10, 0.1, 0)
    thirty = malicious_partitions(10, 0.3, 0)
    assert len(ten) == 1 and len(thirty) == 3 and set(ten) <= set(thirty)
    assert malicious_partitions(10, 0.3, 0) == thirty
    assert malicious_partitions(10, 0.0, 0) == []


def test_attacks_change_what_the_payload_holds():
    oscar = {
        "mean": torch.tensor([[[3.0, 4.0]], [[0.0, 1.0]]], dtype=torch.float16),
        "class_ids": torch.tensor([0, 7]),
        "counts": torch.tensor([5, 6]),
    }
    pushed = attack_tensors(oscar, "push-embedding", 10, 0)
    assert pushed is not None and pushed["mean"].dtype == torch.float16
    # v + 5 ||v|| u: the row of norm 5 moves by 25, the row of norm 1 by 5
    moved = (pushed["mean"].float() - oscar["mean"].float()).flatten(1).norm(dim=1)
    assert torch.allclose(moved, torch.tensor([25.0, 5.0]), rtol=1e-2)
    flipped = attack_tensors(oscar, "flip-labels", 10, 0)
    assert flipped is not None and flipped["class_ids"].tolist() == [9, 2]
    assert attack_tensors(oscar, "scale-x50", 10, 0) is None  # no weights
    state = {"w": torch.ones(2), "n": torch.tensor(3)}
    scaled = attack_tensors(state, "scale-x50", 10, 0)
    assert scaled is not None and scaled["w"].tolist() == [50.0, 50.0]
    assert int(scaled["n"]) == 3
    # a weights-only upload: labels are flipped on the client, not here
    assert attack_tensors(state, "flip-labels", 10, 0) is None
    assert defence_keys("screen")["screen-outliers"] is True
    assert defence_keys("krum") == {
        "robust-aggregation": "krum",
        "screen-outliers": False,
    }
