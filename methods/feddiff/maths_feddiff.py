"""FedDiff's maths as pure functions (section 2 of the paper; hand-checked in
tests/methods/test_feddiff.py).

* ``superpose``: Eq. 8, ``mu_s = mean_i mu_i``, ``sigma_s^2 = mean_i sigma_i^2``;
* ``reparameterise``: ``z_i = mu_s + sigma_s * eps_i``;
* ``kl_to_standard``: ``KL(N(mu, sigma^2) || N(0, 1))`` of Eq. 9, mean over the
  latent dimensions;
* ``contrastive_loss``: Eq. 10-11, InfoNCE of each client latent against the pool
  latent of the closest accuracy (positive) and the rest of the pool (negatives);
* ``nearest_accuracy``: which pool entry is a client's positive;
* the linear-beta DDPM of p-diff (``ddpm_schedule``, ``q_sample``, ``p_step``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def superpose(
    mu: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8 over the clients (dim 0): ``(mean mu_i, sqrt(mean sigma_i^2))``."""
    if mu.shape != sigma.shape or mu.ndim != 2 or len(mu) == 0:
        raise ValueError(
            f"superpose: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} must be "
            "the same [clients, latent] shape with at least one client"
        )
    return mu.mean(0), sigma.pow(2).mean(0).sqrt()


def reparameterise(
    mu_s: torch.Tensor, sigma_s: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """``z_i = mu_s + sigma_s * eps_i`` (``eps`` ``[n, latent]``, standard normal)."""
    return mu_s + sigma_s * eps


def kl_to_standard(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, sigma^2) || N(0, 1))`` per dimension,
    ``0.5 (mu^2 + sigma^2 - 1 - log sigma^2)``, averaged over the dimensions."""
    var = sigma.pow(2).clamp_min(1e-12)
    return 0.5 * (mu.pow(2) + var - 1.0 - var.log()).mean()


def nearest_accuracy(client_acc: torch.Tensor, pool_acc: torch.Tensor) -> torch.Tensor:
    """Index of the pool entry whose accuracy is closest to each client's (ties:
    the first, i.e. the better one in a pool sorted by accuracy, best first)."""
    return (client_acc[:, None] - pool_acc[None, :]).abs().argmin(1)


def contrastive_loss(
    anchors: torch.Tensor,
    pool: torch.Tensor,
    positive: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """InfoNCE (Eq. 10-11): ``-mean_i log softmax_j(cos(a_i, p_j) / tau)[pos_i]``.

    ``anchors`` ``[n, d]`` (the clients' latents), ``pool`` ``[m, d]`` (the weight
    pool's latents), ``positive`` ``[n]`` (index into ``pool`` of each anchor's
    positive, the pool entry of similar accuracy); every other pool entry is a
    negative.
    """
    sim = F.cosine_similarity(anchors[:, None, :], pool[None, :, :], dim=-1)
    return F.cross_entropy(sim / temperature, positive)


# ------------------------------------------------------------------ latent DDPM


def ddpm_schedule(
    steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2
) -> dict[str, torch.Tensor]:
    """Linear betas (p-diff's DDPM: 1000 steps, 1e-4 .. 2e-2) and their products."""
    betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, 0)
    return {"betas": betas, "alphas": alphas, "abar": abar}


def q_sample(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor
) -> torch.Tensor:
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (``t`` 0-based, ``[B]``)."""
    a = abar[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def p_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    sched: dict[str, torch.Tensor],
    noise: torch.Tensor,
) -> torch.Tensor:
    """One ancestral DDPM step ``x_t -> x_{t-1}`` (Ho et al. 2020, sigma_t^2 = beta_t);
    no noise is added at ``t = 0``."""
    beta = float(sched["betas"][t])
    alpha = float(sched["alphas"][t])
    abar = float(sched["abar"][t])
    mean = (x_t - beta / (1 - abar) ** 0.5 * eps) / alpha**0.5
    if t == 0:
        return mean
    return mean + beta**0.5 * noise
