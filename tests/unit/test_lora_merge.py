"""common.lora_merge: hand-computed merges, and peft's add_weighted_adapter as reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.lora_merge import MERGES, delta_w, merge_adapters, merge_fedavg

T = torch.tensor


def adapter(As, Bs, prefix: str = "l") -> list[dict[str, torch.Tensor]]:
    """One single-layer adapter per client from its factors."""
    return [
        {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}
        for a, b in zip(As, Bs, strict=True)
    ]


def merged_delta(merged, info, prefix: str = "l") -> torch.Tensor:
    a, b = merged[f"{prefix}.lora_A.weight"], merged[f"{prefix}.lora_B.weight"]
    return delta_w(a.flatten(1), b.flatten(1), info["lora_alpha"] / info["rank"])


def weighted_delta(w, s, As, Bs) -> torch.Tensor:
    """Σ (w_i / Σw) s_i B_i A_i, written out as the reference."""
    total = sum(w)
    return sum(
        wi / total * si * (b @ a) for wi, si, a, b in zip(w, s, As, Bs, strict=True)
    )


def two_rank1_clients() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    # Client 1: B1 A1 = [[1, 0], [0, 0]]; client 2: B2 A2 = [[0, 0], [0, 1]].
    As = [T([[1.0, 0.0]]), T([[0.0, 1.0]])]
    Bs = [T([[1.0], [0.0]]), T([[0.0], [1.0]])]
    return As, Bs


def random_clients(
    ranks: tuple[int, ...] = (2, 2, 2), out: int = 5, inp: int = 4
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(r, inp, generator=g) for r in ranks]
    Bs = [torch.randn(out, r, generator=g) for r in ranks]
    return As, Bs


def rows(*ds: list[float]) -> list[dict[str, torch.Tensor]]:
    """Rank-1 clients whose ΔW_i is the row ``d_i`` (B = [[1]], A = [d_i])."""
    return adapter([T([d]) for d in ds], [T([[1.0]])] * len(ds))


# --- fedavg (FedIT, kept here) ------------------------------------------------


def test_fedavg_averages_factors_and_is_inexact():
    As, Bs = two_rank1_clients()
    A, B = merge_fedavg(As, Bs, [1.0, 1.0])
    # A = [[.5, .5]], B = [[.5], [.5]] -> B A = .25 everywhere,
    # while the exact average of the updates is .5·I.
    torch.testing.assert_close(A, T([[0.5, 0.5]]))
    torch.testing.assert_close(B, T([[0.5], [0.5]]))
    torch.testing.assert_close(B @ A, T([[0.25, 0.25], [0.25, 0.25]]))
    merged, info = merge_adapters(adapter(As, Bs), [1, 1], "fedavg", rank=4)
    torch.testing.assert_close(merged["l.lora_A.weight"], A)
    assert (info["rank"], info["lora_alpha"], info["energy_kept"]) == (1, 1.0, None)


def test_fedavg_normalises_weights():
    As, Bs = two_rank1_clients()
    A, _ = merge_fedavg(As, Bs, [3.0, 1.0])  # -> 0.75, 0.25
    torch.testing.assert_close(A, T([[0.75, 0.25]]))


def test_fedavg_needs_one_rank():
    As, Bs = random_clients(ranks=(2, 3))
    with pytest.raises(ValueError, match=r"As\[1\] has rank 3"):
        merge_fedavg(As, Bs, [1, 1])


# --- stack (FLoRA, peft "cat") ------------------------------------------------


def test_stack_is_exact_on_hand_example():
    As, Bs = two_rank1_clients()
    merged, info = merge_adapters(adapter(As, Bs), [1.0, 1.0], "stack", rank=1)
    # peft's cat: A = cat(.5 A1, .5 A2) = .5 I, B = cat(B1, B2) = I -> B A = .5 I.
    torch.testing.assert_close(merged["l.lora_A.weight"], 0.5 * torch.eye(2))
    torch.testing.assert_close(merged["l.lora_B.weight"], torch.eye(2))
    assert (info["rank"], info["lora_alpha"]) == (2, 2.0)
    torch.testing.assert_close(merged_delta(merged, info), 0.5 * torch.eye(2))


def test_stack_folds_scalings_and_mixed_ranks():
    As, Bs = random_clients(ranks=(1, 2, 3))
    w, s = [1.0, 2.0, 5.0], [2.0, 0.5, 1.0]
    merged, info = merge_adapters(adapter(As, Bs), w, "stack", rank=1, scalings=s)
    assert merged["l.lora_A.weight"].shape == (6, 4) and info["rank"] == 6
    exact = weighted_delta(w, s, As, Bs)
    torch.testing.assert_close(merged_delta(merged, info), exact, atol=1e-6, rtol=1e-6)


# --- svd ----------------------------------------------------------------------


def diag_clients() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    # B1 A1 = diag(6, 4, 0), B2 A2 = diag(0, 0, 2); with weights .5/.5
    # ΔW = diag(3, 2, 1): singular values 3, 2, 1, so Σ S² = 9 + 4 + 1 = 14.
    As = [T([[1.0, 0, 0], [0, 1, 0]]), T([[0.0, 0, 1]])]
    Bs = [T([[6.0, 0], [0, 4], [0, 0]]), T([[0.0], [0], [2]])]
    return As, Bs


def test_svd_full_rank_is_exact_and_keeps_all_energy():
    merged, info = merge_adapters(adapter(*diag_clients()), [1, 1], "svd", rank=3)
    got = merged_delta(merged, info)
    torch.testing.assert_close(got, torch.diag(T([3.0, 2.0, 1.0])), atol=1e-5, rtol=0)
    assert info["energy_kept"] == pytest.approx(1.0)


def test_svd_truncation_energy_by_hand():
    ads = adapter(*diag_clients())
    merged, info = merge_adapters(ads, [1, 1], "svd", rank=2)
    # Keeps S = 3, 2: energy (9 + 4) / 14; B A = diag(3, 2, 0).
    assert info["energy_kept"] == pytest.approx(13 / 14, abs=1e-6)
    got = merged_delta(merged, info)
    torch.testing.assert_close(got, torch.diag(T([3.0, 2.0, 0.0])), atol=1e-5, rtol=0)
    _, info = merge_adapters(ads, [1, 1], "svd", rank=1)
    assert info["energy_kept"] == pytest.approx(9 / 14, abs=1e-6)


def test_svd_matches_exact_weighted_average_with_scalings():
    As, Bs = random_clients()
    w, s = [1.0, 1.0, 2.0], [0.5, 1.0, 2.0]
    merged, info = merge_adapters(adapter(As, Bs), w, "svd", rank=4, scalings=s)
    exact = weighted_delta(w, s, As, Bs)  # rank(ΔW) <= 4
    torch.testing.assert_close(merged_delta(merged, info), exact, atol=1e-5, rtol=0)
    assert info["energy_kept"] == pytest.approx(1.0, abs=1e-6)


def test_svd_pads_layers_smaller_than_rank():
    # [5, 3] Linear and a 1x1 conv with 2 outputs: min(out, in) < rank = 4.
    g = torch.Generator().manual_seed(0)
    ads = [
        {
            "l.lora_A.weight": torch.randn(2, 3, generator=g),
            "l.lora_B.weight": torch.randn(5, 2, generator=g),
            "c.lora_A.weight": torch.randn(2, 6, 1, 1, generator=g),
            "c.lora_B.weight": torch.randn(2, 2, 1, 1, generator=g),
        }
        for _ in range(2)
    ]
    merged, info = merge_adapters(ads, [1, 1], "svd", rank=4)
    assert info["rank"] == 4
    assert merged["l.lora_A.weight"].shape == (4, 3)
    assert merged["c.lora_B.weight"].shape == (2, 4, 1, 1)
    assert not merged["l.lora_A.weight"][3].any()  # the padded row
    As = [ad["l.lora_A.weight"] for ad in ads]
    Bs = [ad["l.lora_B.weight"] for ad in ads]
    exact = weighted_delta([1, 1], [1, 1], As, Bs)
    torch.testing.assert_close(merged_delta(merged, info), exact, atol=1e-5, rtol=0)


def test_one_client_comes_back_unchanged():
    # peft merges a single adapter with "linear": sqrt(s) in each factor, rank r_1.
    As, Bs = random_clients(ranks=(2,))
    for method in ("stack", "svd", "ties", "dare"):
        merged, info = merge_adapters(
            adapter(As, Bs), [5], method, rank=4, scalings=[2.0]
        )
        assert info["rank"] == 2 and info["lora_alpha"] == 2.0
        exact = 2.0 * Bs[0] @ As[0]
        torch.testing.assert_close(merged_delta(merged, info), exact)


# --- ties / dare (peft "ties_svd" / "dare_linear_svd") ------------------------


def ties_row(ads, weights, density) -> torch.Tensor:
    merged, info = merge_adapters(ads, weights, "ties", rank=1, density=density)
    return merged_delta(merged, info)


def test_ties_sign_election_by_hand():
    ads = rows([1.0, -2.0, 3.0], [-3.0, 1.0, 1.0])
    # density 1: no trimming. Σ = [-2, -1, 4] elects signs [-, -, +].
    # Agreeing clients: e0 only d2 -> -3; e1 only d1 -> -2; e2 both -> (3 + 1) / 2.
    got = ties_row(ads, [1, 1], 1.0)
    torch.testing.assert_close(got, T([[-3.0, -2.0, 2.0]]), atol=1e-5, rtol=0)


def test_ties_trims_before_electing():
    ads = rows([1.0, -2.0, 3.0], [-3.0, 1.0, 2.0])
    # density 0.67 keeps int(0.67 · 3) = 2 entries per client:
    # d1 -> [0, -2, 3], d2 -> [-3, 0, 2]; Σ = [-3, -2, 5] elects [-, -, +];
    # e0 -> -3, e1 -> -2, e2 -> (3 + 2) / 2 = 2.5.
    got = ties_row(ads, [1, 1], 0.67)
    torch.testing.assert_close(got, T([[-3.0, -2.0, 2.5]]), atol=1e-5, rtol=0)


def test_ties_weights_are_relative_to_equal():
    ads = rows([1.0, -2.0, 3.0], [-3.0, 1.0, 1.0])
    # Weights .75/.25 go to peft as N·w = 1.5/.5: e0 .5·-3 = -1.5, e1 1.5·-2 = -3,
    # e2 (1.5·3 + .5·1) / 2 = 2.5.
    got = ties_row(ads, [3, 1], 1.0)
    torch.testing.assert_close(got, T([[-1.5, -3.0, 2.5]]), atol=1e-5, rtol=0)


def test_ties_full_density_equal_signs_is_weighted_sum():
    # All factors positive, so every ΔW_i entry is > 0 and every client agrees.
    As, Bs = random_clients()
    As, Bs = [a.abs() for a in As], [b.abs() for b in Bs]
    w, s = [1.0, 2.0, 5.0], [1.0, 0.5, 2.0]
    merged, info = merge_adapters(
        adapter(As, Bs), w, "ties", rank=4, density=1.0, scalings=s
    )
    exact = weighted_delta(w, s, As, Bs)
    torch.testing.assert_close(merged_delta(merged, info), exact, atol=1e-5, rtol=0)


def test_dare_full_density_is_weighted_sum():
    As, Bs = random_clients()
    merged, info = merge_adapters(
        adapter(As, Bs), [1, 3, 4], "dare", rank=4, density=1.0
    )
    exact = weighted_delta([1, 3, 4], [1, 1, 1], As, Bs)
    torch.testing.assert_close(merged_delta(merged, info), exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_density_changes_the_merge(method):
    ads = adapter(*random_clients(out=8, inp=8))
    low = merge_adapters(ads, [1, 1, 1], method, rank=8, density=0.3)
    high = merge_adapters(ads, [1, 1, 1], method, rank=8, density=0.9)
    diff = merged_delta(*low) - merged_delta(*high)
    assert diff.abs().max() > 0.1


def test_dare_is_seeded_and_keeps_global_rng():
    # ΔW_1 = ones, ΔW_2 = 2·ones (8 x 8, rank 1).
    ads = adapter([torch.ones(1, 8)] * 2, [torch.ones(8, 1), 2 * torch.ones(8, 1)])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = merged_delta(*merge_adapters(ads, [1, 1], "dare", rank=8, seed=7))
    after = torch.rand(1)
    b = merged_delta(*merge_adapters(ads, [1, 1], "dare", rank=8, seed=7))
    c = merged_delta(*merge_adapters(ads, [1, 1], "dare", rank=8, seed=8))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(before, after)  # caller's RNG untouched
    # Kept entries are rescaled by 1 / density: .5·(2·m1) + .5·(2·2·m2) in {0..3}.
    torch.testing.assert_close(a, a.round(), atol=1e-4, rtol=0)
    assert set(a.round().unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}


# --- peft's add_weighted_adapter as the reference -----------------------------


class Toy(nn.Module):
    """Two Linear layers and a Conv2d, registered in sorted name order (as
    merge_adapters mirrors them, so DARE draws its masks in the same order)."""

    def __init__(self) -> None:
        super().__init__()
        self.blk = nn.Module()
        self.blk.to_q = nn.Linear(6, 5)
        self.blk.to_v = nn.Linear(5, 7)
        self.conv = nn.Conv2d(3, 8, 3)


@pytest.mark.parametrize(
    ("method", "combination_type"),
    [
        ("stack", "cat"),
        ("svd", "svd"),
        ("ties", "ties_svd"),
        ("dare", "dare_linear_svd"),
    ],
)
def test_matches_peft_add_weighted_adapter(method, combination_type):
    from peft import LoraConfig, get_peft_model

    # 1. A peft model with three client adapters of random factors
    torch.manual_seed(0)
    targets = ["blk.to_q", "blk.to_v", "conv"]
    ranks, alphas, weights = [2, 3, 2], [4.0, 3.0, 8.0], [1.0, 3.0, 2.0]
    names = ["client0", "client1", "client2"]
    model = None
    for name, r, alpha in zip(names, ranks, alphas, strict=True):
        config = LoraConfig(
            r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False
        )
        if model is None:
            model = get_peft_model(Toy(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    layers = {p: model.base_model.model.get_submodule(p) for p in targets}
    ads = [{} for _ in names]
    with torch.no_grad():
        for p, layer in layers.items():
            for ad, name in zip(ads, names, strict=True):
                for f in ("lora_A", "lora_B"):
                    weight = getattr(layer, f)[name].weight
                    weight.copy_(torch.randn_like(weight))
                    ad[f"{p}.{f}.weight"] = weight.detach().clone()

    # 2. The reference: peft's merge, with the weights merge_adapters documents
    w = [x / sum(weights) for x in weights]
    peft_w = [3 * x for x in w] if method == "ties" else w
    torch.manual_seed(11)  # DARE's masks
    model.add_weighted_adapter(
        names, peft_w, "merged", combination_type, svd_rank=4, density=0.5
    )

    # 3. merge_adapters on the flat state dicts
    scalings = [a / r for a, r in zip(alphas, ranks, strict=True)]
    merged, info = merge_adapters(
        ads, weights, method, rank=4, density=0.5, seed=11, scalings=scalings
    )
    config = model.peft_config["merged"]
    assert (info["rank"], info["lora_alpha"]) == (config.r, config.lora_alpha)
    for p, layer in layers.items():
        ref = layer.get_delta_weight("merged")
        got = merged_delta(merged, info, p).reshape(ref.shape)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


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
        got = merged_delta(merged, info, p)
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


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
@pytest.mark.parametrize("method", ["ties", "dare"])
def test_bad_density_is_named(method, density):
    with pytest.raises(ValueError, match=rf"density={density}.*\(0, 1\]"):
        merge_adapters([make_adapter(0)] * 2, [1, 1], method, rank=2, density=density)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": [1.0]}, "weights has 1"),
        ({"weights": [1.0, -1.0]}, "weights="),
        ({"weights": [0.0, 0.0]}, "sum to 0"),
        ({"scalings": [1.0]}, "scalings has 1"),
        ({"scalings": [1.0, 0.0]}, "scalings="),
        ({"rank": 0}, "rank=0"),
        ({"method": "mean"}, "method='mean'"),
    ],
)
def test_errors_name_the_argument(kwargs, match):
    args = {"weights": [1, 1], "method": "svd", "rank": 2, **kwargs}
    ads = [make_adapter(0), make_adapter(1)]
    with pytest.raises(ValueError, match=match):
        merge_adapters(ads, args.pop("weights"), args.pop("method"), **args)


def test_merge_adapters_errors_name_the_key():
    a, b = make_adapter(0), make_adapter(1)
    del b["blk.to_v.lora_B.weight"]
    with pytest.raises(ValueError, match=r"adapters\[1\] lacks key 'blk.to_v.lora_B"):
        merge_adapters([a, b], [1, 1], "svd", rank=2)
    b = make_adapter(1, rank=3)
    with pytest.raises(ValueError, match=r"layer 'blk.to_q'.*rank 3"):
        merge_adapters([a, b], [1, 1], "fedavg", rank=2)
    b["blk.to_v.lora_A.weight"] = torch.randn(2, 3)
    b["blk.to_v.lora_B.weight"] = torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"adapters\[1\] layer 'blk.to_v' has rank 2"):
        merge_adapters([a, b], [1, 1], "svd", rank=2)
    b = make_adapter(1)
    b["blk.to_q.lora_A.weight"] = torch.randn(2, 5)
    with pytest.raises(
        ValueError, match=r"adapters\[1\] layer 'blk.to_q' has A \(2, 5\)"
    ):
        merge_adapters([a, b], [1, 1], "svd", rank=2)
    b = make_adapter(1)
    b["blk.to_q.lora_B.weight"] = torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"adapters\[1\]\['blk.to_q.lora_B.weight'\]"):
        merge_adapters([a, b], [1, 1], "svd", rank=2)
    c = {**make_adapter(2), "blk.to_q.lora_magnitude_vector": torch.ones(6)}
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        merge_adapters([c], [1], "svd", rank=2)
    with pytest.raises(ValueError, match="scalings="):
        merge_adapters([a, a], [1, 1], "fedavg", rank=2, scalings=[1.0, 2.0])
    bad = make_adapter(3)
    bad["blk.to_v.lora_A.weight"][0, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"adapters\[1\]\['blk.to_v.lora_A.weight'\].*NaN"
    ):
        merge_adapters([a, bad], [1, 1], "stack", rank=2)


def test_nan_after_merge_names_the_layer():
    # Finite inputs whose merge overflows float32.
    big = [{"l.lora_A.weight": T([[3e38]]), "l.lora_B.weight": T([[3e38]])}] * 2
    with pytest.raises(ValueError, match=r"layer 'l': merge produced NaN/Inf"):
        merge_adapters(big, [1, 1], "stack", rank=1, scalings=[10.0, 10.0])
