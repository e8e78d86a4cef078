"""Differential privacy of the uploads (pure: no Flower, no I/O).

The analytic Gaussian mechanism (Balle & Wang, ICML 2018, "Improving the Gaussian
Mechanism for Differential Privacy: Analytical Calibration and Optimal
Denoising", Thm 8): adding ``N(0, sigma^2 I)`` to a quantity of L2 sensitivity
``Delta`` is (epsilon, delta)-DP iff

    Phi(Delta / (2 sigma) - epsilon sigma / Delta)
        - e^epsilon Phi(-Delta / (2 sigma) - epsilon sigma / Delta) <= delta,

valid for every epsilon > 0 (the classical ``Delta sqrt(2 ln(1.25 / delta)) /
epsilon`` of Dwork & Roth needs epsilon < 1, and is too small above ~ 5).
``analytic_gaussian_sigma`` finds the smallest such sigma by bisection.

Composition. The condition depends on ``mu = Delta / sigma`` alone: it is the
(epsilon, delta) curve of mu-Gaussian DP (Dong, Roth & Su 2022, Cor. 2.13), and
releases composed adaptively, each ``mu_i``, are exactly ``sqrt(sum mu_i^2)``
(their Cor. 3.3): several vectors released from the same examples are one
release of their concatenation with L2 sensitivity ``sqrt(sum Delta_i^2)`` (at
equal sigma), which is tight. Releases on disjoint examples (one per class)
compose in parallel: the client's mu is the largest of them.

Adjacency: two datasets of one client that differ in one example's content
(image, caption, features), that example keeping its label. The number of
examples and the per-class counts are public (the uploads carry them); so are
the run seed and everything drawn from it.

The noise is drawn from OS entropy (``noise_rng``), never from a seed: the
server knows the run seed and the partition id, so noise drawn from them could
be regenerated and subtracted. The run is reproducible up to this boundary and
no further, by design.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

BISECTION_STEPS = 200  # each halves the bracket: far below float precision
KMEANS_ITERS = 3  # Lloyd iterations of private_kmeans (each costs budget)


# ---------------------------------------------------------------- calibration


def gaussian_delta(epsilon: float, mu: float) -> float:
    """The smallest delta for which a Gaussian mechanism with ``Delta / sigma =
    mu`` is (epsilon, delta)-DP: ``Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)``
    (Balle & Wang 2018, Thm 8, with ``mu = Delta / sigma``)."""
    from scipy.special import log_ndtr, ndtr

    if mu <= 0:
        return 0.0
    a = float(ndtr(mu / 2 - epsilon / mu))
    # e^eps Phi(x) in log space: e^eps overflows where Phi(x) underflows
    b = math.exp(epsilon + float(log_ndtr(-mu / 2 - epsilon / mu)))
    return max(0.0, a - b)


def _check(epsilon: float, delta: float) -> None:
    if not epsilon > 0 or not math.isfinite(epsilon):
        raise ValueError(f"dp-epsilon={epsilon} must be a finite number > 0")
    if not 0 < delta < 1:
        raise ValueError(f"dp-delta={delta} must be in (0, 1)")


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest sigma with which ``x + N(0, sigma^2 I)`` is (epsilon, delta)-DP
    for an ``x`` of L2 sensitivity ``sensitivity`` (the analytic Gaussian
    mechanism, Balle & Wang 2018), found by bisection on the exact condition.

    The returned sigma satisfies the condition (the bracket's upper end)."""
    _check(epsilon, delta)
    if sensitivity < 0 or not math.isfinite(sensitivity):
        raise ValueError(f"sensitivity={sensitivity} must be finite and >= 0")
    if sensitivity == 0:
        return 0.0

    def ok(sigma: float) -> bool:
        return gaussian_delta(epsilon, sensitivity / sigma) <= delta

    # 1. Bracket: delta(sigma) falls as sigma grows
    lo, hi = sensitivity, sensitivity
    while not ok(hi):
        lo, hi = hi, hi * 2
    while ok(lo) and lo > sensitivity * 1e-12:
        lo, hi = lo / 2, lo
    # 2. Bisection (in log space: sigma spans decades)
    for _ in range(BISECTION_STEPS):
        mid = math.sqrt(lo * hi)
        if ok(mid):
            hi = mid
        else:
            lo = mid
        if hi / lo - 1 < 1e-13:
            break
    return hi


def gaussian_mu(epsilon: float, delta: float) -> float:
    """The largest ``mu = Delta / sigma`` that is (epsilon, delta)-DP."""
    return 1.0 / analytic_gaussian_sigma(epsilon, delta, 1.0)


def epsilon_spent(mu: float, delta: float) -> float:
    """The smallest epsilon for which a Gaussian mechanism with ``Delta / sigma =
    mu`` (after composition, ``compose``) is (epsilon, delta)-DP; 0 for mu = 0.
    What a client reports as spent."""
    if not 0 < delta < 1:
        raise ValueError(f"dp-delta={delta} must be in (0, 1)")
    if mu <= 0:
        return 0.0
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(hi, mu) > delta:
        lo, hi = hi, hi * 2
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if gaussian_delta(mid, mu) <= delta:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return hi


def compose(mus: Sequence[float]) -> float:
    """``sqrt(sum mu_i^2)``: adaptive composition of Gaussian releases on the
    same examples (Dong, Roth & Su 2022, Cor. 3.3). Releases on disjoint
    examples compose in parallel instead: take the largest."""
    return math.sqrt(sum(m * m for m in mus))


# ---------------------------------------------------------------- clipping, noise


def clip_rows(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each row ``x[i]`` (flattened) to L2 norm at most ``max_norm``."""
    if not max_norm > 0:
        raise ValueError(f"dp-clip={max_norm} must be > 0")
    flat = x.reshape(len(x), -1)
    norms = flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (flat * torch.clamp(max_norm / norms, max=1.0)).reshape(x.shape)


def clipped_sum(
    per_example: Sequence[torch.Tensor], max_norm: float
) -> list[torch.Tensor]:
    """``sum_j clip(g_j)`` in float64, where example ``j``'s gradient ``g_j`` is
    the concatenation of ``per_example[i][j]`` over the parameters ``i`` (each
    ``[B, ...]``) and ``clip`` scales it to L2 norm at most ``max_norm``: the
    sum DP-SGD noises (Abadi et al. 2016). One parameter list per tensor."""
    if not max_norm > 0:
        raise ValueError(f"dp-clip={max_norm} must be > 0")
    g = [t.double() for t in per_example]
    norms = torch.stack([t.flatten(1).pow(2).sum(1) for t in g]).sum(0).sqrt()
    scale = torch.clamp(max_norm / norms.clamp_min(1e-30), max=1.0)
    return [torch.einsum("b,b...->...", scale, t) for t in g]


def noise_rng() -> np.random.Generator:
    """A generator seeded from OS entropy (numpy's ``SeedSequence()``: 128 bits).

    Not ``torch.Generator().manual_seed(...)``: torch's CPU generator keeps 32
    bits of its seed, so 2^32 trials would find the noise; and never from the
    run seed, which the server knows. The run's determinism ends here."""
    return np.random.default_rng()


def gaussian_noise(
    shape: Sequence[int], sigma: float, rng: np.random.Generator | None = None
) -> torch.Tensor:
    """``N(0, sigma^2)`` of ``shape`` in float64, from ``rng`` (default: a fresh
    ``noise_rng()``)."""
    if sigma < 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma={sigma} must be finite and >= 0")
    rng = noise_rng() if rng is None else rng
    return torch.from_numpy(rng.normal(0.0, sigma, size=tuple(shape)))


# ---------------------------------------------------------------- mechanisms


def private_class_means(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    mu: float,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Per-class means of the clipped embeddings plus analytic Gaussian noise.

    Replacing one example (label kept, so ``n_c`` is public) moves its class's
    mean of clipped rows by at most ``Delta_c = 2 clip / n_c``; class ``c`` gets
    ``sigma_c = Delta_c / mu``, so every class's release is ``mu``-GDP and, the
    classes being disjoint, so is the upload. Returns ``(class_ids, noisy means
    [K, ...] float64, counts, largest sigma)``."""
    from common.maths import per_class_mean

    if not mu > 0:
        raise ValueError(f"mu={mu} must be > 0")
    ids, means, counts = per_class_mean(
        clip_rows(embeddings.double(), clip), labels, num_classes
    )
    rng = noise_rng()
    sigmas = [2.0 * clip / n / mu for n in counts.tolist()]
    noisy = means.clone()
    for i, sigma in enumerate(sigmas):
        noisy[i] += gaussian_noise(means[i].shape, sigma, rng)
    return ids, noisy, counts, max(sigmas, default=0.0)


def private_kmeans(
    x: torch.Tensor,
    k: int,
    *,
    mu: float,
    clip: float,
    iters: int = KMEANS_ITERS,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Up to ``k`` centres of one class's rows ``x [n, D]`` that are ``mu``-GDP
    (DP-Lloyd: Blum, Dwork, McSherry & Nissim 2005, "SuLQ", noisy sums and
    counts per cluster).

    1. Clip every row to ``clip``.
    2. Release the noisy mean (``Delta = 2 clip / n``, n public) and start the
       centres at it plus ``clip / 2`` steps in random directions (the first
       assignment is then a random-projection split): the start depends on
       the data through released values only.
    3. ``iters`` Lloyd steps: assign rows to the nearest (released) centre,
       release ``(S_1..S_k, clip n_1..clip n_k) + N(0, sigma^2 I)``.
       Replacing row ``x`` by ``x'`` moves it from cluster a to b: the release
       changes by ``|x' - x| <= 2 clip`` (a = b) or ``sqrt(|x|^2 + |x'|^2 +
       2 clip^2) <= 2 clip`` (a != b): ``Delta = 2 clip``.
    4. Each of the ``iters + 1`` releases gets ``mu / sqrt(iters + 1)`` (GDP
       composition). The centres ``S_j / n_j`` (projected onto the clip ball,
       where the true ones lie) are post-processing. A cluster whose noisy
       count is under three noise stds, or below 1, is dropped (an empty one
       passes with probability 0.13%); where all are, the class sends its
       noisy mean.

    Returns ``(centres [k', D] float64, counts [k'] float64, largest sigma)``:
    counts are the noisy ones (the mean's: ``n``).
    """
    # 1. Check inputs, clip
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"x must be [n, D] with n >= 1, got {tuple(x.shape)}")
    if k < 1 or iters < 0 or not mu > 0:
        raise ValueError(f"need k >= 1, iters >= 0, mu > 0; got {k}, {iters}, {mu}")
    n, dim = x.shape
    x = clip_rows(x.double(), clip)
    rng = noise_rng()
    mu_r = mu / math.sqrt(iters + 1)

    # 2. The noisy mean, and centres around it
    sigma_mean = 2.0 * clip / n / mu_r
    mean = x.mean(0) + gaussian_noise((dim,), sigma_mean, rng)
    if k == 1 or iters == 0:
        return mean[None], torch.tensor([float(n)], dtype=torch.float64), sigma_mean
    step = gaussian_noise((k, dim), 1.0, rng)
    centres = mean[None] + step / step.norm(dim=1, keepdim=True) * (clip / 2)

    # 3. Lloyd steps on noisy sums and counts
    sigma = 2.0 * clip / mu_r
    floor = max(1.0, 3.0 * sigma / clip)  # three stds of a noisy count
    counts = torch.zeros(k, dtype=torch.float64)
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        sums = torch.zeros(k, dim, dtype=torch.float64).index_add_(0, assign, x)
        sums += gaussian_noise((k, dim), sigma, rng)
        counts = torch.bincount(assign, minlength=k).double()
        counts += gaussian_noise((k,), sigma / clip, rng)
        seen = counts >= floor
        moved = clip_rows(sums / counts.clamp_min(1.0)[:, None], clip)
        centres = torch.where(seen[:, None], moved, centres)

    # 4. The clusters seen in the last release; else the noisy mean
    seen = counts >= floor
    if not seen.any():
        return mean[None], torch.tensor([float(n)], dtype=torch.float64), sigma
    return centres[seen], counts[seen], max(sigma, sigma_mean)


def private_vector(
    x: torch.Tensor, centre: torch.Tensor, *, mu: float, clip: float
) -> tuple[torch.Tensor, float]:
    """Output perturbation of one released vector: ``centre + clip_C(x -
    centre) + N(0, sigma^2 I)`` with ``sigma = 2 clip / mu``.

    ``centre`` must not depend on the private data (a public prompt's
    embedding, an initial value drawn from the run seed). Whatever the data
    did to ``x``, ``clip_C(x - centre)`` lies in a ball of radius ``clip``:
    ``Delta = 2 clip`` under any change of the data behind ``x``, however
    large. No 1/n: the guarantee covers the whole dataset and so costs noise
    of the ball's size. Returns ``(release float64, sigma)``."""
    if x.shape != centre.shape:
        raise ValueError(f"x {tuple(x.shape)} and centre {tuple(centre.shape)} differ")
    if not mu > 0:
        raise ValueError(f"mu={mu} must be > 0")
    d = clip_rows((x.double() - centre.double())[None], clip)[0]
    sigma = 2.0 * clip / mu
    return centre.double() + d + gaussian_noise(x.shape, sigma), sigma


def spent_metrics(mu: float, delta: float, sigma: float) -> dict[str, float]:
    """A client's privacy account as metrics: the (epsilon, delta) its whole
    upload spent (``mu`` after composition), mu, and the largest noise std."""
    return {
        "dp-epsilon": epsilon_spent(mu, delta),
        "dp-delta": delta,
        "dp-mu": mu,
        "dp-sigma": sigma,
    }


def budget_mu(epsilon: float, delta: float) -> float:
    """The client's whole budget as mu (0: no privacy guard, dp-epsilon = 0)."""
    return gaussian_mu(epsilon, delta) if epsilon > 0 else 0.0
