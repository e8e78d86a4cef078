"""Where the engine's denoising loop starts when it does not start from noise.

``common.synthesis.sample`` starts every image from ``x_T ~ N(0, I)``; with a
``Start`` it runs only the last ``strength`` of the schedule from given latents
(SDEdit, Meng et al. 2022; diffusers' img2img ``strength``):

- ``noised=False``: clean latents ``z0`` that the engine noises to the first kept
  timestep with each image's own generator (``scheduler.add_noise``; FedLD draws
  ``z0`` from a client's mixture);
- ``noised=True``: latents already noised to that timestep as
  ``z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) e`` (FedBiP: the client does the
  forward diffusion, so the server never sees a clean latent). Client and server
  agree on the timestep through ``start_timestep``.

Pure functions of a diffusers scheduler; no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Start:
    """Initial latents ``[N, C, H, W]`` (generator space, one per conditioning
    row) and the share ``strength`` in ``(0, 1]`` of the schedule to run."""

    latents: torch.Tensor
    strength: float = 1.0
    noised: bool = False

    def rows(self, lo: int, hi: int) -> Start:
        """The start of rows ``lo:hi`` (a batch, a worker's shard)."""
        return Start(self.latents[lo:hi], self.strength, self.noised)

    def padded(self, n: int) -> Start:
        """Padded to ``n`` rows with copies of the last (static shapes)."""
        return Start(pad_rows(self.latents, n), self.strength, self.noised)

    def check(self, num_rows: int, sample_shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` naming the bad value and what it must be."""
        z = self.latents
        if tuple(z.shape) != (num_rows, *sample_shape):
            raise ValueError(
                f"start latents have shape {tuple(z.shape)}; the generator "
                f"denoises [{num_rows}, {', '.join(map(str, sample_shape))}] (one "
                "per conditioning row)"
            )
        if not torch.isfinite(z).all():
            raise ValueError("start latents contain NaN or Inf")
        if not 0 < self.strength <= 1:
            raise ValueError(f"start strength={self.strength} must be in (0, 1]")


def pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` padded to ``n`` rows with copies of its last row."""
    return torch.cat([t, t[-1:].expand(n - len(t), *t.shape[1:])])


def start_step(num_inference_steps: int, strength: float) -> int:
    """Index of the first of ``num_inference_steps`` steps run at ``strength``:
    ``n - max(1, round(n * strength))`` (at least one step is run)."""
    n = num_inference_steps
    return n - max(1, min(n, round(n * strength)))


def start_timestep(scheduler: Any, num_inference_steps: int, strength: float) -> int:
    """The timestep ``t`` the last ``strength`` of a sampling schedule starts at:
    where a client's forward diffusion ends and the server's sampler begins.
    ``strength = 1``: the schedule's first timestep."""
    scheduler.set_timesteps(num_inference_steps)
    begin = start_step(num_inference_steps, strength) * scheduler.order
    return int(round(float(scheduler.timesteps[begin])))


def alpha_bar(scheduler: Any, t: int) -> float:
    """``abar_t``, the scheduler's ``alphas_cumprod[t]``."""
    return float(scheduler.alphas_cumprod[int(t)])


def to_scheduler_state(
    scheduler: Any, z_t: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """A latent noised as ``z_t = sqrt(a) z0 + sqrt(1 - a) e`` (``a = abar_t``)
    -> the sampler's state at ``t``. The scheduler's ``add_noise(z0, e, t)`` is
    ``c_t (z0 + sqrt((1 - a) / a) e)`` for every scheduler here, so the state is
    ``c_t / sqrt(a) * z_t`` with ``c_t = add_noise(1, 0, t)``: ``z_t`` itself
    for DDPM, DDIM and DPM-Solver (``c_t = sqrt(a)``), ``z0 + sigma_t e`` for
    Euler (``c_t = 1``). Call after ``set_timesteps`` (and ``set_begin_index``)."""
    one = torch.ones(1, device=z_t.device)
    c_t = float(scheduler.add_noise(one, torch.zeros_like(one), t.to(z_t.device)))
    a = alpha_bar(scheduler, int(round(float(t[0]))))
    return z_t.float() * (c_t / math.sqrt(a))


def initial_state(
    scheduler: Any,
    num_inference_steps: int,
    gens: list[torch.Generator],
    sample_shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    start: Start | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Set the scheduler's timesteps; return ``(x, timesteps)``: the loop's first
    state and the timesteps it runs. Without ``start``: ``x_T ~ N(0, I)`` (each
    image from its own generator) over the whole schedule."""
    scheduler.set_timesteps(num_inference_steps, device=device)
    if start is None:
        x = torch.stack([torch.randn(sample_shape, generator=g) for g in gens])
        return x.to(device, dtype) * scheduler.init_noise_sigma, scheduler.timesteps
    begin = start_step(num_inference_steps, start.strength) * scheduler.order
    timesteps = scheduler.timesteps[begin:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    z = start.latents
    if start.noised:
        return to_scheduler_state(scheduler, z.to(device), timesteps[:1]).to(
            dtype
        ), timesteps
    # x_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps at the first kept step (add_noise)
    eps = torch.stack([torch.randn(sample_shape, generator=g) for g in gens])
    t0 = timesteps[:1].repeat(len(z))
    x = scheduler.add_noise(z.to(device, dtype), eps.to(device, dtype), t0)
    return x, timesteps
