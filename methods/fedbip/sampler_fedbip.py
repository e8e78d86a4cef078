"""FedBiP's sampler: denoise the clients' noised instance latents from the
timestep they were noised to, conditioned on the concept prompts.

The synthesis engine (``common.synthesis.sample``) starts every image from
``x_T ~ N(0, I)`` and FedLD's loop (``methods.fedld.sampler_fedld``) noises a
clean latent itself; FedBiP's latents arrive already noised (the client did the
forward diffusion, so the server never sees a clean latent). This module runs
the remaining steps with the engine's conventions: its settings
(``SynthesisSettings``), one seeded generator per image for any stochastic
scheduler step (``image_generators``), the guidance cut-off, the decoder and
the dataset format. It does not shard over Ray workers nor retry on
out-of-memory.

``noise_step`` is where both sides agree on the timestep: the client noises to
it, the server starts there.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any

import torch

from common.synthesis import (
    CPU_AUTO_BATCH,
    image_generators,
    to_dataset_format,
    to_uint8,
)
from common.synthesis_settings import SynthesisSettings

from ..base import ServerContext
from ..fedld.sampler_fedld import GPU_BATCH, start_step


def noise_step(scheduler: Any, num_inference_steps: int, strength: float) -> int:
    """The timestep ``t`` the last ``strength`` of a sampling schedule starts at
    (``start_step`` of the scheduler's ``num_inference_steps`` timesteps):
    where the client's forward diffusion ends and the server's sampler begins.
    ``strength = 1``: the schedule's first timestep (the paper's code)."""
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


def check_inputs(gen: Any, z_t: torch.Tensor, cond: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the argument, its value and the fix."""
    if tuple(z_t.shape[1:]) != tuple(gen.sample_shape):
        raise ValueError(
            f"noised latents have shape {tuple(z_t.shape)}; generator {gen.name!r} "
            f"denoises [N, {', '.join(map(str, gen.sample_shape))}]"
        )
    if cond.ndim != 3 or cond.shape[-1] != gen.cond_dim or len(cond) != len(z_t):
        raise ValueError(
            f"conditioning {tuple(cond.shape)} must be [{len(z_t)}, tokens, "
            f"{gen.cond_dim}] (one row per latent)"
        )
    if not torch.isfinite(z_t).all() or not torch.isfinite(cond).all():
        raise ValueError("noised latents or conditioning contain NaN or Inf")


@torch.no_grad()
def _denoise(
    gen: Any,
    z_t: torch.Tensor,
    c: torch.Tensor,
    u: torch.Tensor,
    gens: list[torch.Generator],
    s: SynthesisSettings,
    strength: float,
) -> torch.Tensor:
    scheduler = gen.scheduler
    # 1. Timesteps: the last ``strength`` of the schedule (the one noise_step names)
    scheduler.set_timesteps(s.num_inference_steps, device=gen.device)
    begin = start_step(s.num_inference_steps, strength) * scheduler.order
    timesteps = scheduler.timesteps[begin:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    # 2. The uploaded latents in the scheduler's own parametrisation
    x = to_scheduler_state(scheduler, z_t.to(gen.device), timesteps[:1]).to(gen.dtype)
    step_kwargs: dict[str, Any] = (
        {"generator": gens}
        if "generator" in inspect.signature(scheduler.step).parameters
        else {}
    )
    guided = s.guidance_scale != 1.0
    context = torch.cat([u.expand(len(c), -1, -1), c]) if guided else c
    cutoff = math.ceil(s.guidance_cutoff * len(timesteps))
    # 3. Denoising loop, eps = eps(x, 0) + w (eps(x, c) - eps(x, 0)) (Ho & Salimans)
    for i, t in enumerate(timesteps):
        if guided and i < cutoff:
            xin = scheduler.scale_model_input(torch.cat([x, x]), t)
            e_u, e_c = gen.unet(xin, t, encoder_hidden_states=context).sample.chunk(2)
            e = e_u + s.guidance_scale * (e_c - e_u)
        else:
            xin = scheduler.scale_model_input(x, t)
            e = gen.unet(xin, t, encoder_hidden_states=c).sample
        x = scheduler.step(e, t, x, **step_kwargs).prev_sample
    return x


@torch.no_grad()
def sample_from_noised(
    ctx: ServerContext,
    z_t: torch.Tensor,
    cond: torch.Tensor,
    strength: float,
    first_index: int = 0,
) -> tuple[torch.Tensor, float]:
    """One uint8 image per row of ``z_t`` ``[N, C, H, W]`` (noised to
    ``noise_step(..., strength)``), conditioned on ``cond`` ``[N, L, D]``, in the
    dataset's format; returns ``(images, seconds)``. A stochastic scheduler's
    steps draw from ``image_generators(seed, first_index + i)``."""
    gen = ctx.sampling_generator
    check_inputs(gen, z_t, cond)
    s = SynthesisSettings.from_config(ctx.cfg)
    t0 = time.perf_counter()
    batch = (
        s.batch_size
        if isinstance(s.batch_size, int)
        else (GPU_BATCH if gen.device.type == "cuda" else CPU_AUTO_BATCH)
    )
    u = ctx.uncond[:1].to(gen.device, gen.dtype)
    vae = ctx.decoder if ctx.decoder is not None else gen.vae
    out = []
    for lo in range(0, len(z_t), batch):
        hi = min(lo + batch, len(z_t))
        x = _denoise(
            gen,
            z_t[lo:hi],
            cond[lo:hi].to(gen.device, gen.dtype),
            u,
            image_generators(s.seed, range(first_index + lo, first_index + hi)),
            s,
            strength,
        )
        # 4. Decode (x = D(z / scaling_factor)), the dataset's format, uint8
        if vae is not None:
            x = vae.decode(x / float(getattr(vae.config, "scaling_factor", 1.0))).sample
        x = to_dataset_format(x, ctx.channels, ctx.cfg.image_size)
        out.append(to_uint8(x).cpu())
    images = torch.cat(out) if out else torch.empty(0, dtype=torch.uint8)
    return images, time.perf_counter() - t0
