"""FedLD's maths, pure: a diagonal Gaussian mixture fitted by EM, and draws from it.

No Flower, no I/O: functions of tensors, checked by hand in ``tests/methods/test_fedld.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.maths import kmeans

VAR_FLOOR = 1e-4  # sklearn's reg_covar, raised so a variance survives fp16 (6e-5)


@dataclass
class Mixture:
    """``K`` diagonal Gaussians over ``D`` values: ``p(x) = sum_k w_k N(x; mu_k,
    diag(var_k))`` with ``w_k = counts_k / sum(counts)``."""

    means: torch.Tensor  # [K, D]
    variances: torch.Tensor  # [K, D], >= VAR_FLOOR
    counts: torch.Tensor  # [K] int64, >= 1: points whose likeliest component is k

    @property
    def weights(self) -> torch.Tensor:
        """The mixture weights: each component's image count over the
        class's total."""
        c = self.counts.double()
        return c / c.sum()


def log_gaussian(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
) -> torch.Tensor:
    """``log N(x; mean, diag(var))`` for every row of ``x`` ``[N, D]`` and every
    component ``[K, D]``: ``[N, K]`` with
    ``-1/2 sum_d (log(2 pi var_kd) + (x_nd - mu_kd)^2 / var_kd)``."""
    x, mean, var = x.double(), mean.double(), var.double()
    quad = ((x[:, None, :] - mean[None]) ** 2 / var[None]).sum(-1)
    return -0.5 * (quad + torch.log(2 * math.pi * var).sum(-1)[None])


def mixture_log_likelihood(x: torch.Tensor, m: Mixture) -> torch.Tensor:
    """``log p(x_n)`` per row ``[N]`` (log-sum-exp over the components)."""
    logp = log_gaussian(x, m.means, m.variances) + m.weights.log()[None]
    return torch.logsumexp(logp, dim=1)


def fit_gmm(
    x: torch.Tensor,
    k: int,
    iters: int = 50,
    seed: int = 0,
    var_floor: float = VAR_FLOOR,
) -> Mixture:
    """Fit ``min(k, N)`` diagonal Gaussians to ``x`` ``[N, D]`` by EM (Dempster
    et al. 1977), as sklearn's ``GaussianMixture(covariance_type="diag")``:

    1. initialise with k-means (k-means++ seeding from ``seed``): means are the
       centres, variances the clusters' own (``var_floor`` where a cluster has one
       point), weights the cluster sizes;
    2. E-step: ``r_nk = w_k N(x_n; mu_k, var_k) / sum_j w_j N(x_n; mu_j, var_j)``;
    3. M-step: ``N_k = sum_n r_nk``, ``w_k = N_k / N``,
       ``mu_k = sum_n r_nk x_n / N_k``,
       ``var_k = sum_n r_nk (x_n - mu_k)^2 / N_k + var_floor``;

    ``iters`` rounds of 2-3, stopping early when the mean log-likelihood gains
    less than 1e-6. Components left with no point (``N_k < 1e-8``) are dropped.
    ``counts`` are the points whose likeliest component is ``k`` (components
    that win none are dropped too, so every count is >= 1).
    """
    # 1. Check inputs and initialise with k-means
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"fit_gmm: x must be [N, D] with N >= 1, got {tuple(x.shape)}")
    if k < 1 or iters < 1 or var_floor <= 0:
        raise ValueError(
            f"fit_gmm: k={k}, iters={iters} >= 1, var_floor={var_floor} > 0"
        )
    x = x.double()
    n = len(x)
    centres, assign = kmeans(x, k, seed=seed)
    onehot = torch.nn.functional.one_hot(assign, len(centres)).double()
    resp = onehot
    prev = -math.inf
    for _ in range(iters + 1):
        # 3. M-step (the first one turns the k-means assignment into parameters)
        nk = resp.sum(0)
        keep = nk > 1e-8
        resp, nk = resp[:, keep], nk[keep]
        w = nk / n
        mu = (resp.T @ x) / nk[:, None]
        var = (resp.T @ x**2) / nk[:, None] - mu**2
        var = var.clamp_min(0) + var_floor
        # 2. E-step
        logp = log_gaussian(x, mu, var) + w.log()[None]
        ll = torch.logsumexp(logp, dim=1, keepdim=True)
        resp = (logp - ll).exp()
        mean_ll = float(ll.mean())
        if mean_ll - prev < 1e-6:
            break
        prev = mean_ll
    counts = torch.bincount(resp.argmax(1), minlength=resp.shape[1])
    won = counts > 0
    return Mixture(mu[won].float(), var[won].float(), counts[won].to(torch.int64))


def components_for(n: int, k: int, min_per_component: int) -> int:
    """Components for a class of ``n`` images: ``k``, but no more than one per
    ``min_per_component`` images (at least one): ``max(1, min(k, n // m))``."""
    return max(1, min(k, n // max(1, min_per_component)))


def draw(
    means: torch.Tensor, variances: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """One draw per row from its component: ``z = mu + sqrt(var) * noise`` with
    ``noise ~ N(0, I)`` given (each image draws its own, seeded)."""
    return means.float() + variances.float().sqrt() * noise.float()
