"""FedLD's sampler: denoise from a given latent part of the way (SDEdit, Meng et
al. 2022; diffusers' img2img ``strength``), classifier-free guided.

The synthesis engine (``common.synthesis.sample``) always starts from
``x_T ~ N(0, I)``; FedLD starts from a draw of a client's mixture. Until the
engine takes initial latents, this module runs that one loop with the engine's
conventions: its settings (``SynthesisSettings``), one seeded generator per
image (``image_generators``: batch-independent), the guidance cut-off, the
decoder, the dataset format. It does not shard over Ray workers nor retry on
out-of-memory.
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

GPU_BATCH = 64  # "auto" on a GPU: the engine's memory planner is not used here


def start_step(num_inference_steps: int, strength: float) -> int:
    """Index of the first of ``num_inference_steps`` steps run at ``strength``:
    ``n - max(1, round(n * strength))`` (at least one step is run)."""
    n = num_inference_steps
    return n - max(1, min(n, round(n * strength)))


def check_inputs(
    gen: Any, z0: torch.Tensor, cond: torch.Tensor, strength: float
) -> None:
    """Raise ``ValueError`` naming the argument, its value and the fix."""
    if tuple(z0.shape[1:]) != tuple(gen.sample_shape):
        raise ValueError(
            f"initial latents have shape {tuple(z0.shape)}; generator {gen.name!r} "
            f"denoises [N, {', '.join(map(str, gen.sample_shape))}]"
        )
    if cond.ndim != 3 or cond.shape[-1] != gen.cond_dim or len(cond) != len(z0):
        raise ValueError(
            f"conditioning {tuple(cond.shape)} must be [{len(z0)}, tokens, "
            f"{gen.cond_dim}] (one row per initial latent)"
        )
    if not torch.isfinite(z0).all() or not torch.isfinite(cond).all():
        raise ValueError("initial latents or conditioning contain NaN or Inf")
    if not 0 < strength <= 1:
        raise ValueError(f"fedld-strength={strength} must be in (0, 1]")


@torch.no_grad()
def _denoise_from(
    gen: Any,
    z0: torch.Tensor,
    c: torch.Tensor,
    u: torch.Tensor,
    gens: list[torch.Generator],
    s: SynthesisSettings,
    strength: float,
) -> torch.Tensor:
    scheduler = gen.scheduler
    # 1. Timesteps: the last ``strength`` of the schedule
    scheduler.set_timesteps(s.num_inference_steps, device=gen.device)
    begin = start_step(s.num_inference_steps, strength) * scheduler.order
    timesteps = scheduler.timesteps[begin:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    # 2. x_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps at the first kept step (add_noise)
    eps = torch.stack([torch.randn(gen.sample_shape, generator=g) for g in gens])
    t0 = timesteps[:1].repeat(len(z0))
    x = scheduler.add_noise(
        z0.to(gen.device, gen.dtype), eps.to(gen.device, gen.dtype), t0
    )
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
def sample_from_latents(
    ctx: ServerContext,
    z0: torch.Tensor,
    cond: torch.Tensor,
    strength: float,
    first_index: int = 0,
) -> tuple[torch.Tensor, float]:
    """One uint8 image per row of ``z0`` ``[N, C, H, W]`` (generator space),
    conditioned on ``cond`` ``[N, L, D]``, in the dataset's format; returns
    ``(images, seconds)``. Image ``i`` draws its noise from
    ``image_generators(seed, first_index + i)``."""
    gen = ctx.sampling_generator
    check_inputs(gen, z0, cond, strength)
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
    for lo in range(0, len(z0), batch):
        hi = min(lo + batch, len(z0))
        rows = range(first_index + lo, first_index + hi)
        x = _denoise_from(
            gen,
            z0[lo:hi],
            cond[lo:hi].to(gen.device, gen.dtype),
            u,
            image_generators(s.seed, rows),
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
