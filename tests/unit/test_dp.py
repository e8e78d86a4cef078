"""common.dp: the analytic Gaussian mechanism against values computed here by
other means (scipy's norm.cdf at the returned sigma, brentq, the worked example
in README), clipping, composition, and noise that no seed reproduces."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from common import dp

README = Path(__file__).resolve().parents[2] / "README.md"


def _delta(sigma: float, eps: float, sens: float) -> float:
    """Balle & Wang 2018, Thm 8, written out with scipy's normal CDF."""
    a = sens / (2 * sigma)
    b = eps * sigma / sens
    return norm.cdf(a - b) - math.exp(eps) * norm.cdf(-a - b)


@pytest.mark.parametrize(
    "eps, delta, sens",
    [(1.0, 1e-5, 1.0), (0.5, 1e-5, 2.0), (4.0, 1e-6, 0.2), (10.0, 1e-5, 1.0)],
)
def test_sigma_is_the_smallest_that_meets_the_exact_condition(eps, delta, sens):
    sigma = dp.analytic_gaussian_sigma(eps, delta, sens)
    assert _delta(sigma, eps, sens) <= delta * (1 + 1e-9)
    assert _delta(sigma * (1 - 1e-7), eps, sens) > delta  # and no smaller one
    # an independent root finder on the same condition
    root = brentq(lambda s: _delta(s, eps, sens) - delta, 1e-3, 1e3, xtol=1e-14)
    assert sigma == pytest.approx(root, rel=1e-9)


def test_sigma_by_hand_and_the_readme_example():
    # eps = 1, delta = 1e-5, Delta = 1: Balle & Wang's calibration gives 3.7306,
    # the classical sqrt(2 ln(1.25 / 1e-5)) = 4.8448 (Dwork & Roth, Thm A.1)
    assert dp.analytic_gaussian_sigma(1.0, 1e-5, 1.0) == pytest.approx(3.7306, abs=1e-4)
    assert math.sqrt(2 * math.log(1.25 / 1e-5)) == pytest.approx(4.8448, abs=1e-4)
    # sigma is linear in Delta: a class mean of 400 clipped (C = 1) embeddings,
    # Delta = 2 C / n = 0.005 -> sigma = 0.005 * 3.7306 = 0.018653
    assert dp.analytic_gaussian_sigma(1.0, 1e-5, 0.005) == pytest.approx(
        0.018653, abs=1e-6
    )
    # README's worked example states the same numbers
    text = README.read_text()
    section = text[text.index("## Differential privacy") :]
    assert "3.7306" in section and "0.018653" in section
    assert re.search(r"4\.84(48)?", section)


def test_the_classical_formula_fails_above_epsilon_one():
    # at eps = 10 the classical sigma is too small for (10, 1e-5)-DP
    classical = math.sqrt(2 * math.log(1.25 / 1e-5)) / 10
    assert _delta(classical, 10.0, 1.0) > 1e-5
    assert dp.analytic_gaussian_sigma(10.0, 1e-5, 1.0) > classical
    # below 1 it is valid but loose
    assert dp.analytic_gaussian_sigma(0.5, 1e-5, 1.0) < 2 * 4.8448


def test_epsilon_spent_inverts_the_calibration_and_composes():
    mu = dp.gaussian_mu(1.0, 1e-5)
    assert mu == pytest.approx(1 / 3.730632, rel=1e-6)
    assert dp.epsilon_spent(mu, 1e-5) == pytest.approx(1.0, abs=1e-9)
    # two releases of mu on the same examples: one of sqrt(2) mu
    both = dp.compose([mu, mu])
    assert both == pytest.approx(math.sqrt(2) * mu)
    eps2 = dp.epsilon_spent(both, 1e-5)
    assert 1.0 < eps2 < 2.0  # tighter than adding the epsilons
    assert _delta(1 / both, eps2, 1.0) == pytest.approx(1e-5, rel=1e-6)
    assert dp.epsilon_spent(0.0, 1e-5) == 0.0
    m = dp.spent_metrics(mu, 1e-5, 0.1)
    assert m["dp-epsilon"] == pytest.approx(1.0) and m["dp-delta"] == 1e-5
    assert dp.budget_mu(0.0, 1e-5) == 0.0


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="dp-epsilon"):
        dp.analytic_gaussian_sigma(0.0, 1e-5, 1.0)
    with pytest.raises(ValueError, match="dp-delta"):
        dp.analytic_gaussian_sigma(1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="dp-clip"):
        dp.clip_rows(torch.ones(2, 2), 0.0)
    assert dp.analytic_gaussian_sigma(1.0, 1e-5, 0.0) == 0.0


def test_clipping_by_hand():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    assert torch.allclose(dp.clip_rows(x, 1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    # [N, L, D] rows are clipped flattened
    y = torch.tensor([[[3.0], [4.0]]])
    assert torch.allclose(dp.clip_rows(y, 1.0), torch.tensor([[[0.6], [0.8]]]))
    # two examples' gradients over two parameters [B=2, 1]: example 0 is
    # (3, 4), norm 5, clipped to (0.6, 0.8); example 1 (0.3, 0.4) is kept
    a, b = dp.clipped_sum(
        [torch.tensor([[3.0], [0.3]]), torch.tensor([[4.0], [0.4]])], 1.0
    )
    assert float(a) == pytest.approx(0.9) and float(b) == pytest.approx(1.2)


def test_noise_comes_from_os_entropy_not_a_seed():
    a = dp.gaussian_noise((64,), 1.0)
    b = dp.gaussian_noise((64,), 1.0)
    assert not torch.equal(a, b)
    # no global seed brings it back
    torch.manual_seed(0)
    np.random.seed(0)
    c = dp.gaussian_noise((64,), 1.0)
    torch.manual_seed(0)
    np.random.seed(0)
    assert not torch.equal(c, dp.gaussian_noise((64,), 1.0))
    # why not torch.Generator().manual_seed(os entropy): it keeps 32 bits
    same = [
        torch.randn(4, generator=torch.Generator().manual_seed(s))
        for s in (5, 5 + 2**32)
    ]
    assert torch.equal(*same)
    # the std is sigma
    big = dp.gaussian_noise((200_000,), 0.25)
    assert float(big.std()) == pytest.approx(0.25, rel=0.02)


def test_private_class_means_noise_scale_by_hand():
    torch.manual_seed(0)
    emb = torch.randn(400, 1, 4000)  # every row has norm ~63: clipped to 1
    labels = torch.zeros(400, dtype=torch.long)
    mu = dp.gaussian_mu(1.0, 1e-5)
    ids, noisy, counts, sigma = dp.private_class_means(emb, labels, 1, mu=mu, clip=1.0)
    assert ids.tolist() == [0] and counts.tolist() == [400]
    assert sigma == pytest.approx(0.018653, abs=1e-6)  # 2 * 1 / 400 * 3.7306
    clean = dp.clip_rows(emb.double(), 1.0).mean(0)
    resid = (noisy[0] - clean).flatten()
    assert float(resid.std()) == pytest.approx(sigma, rel=0.05)


def test_private_kmeans_finds_separated_clusters_at_a_large_budget():
    torch.manual_seed(0)
    e = torch.eye(16)[0]
    x = torch.cat([torch.randn(500, 16) * 0.05 + e, torch.randn(500, 16) * 0.05 - e])
    mu = dp.gaussian_mu(20.0, 1e-5)
    centres, counts, sigma = dp.private_kmeans(x, 3, mu=mu, clip=1.0)
    # 3 Lloyd releases + the mean: each mu / 2; sums get Delta = 2 C
    assert sigma == pytest.approx(2 * 1.0 / (mu / 2))
    # every centre of many examples sits on a blob, and both blobs have one (a
    # blob may keep two centres; a third may hold a few stragglers)
    big = [float(c[0]) for c, n in zip(centres, counts, strict=True) if n > 100]
    assert all(abs(abs(v) - 1.0) < 0.1 for v in big)
    assert min(big) < 0 < max(big)
    assert float(counts.sum()) == pytest.approx(1000, abs=6 * sigma * math.sqrt(3))
    assert (centres.norm(dim=1) <= 1.0 + 1e-9).all()  # in the clip ball


def test_private_kmeans_falls_back_to_the_noisy_mean_on_few_examples():
    # 6 examples, k = 5: every cluster's noisy count (std 2 / (mu / 2) = 16) is
    # under three stds but for noise (0.13% a cluster), so the class sends its
    # noisy mean with its public count
    x = torch.randn(6, 8)
    runs = [dp.private_kmeans(x, 5, mu=0.5, clip=1.0) for _ in range(100)]
    fallbacks = [r for r in runs if len(r[0]) == 1 and r[1].tolist() == [6.0]]
    assert len(fallbacks) >= 90
    assert all(r[0].shape == (1, 8) for r in fallbacks)


def test_private_vector_is_clipped_around_its_centre():
    centre = torch.full((1, 2000), 3.0)
    x = centre + 10.0  # moved far: clipped to a step of length 1
    mu = dp.gaussian_mu(2.0, 1e-5)
    out, sigma = dp.private_vector(x, centre, mu=mu, clip=1.0)
    assert sigma == pytest.approx(2.0 / mu)
    step = torch.full((1, 2000), 1 / math.sqrt(2000))
    resid = (out - centre.double() - step).flatten()
    assert float(resid.std()) == pytest.approx(sigma, rel=0.05)
