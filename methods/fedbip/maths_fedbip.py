"""FedBiP's maths, pure: the forward diffusion of an instance latent, the
interpolation of two noised latents that keeps the noise level, the plan of
which instances a synthetic image starts from, the perturbation of a concept
token and the client's private noise generator.

No Flower, no I/O: functions of tensors, checked by hand in ``tests/methods/test_fedbip.py``.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

# the interpolation weights of the code's ``test_interp`` (alpha in 0, 0.1, ..., 1),
# without the end points: alpha = 1 is the instance itself (the plan's first pass)
ALPHA_GRID: tuple[float, ...] = tuple(k / 10 for k in range(1, 10))


def _check_abar(abar: float) -> None:
    if not 0 < abar <= 1 or not math.isfinite(abar):
        raise ValueError(f"alpha-bar={abar} must be in (0, 1]")


def forward_noise(z0: torch.Tensor, abar: float, noise: torch.Tensor) -> torch.Tensor:
    """The forward diffusion to one timestep (Ho et al. 2020, eq. 4):
    ``z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise`` with ``noise ~ N(0, I)``
    given, ``abar_t`` the scheduler's ``alphas_cumprod[t]``."""
    _check_abar(abar)
    if z0.shape != noise.shape:
        raise ValueError(f"z0 {tuple(z0.shape)} and noise {tuple(noise.shape)} differ")
    return math.sqrt(abar) * z0.float() + math.sqrt(1 - abar) * noise.float()


def interpolate_noised(
    z_i: torch.Tensor,
    z_j: torch.Tensor,
    alpha: torch.Tensor,
    abar: float,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Mix two noised latents of one timestep, keeping its noise level.

    With ``z = sqrt(a) x + sqrt(1 - a) e`` (independent ``e_i``, ``e_j``),
    ``alpha z_i + (1 - alpha) z_j`` has the signal ``sqrt(a) (alpha x_i +
    (1 - alpha) x_j)`` but noise of variance ``(1 - a) (alpha^2 + (1 - alpha)^2)``:
    fresh noise of variance ``(1 - a) 2 alpha (1 - alpha)`` brings it back to
    ``1 - a``::

        z = alpha z_i + (1 - alpha) z_j + sqrt((1 - a) 2 alpha (1 - alpha)) noise

    ``alpha`` ``[M]`` in ``[0, 1]``, one per row of ``z_i``, ``z_j`` ``[M, ...]``;
    ``alpha = 1`` returns ``z_i`` unchanged. ``z_i`` and ``z_j`` must be
    different instances (one instance's noise would add up, not average out).
    """
    _check_abar(abar)
    if not (z_i.shape == z_j.shape == noise.shape) or alpha.shape != z_i.shape[:1]:
        raise ValueError(
            f"z_i {tuple(z_i.shape)}, z_j {tuple(z_j.shape)}, noise "
            f"{tuple(noise.shape)} must match and alpha {tuple(alpha.shape)} be [M]"
        )
    if ((alpha < 0) | (alpha > 1)).any():
        raise ValueError("alpha must be in [0, 1]")
    a = alpha.float().reshape(-1, *([1] * (z_i.ndim - 1)))
    extra = ((1 - abar) * 2 * a * (1 - a)).sqrt()
    return a * z_i.float() + (1 - a) * z_j.float() + extra * noise.float()


def instance_plan(
    n: int, rows: int, generator: torch.Generator, interpolate: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which of a cell's ``n`` instances each of its ``rows`` images starts from:
    ``(i, j, alpha)``, each ``[rows]``.

    Row ``r`` is in pass ``p = r // n`` and belongs to instance ``i = r mod n``.
    Pass 0 takes every instance as it is (``alpha = 1``, ``j = i``); a later
    pass mixes it with partner ``j = (i + s) mod n``, the shift
    ``s = 1 + (p - 1) mod (n - 1)`` cycling through the other instances pass by
    pass, with ``alpha`` drawn from ``ALPHA_GRID`` by ``generator``. A cell of one
    instance, or ``interpolate=False``, repeats its instances unchanged.
    """
    if n < 1 or rows < 0:
        raise ValueError(f"n={n} must be >= 1 and rows={rows} >= 0")
    r = torch.arange(rows)
    i, p = r % n, r // n
    if not interpolate or n == 1:
        return i, i.clone(), torch.ones(rows)
    shift = 1 + (p - 1).clamp_min(0) % (n - 1)
    j = torch.where(p == 0, i, (i + shift) % n)
    grid = torch.tensor(ALPHA_GRID)
    drawn = grid[torch.randint(0, len(grid), (rows,), generator=generator)]
    alpha = torch.where(p == 0, torch.ones(rows), drawn)
    return i, j, alpha


def perturb_token(
    token: torch.Tensor, scale: float, noise: torch.Tensor
) -> torch.Tensor:
    """``token + scale * rms(token) * noise`` per row: Gaussian noise on a
    concept token ``[M, H]``, its size relative to the token's own root mean
    square (the code adds ``N(0, 0.1^2)`` to the domain concept; relative here,
    since token embeddings are ~30x smaller than the hidden states it perturbs)."""
    if scale < 0 or not math.isfinite(scale):
        raise ValueError(f"scale={scale} must be finite and >= 0")
    t = token.float()
    rms = t.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return t + scale * rms * noise.float()


def private_rng(images: torch.Tensor, seed: int) -> np.random.Generator:
    """A generator only the client can rebuild: seeded by SHA-256 of its
    private images and the run seed (256 bits into numpy's ``SeedSequence``).

    The noise that hides an instance must not come from the run seed, which
    the server knows (``ClientJob.seed``); from the images it is the same on a
    rerun (a resumed round gets the same upload) and unknown to anyone without
    them."""
    h = hashlib.sha256(images.detach().cpu().float().contiguous().numpy().tobytes())
    h.update(int(seed).to_bytes(8, "little", signed=True))
    return np.random.default_rng(np.random.SeedSequence(int(h.hexdigest(), 16)))


def standard_normal(shape: tuple[int, ...], rng: np.random.Generator) -> torch.Tensor:
    """``N(0, I)`` of ``shape`` in float32 from ``rng``."""
    return torch.from_numpy(rng.standard_normal(size=shape).astype(np.float32))
