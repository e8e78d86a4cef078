"""The synthesis engine: a conditioning set -> images. The only sampler methods call.

Methods say *what* to sample (one conditioning row per image); the engine decides
*how*: batching, precision, seeds, scheduler, guidance. Written as diffusers
writes pipelines: ``check_inputs`` first, then numbered steps.

Reproducibility: image ``i`` of a call draws all its noise (the initial ``x_T`` and
every stochastic scheduler step, e.g. DDPM's) from its own ``torch.Generator``
seeded by ``(seed, first_index + i)``. The images therefore do not depend on the
batch size, the batch order or how the work is split between calls.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .generator import Generator

Output = Literal["images", "latents"]


def image_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for image ``index`` of a run seeded ``seed``."""
    state = np.random.SeedSequence([seed & (2**63 - 1), index]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def image_generators(seed: int, indices: range) -> list[torch.Generator]:
    """One CPU generator per image (noise is drawn on the CPU, then moved)."""
    return [torch.Generator().manual_seed(image_seed(seed, i)) for i in indices]


def check_inputs(
    gen: Generator,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    num_inference_steps: int,
    batch_size: int,
) -> None:
    """Raise ``ValueError`` naming the argument, its value and the fix."""
    if cond.ndim != 3 or cond.shape[-1] != gen.cond_dim:
        raise ValueError(
            f"conditioning has shape {tuple(cond.shape)}; generator {gen.name!r} "
            f"needs [batch, tokens, {gen.cond_dim}] (embedding={gen.embedding!r})"
        )
    if uncond.ndim != 3 or uncond.shape[1:] != cond.shape[1:]:
        raise ValueError(
            f"unconditional embedding {tuple(uncond.shape)} does not match "
            f"conditioning {tuple(cond.shape)}"
        )
    if not torch.isfinite(cond).all():
        raise ValueError("conditioning contains NaN or Inf")
    if guidance_scale < 1.0:
        raise ValueError(f"guidance-scale={guidance_scale} must be >= 1")
    if num_inference_steps < 1:
        raise ValueError(f"num-inference-steps={num_inference_steps} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"synth-batch-size={batch_size} must be >= 1")


@torch.no_grad()
def sample(
    gen: Generator,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 20,
    seed: int = 0,
    batch_size: int = 256,
    first_index: int = 0,
    output: Output = "images",
    progress: Callable[[int], Any] | None = None,
) -> torch.Tensor:
    """Sample one image per row of ``cond`` ``[N, L, D]``.

    Returns ``[N, C, H, W]``: images in ``[-1, 1]`` (decoded by the VAE for latent
    diffusion), or with ``output="latents"`` what the UNet denoises (for training
    on the samples: the generative LoRA merge). ``first_index`` is the global
    index of row 0 (its noise seed); ``progress(n)`` is called after each batch.
    """
    # 1. Check inputs
    check_inputs(gen, cond, uncond, guidance_scale, num_inference_steps, batch_size)
    scheduler = gen.scheduler
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    guided = guidance_scale != 1.0
    u = uncond[:1].to(gen.device, gen.dtype)
    out: list[torch.Tensor] = []
    for start in range(0, len(cond), batch_size):
        c = cond[start : start + batch_size].to(gen.device, gen.dtype)
        b = len(c)
        gens = image_generators(
            seed, range(first_index + start, first_index + start + b)
        )
        # 2. Prepare timesteps (resets multistep schedulers' state)
        scheduler.set_timesteps(num_inference_steps, device=gen.device)
        # 3. Initial noise x_T ~ N(0, I), each image from its own generator
        x = torch.stack([torch.randn(gen.sample_shape, generator=g) for g in gens])
        x = x.to(gen.device, gen.dtype) * scheduler.init_noise_sigma
        context = torch.cat([u.expand(b, -1, -1), c]) if guided else c
        step_kwargs: dict[str, Any] = {"generator": gens} if takes_generator else {}
        # 4. Denoising loop with classifier-free guidance (Ho & Salimans 2022):
        #    eps = eps(x, 0) + w (eps(x, c) - eps(x, 0)); at w = 1 that is eps(x, c),
        #    so the unconditional pass is skipped.
        for t in scheduler.timesteps:
            xin = torch.cat([x, x]) if guided else x
            xin = scheduler.scale_model_input(xin, t)
            eps = gen.unet(xin, t, encoder_hidden_states=context).sample
            if guided:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
        # 5. Decode latents x -> D(x / scaling_factor) and clamp to [-1, 1]
        if output == "images":
            if gen.vae is not None:
                x = gen.vae.decode(x / gen.vae.config.scaling_factor).sample
            x = x.clamp(-1, 1)
        out.append(x.float().cpu())
        if progress is not None:
            progress(b)
    if not out:
        return torch.empty(0, *gen.sample_shape)
    return torch.cat(out)


def synthesize(
    gen: Generator,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    desc: str = "synthesize",
    **kwargs: Any,
) -> tuple[torch.Tensor, float]:
    """``sample`` with a progress bar in images per second; returns ``(x, seconds)``."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    with tqdm(total=len(cond), desc=desc, unit="img") as bar:
        x = sample(gen, cond, uncond, progress=bar.update, **kwargs)
    return x, time.perf_counter() - t0


def to_dataset_format(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Generated images -> the clients' image format (channels, side)."""
    x = images.float()
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.clamp(-1, 1)
