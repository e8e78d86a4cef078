"""Merge maths of common.lora_merge against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from common.lora_merge import (
    MERGES,
    delta_w,
    merge_adapters,
    merge_dare,
    merge_dare_lora,
    merge_fedavg,
    merge_stack,
    merge_svd,
    merge_ties,
    merge_ties_lora,
    refactorize,
)

T = torch.tensor


def two_rank1_clients() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    # Client 1: B1 A1 = [[1, 0], [0, 0]]; client 2: B2 A2 = [[0, 0], [0, 1]].
    As = [T([[1.0, 0.0]]), T([[0.0, 1.0]])]
    Bs = [T([[1.0], [0.0]]), T([[0.0], [1.0]])]
    return As, Bs


def random_clients(
    n: int = 3, ranks: tuple[int, ...] = (2, 2, 2), out: int = 5, inp: int = 4
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(r, inp, generator=g) for r in ranks[:n]]
    Bs = [torch.randn(out, r, generator=g) for r in ranks[:n]]
    return As, Bs


def weighted_delta(w, s, As, Bs) -> torch.Tensor:
    """Σ (w_i / Σw) s_i B_i A_i, written out as the reference."""
    total = sum(w)
    return sum(
        wi / total * si * (b @ a) for wi, si, a, b in zip(w, s, As, Bs, strict=True)
    )


# --- fedavg (FedIT) ---------------------------------------------------------


def test_fedavg_averages_factors_and_is_inexact():
    As, Bs = two_rank1_clients()
    A, B = merge_fedavg(As, Bs, [1.0, 1.0])
    # A = [[.5, .5]], B = [[.5], [.5]] -> B A = .25 everywhere,
    # while the exact average of the updates is .5·I.
    torch.testing.assert_close(A, T([[0.5, 0.5]]))
    torch.testing.assert_close(B, T([[0.5], [0.5]]))
    torch.testing.assert_close(B @ A, T([[0.25, 0.25], [0.25, 0.25]]))
    exact = 0.5 * (Bs[0] @ As[0] + Bs[1] @ As[1])
    torch.testing.assert_close(exact, T([[0.5, 0.0], [0.0, 0.5]]))


def test_fedavg_normalises_weights():
    As, Bs = two_rank1_clients()
    A, _ = merge_fedavg(As, Bs, [3.0, 1.0])  # -> 0.75, 0.25
    torch.testing.assert_close(A, T([[0.75, 0.25]]))


def test_fedavg_needs_one_rank():
    As, Bs = random_clients(2, ranks=(2, 3))
    with pytest.raises(ValueError, match=r"As\[1\] has rank 3"):
        merge_fedavg(As, Bs, [1, 1])


# --- stack (FLoRA) ----------------------------------------------------------


def test_stack_is_exact_on_hand_example():
    As, Bs = two_rank1_clients()
    A, B = merge_stack(As, Bs, [1.0, 1.0])
    # A = cat(A1, A2) = I, B = cat(.5 B1, .5 B2) = .5 I -> B A = .5 I exactly.
    torch.testing.assert_close(A, torch.eye(2))
    torch.testing.assert_close(B, 0.5 * torch.eye(2))
    torch.testing.assert_close(B @ A, T([[0.5, 0.0], [0.0, 0.5]]))


def test_stack_folds_scalings_and_mixed_ranks():
    As, Bs = random_clients(3, ranks=(1, 2, 3))
    w, s = [1.0, 2.0, 5.0], [2.0, 0.5, 1.0]
    A, B = merge_stack(As, Bs, w, scalings=s)
    assert A.shape == (6, 4) and B.shape == (5, 6)
    exact = weighted_delta(w, s, As, Bs)
    torch.testing.assert_close(B @ A, exact, atol=1e-6, rtol=1e-6)


# --- svd --------------------------------------------------------------------


def diag_clients() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    # B1 A1 = diag(6, 4, 0), B2 A2 = diag(0, 0, 2); with weights .5/.5
    # ΔW = diag(3, 2, 1): singular values 3, 2, 1, so Σ S² = 9 + 4 + 1 = 14.
    As = [T([[1.0, 0, 0], [0, 1, 0]]), T([[0.0, 0, 1]])]
    Bs = [T([[6.0, 0], [0, 4], [0, 0]]), T([[0.0], [0], [2]])]
    return As, Bs


def test_svd_full_rank_is_exact_and_keeps_all_energy():
    As, Bs = diag_clients()
    A, B, energy = merge_svd(As, Bs, [1, 1], rank=3)
    torch.testing.assert_close(B @ A, torch.diag(T([3.0, 2.0, 1.0])), atol=1e-5, rtol=0)
    assert energy == pytest.approx(1.0)


def test_svd_truncation_energy_by_hand():
    As, Bs = diag_clients()
    A, B, energy = merge_svd(As, Bs, [1, 1], rank=2)
    # Keeps S = 3, 2: energy (9 + 4) / 14; B A = diag(3, 2, 0).
    assert energy == pytest.approx(13 / 14, abs=1e-6)
    torch.testing.assert_close(B @ A, torch.diag(T([3.0, 2.0, 0.0])), atol=1e-5, rtol=0)
    A, B, energy = merge_svd(As, Bs, [1, 1], rank=1)
    assert energy == pytest.approx(9 / 14, abs=1e-6)


def test_svd_matches_exact_weighted_average_with_scalings():
    As, Bs = random_clients(3)
    w, s = [1.0, 1.0, 2.0], [0.5, 1.0, 2.0]
    A, B, energy = merge_svd(As, Bs, w, rank=4, scalings=s)  # rank(ΔW) <= 4
    exact = weighted_delta(w, s, As, Bs)
    torch.testing.assert_close(B @ A, exact, atol=1e-5, rtol=0)
    assert energy == pytest.approx(1.0, abs=1e-6)


def test_refactorize_pads_and_handles_zero():
    A, B, energy = refactorize(torch.zeros(3, 2), rank=4)
    assert A.shape == (4, 2) and B.shape == (3, 4)
    assert energy == 1.0 and not A.any() and not B.any()


# --- ties / dare through peft -----------------------------------------------


def test_ties_sign_election_by_hand():
    d1, d2 = T([[1.0, -2.0, 3.0]]), T([[-3.0, 1.0, 1.0]])
    # density 1: no trimming. Σ = [-2, -1, 4] elects signs [-, -, +].
    # Agreeing clients: e0 only d2 -> -3; e1 only d1 -> -2; e2 both -> (3 + 1) / 2.
    out = merge_ties([d1, d2], [1, 1], density=1.0)
    torch.testing.assert_close(out, T([[-3.0, -2.0, 2.0]]))


def test_ties_trims_before_electing():
    d1, d2 = T([[1.0, -2.0, 3.0]]), T([[-3.0, 1.0, 2.0]])
    # density 0.67 keeps int(0.67 · 3) = 2 entries per client:
    # d1 -> [0, -2, 3], d2 -> [-3, 0, 2]; Σ = [-3, -2, 5] elects [-, -, +];
    # e0 -> -3, e1 -> -2, e2 -> (3 + 2) / 2 = 2.5.
    out = merge_ties([d1, d2], [1, 1], density=0.67)
    torch.testing.assert_close(out, T([[-3.0, -2.0, 2.5]]))


def test_ties_weights_are_relative_to_equal():
    d1, d2 = T([[1.0, -2.0, 3.0]]), T([[-3.0, 1.0, 1.0]])
    # Weights .75/.25 go to peft as N·w = 1.5/.5: e0 .5·-3 = -1.5, e1 1.5·-2 = -3,
    # e2 (1.5·3 + .5·1) / 2 = 2.5.
    out = merge_ties([d1, d2], [3, 1], density=1.0)
    torch.testing.assert_close(out, T([[-1.5, -3.0, 2.5]]))


def test_dare_full_density_is_weighted_sum():
    d1, d2 = T([[1.0, -2.0], [0.0, 4.0]]), T([[3.0, 2.0], [1.0, 0.0]])
    out = merge_dare([d1, d2], [1, 3], density=1.0)
    torch.testing.assert_close(out, 0.25 * d1 + 0.75 * d2)


def test_dare_is_seeded_and_keeps_global_rng():
    deltas = [torch.ones(8, 8), 2 * torch.ones(8, 8)]
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = merge_dare(deltas, [1, 1], density=0.5, seed=7)
    after = torch.rand(1)
    b = merge_dare(deltas, [1, 1], density=0.5, seed=7)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(before, after)  # caller's RNG untouched
    # Kept entries are rescaled by 1 / density: each client gives 0 or 2·value.
    assert set(a.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_ties_and_dare_lora_refactorise():
    As, Bs = random_clients(2)
    exact = 0.5 * (Bs[0] @ As[0] + Bs[1] @ As[1])
    A, B, e = merge_dare_lora(As, Bs, [1, 1], rank=4, density=1.0)
    torch.testing.assert_close(B @ A, exact, atol=1e-5, rtol=0)
    assert e == pytest.approx(1.0, abs=1e-6)
    A, B, e = merge_ties_lora(As, Bs, [1, 1], rank=1, density=0.5)
    assert A.shape == (1, 4) and B.shape == (5, 1) and 0 < e < 1


# --- errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: merge_fedavg([], [], []), "As is empty"),
        (lambda: merge_stack(*two_rank1_clients(), [1.0]), "weights has 1"),
        (lambda: merge_stack(*two_rank1_clients(), [1.0, -1.0]), "weights="),
        (lambda: merge_stack(*two_rank1_clients(), [0.0, 0.0]), "sum to 0"),
        (lambda: merge_stack(*two_rank1_clients(), [1, 1], [1.0]), "scalings has 1"),
        (lambda: merge_svd(*two_rank1_clients(), [1, 1], rank=0), "rank=0"),
        (lambda: merge_ties([T([1.0]), T([1.0, 2.0])], [1, 1], 0.5), r"deltas\[1\]"),
        (lambda: merge_dare([T([1.0])], [1], density=0.0), "density=0.0"),
        (
            lambda: merge_svd([T([[1.0, 0.0]])], [T([[1.0, 0.0]])], [1], rank=1),
            r"Bs\[0\]",
        ),
    ],
)
def test_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_nan_input_rejected():
    As, Bs = two_rank1_clients()
    As[1] = T([[float("nan"), 1.0]])
    with pytest.raises(ValueError, match=r"As\[1\] contains NaN"):
        merge_svd(As, Bs, [1, 1], rank=1)
    with pytest.raises(ValueError, match=r"deltas\[0\] contains NaN"):
        merge_ties([T([float("inf")]), T([1.0])], [1, 1], 1.0)


# --- adapter level ------------------------------------------------------------


def make_adapter(seed: int, rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "blk.to_q.lora_A.weight": torch.randn(rank, 4, generator=g),
        "blk.to_q.lora_B.weight": torch.randn(6, rank, generator=g),
        "blk.to_v.lora_A.weight": torch.randn(rank, 3, generator=g),
        "blk.to_v.lora_B.weight": torch.randn(5, rank, generator=g),
    }


@pytest.mark.parametrize("method", sorted(MERGES))
def test_merge_adapters_every_method(method):
    ads = [make_adapter(0), make_adapter(1)]
    merged, info = merge_adapters(ads, [1, 3], method, rank=3, scalings=[2.0, 2.0])
    assert set(merged) == set(ads[0])
    assert all(v.dtype == torch.float32 for v in merged.values())
    expected_rank = {"fedavg": 2, "stack": 4}.get(method, 3)
    assert info["rank"] == expected_rank
    assert merged["blk.to_v.lora_A.weight"].shape == (expected_rank, 3)
    # fedavg keeps the clients' scaling 2 (alpha = 2·r); the others fold it in.
    scaling = info["lora_alpha"] / info["rank"]
    assert scaling == (2.0 if method == "fedavg" else 1.0)
    if method in ("fedavg", "stack"):
        assert info["energy_kept"] is None
    else:
        assert 0 < info["energy_kept"] <= 1


def test_merge_adapters_stack_exact_per_layer():
    ads = [make_adapter(0), make_adapter(1)]
    merged, info = merge_adapters(ads, [1, 3], "stack", rank=1, scalings=[0.5, 2.0])
    for p in ("blk.to_q", "blk.to_v"):
        a, b = f"{p}.lora_A.weight", f"{p}.lora_B.weight"
        exact = 0.25 * delta_w(ads[0][a], ads[0][b], 0.5) + 0.75 * delta_w(
            ads[1][a], ads[1][b], 2.0
        )
        got = delta_w(merged[a], merged[b], info["lora_alpha"] / info["rank"])
        torch.testing.assert_close(got, exact, atol=1e-6, rtol=1e-6)


def test_merge_adapters_conv_factors():
    g = torch.Generator().manual_seed(0)
    ads = [
        {
            "c.lora_A.weight": torch.randn(2, 3, 3, 3, generator=g),
            "c.lora_B.weight": torch.randn(4, 2, 1, 1, generator=g),
        }
        for _ in range(2)
    ]
    merged, _ = merge_adapters(ads, [1, 1], "svd", rank=4)
    assert merged["c.lora_A.weight"].shape == (4, 3, 3, 3)
    assert merged["c.lora_B.weight"].shape == (4, 4, 1, 1)


def test_merge_adapters_errors_name_the_key():
    a, b = make_adapter(0), make_adapter(1)
    del b["blk.to_v.lora_B.weight"]
    with pytest.raises(ValueError, match=r"adapters\[1\] lacks key 'blk.to_v.lora_B"):
        merge_adapters([a, b], [1, 1], "svd", rank=2)
    b = make_adapter(1, rank=3)
    with pytest.raises(ValueError, match=r"layer 'blk.to_q'.*rank 3"):
        merge_adapters([a, b], [1, 1], "fedavg", rank=2)
    c = {**make_adapter(2), "blk.to_q.lora_magnitude_vector": torch.ones(6)}
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        merge_adapters([c], [1], "svd", rank=2)
    with pytest.raises(ValueError, match="method='mean'"):
        merge_adapters([a], [1], "mean", rank=2)
    with pytest.raises(ValueError, match="scalings="):
        merge_adapters([a, a], [1, 1], "fedavg", rank=2, scalings=[1.0, 2.0])
    bad = make_adapter(3)
    bad["blk.to_v.lora_A.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'blk.to_v'.*NaN"):
        merge_adapters([a, bad], [1, 1], "stack", rank=2)
