"""Stage 3: the pixel-space generator, trained with the DDPM epsilon loss."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from common.diffusion import diffusion_loss

from .data import CaptionTable, Schedule, balanced_indices, log, sample_captions


def conditioning_table(
    encoder: Any, table: CaptionTable
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled unit-norm embeddings of every bank caption ``[M, 1, D]`` and of ``""``."""
    return encoder.encode(table.texts, "pooled"), encoder.encode([""], "pooled")


def make_conditions(
    groups: torch.Tensor,
    caps: torch.Tensor,
    bank: torch.Tensor,
    uncond: torch.Tensor,
    table: CaptionTable,
    sch: Schedule,
    g: torch.Generator,
) -> torch.Tensor:
    """Per-image condition ``[B, 1, D]``.

    * own caption's embedding, or
    * (p = mean_cond_prob) the plain mean of k in 2..8 random captions of the same
      (class, style), not renormalised - exactly what an OSCAR client's per-class
      average of unit-norm caption embeddings looks like;
    * (p = cond_dropout) the empty prompt, for classifier-free guidance.
    """
    cond = bank[caps].clone()
    use_mean = torch.rand(len(groups), generator=g) < sch.mean_cond_prob
    for i in torch.nonzero(use_mean)[:, 0].tolist():
        mem = table.members[int(groups[i])]
        k = int(torch.randint(2, 9, (1,), generator=g))
        pick = mem[torch.randint(0, len(mem), (k,), generator=g)]
        cond[i] = bank[pick].mean(0)
    drop = torch.rand(len(groups), generator=g) < sch.cond_dropout
    cond[drop] = uncond[0]
    return cond


def train_generator(
    unet: Any,
    scheduler: Any,
    images: torch.Tensor,
    styles: list[str],
    groups: torch.Tensor,
    bank: torch.Tensor,
    uncond: torch.Tensor,
    table: CaptionTable,
    sch: Schedule,
    seed: int,
) -> tuple[Any, list[float]]:
    """DDPM epsilon loss ``|| eps - eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, c) ||^2``."""
    import copy

    g = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=sch.gen_lr, weight_decay=1e-4)

    def lr_at(s: int) -> float:  # linear warm-up then cosine to 0
        if s < sch.gen_warmup:
            return (s + 1) / sch.gen_warmup
        p = (s - sch.gen_warmup) / max(1, sch.gen_steps - sch.gen_warmup)
        return 0.5 * (1 + math.cos(math.pi * p))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    T = scheduler.config.num_train_timesteps
    unet.train()
    losses: list[float] = []
    bar = tqdm(range(sch.gen_steps), desc="generator", mininterval=10)
    for step in bar:
        idx = balanced_indices(styles, sch.gen_batch, sch.plain_share, g)
        x0 = images[idx]
        grp = groups[idx]
        cond = make_conditions(
            grp, sample_captions(table, grp, g), bank, uncond, table, sch, g
        )
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, T, (len(x0),), generator=g)
        loss = diffusion_loss(unet, scheduler, x0, cond, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        # EMA with the usual warm-up of the decay: min(decay, (1 + n) / (10 + n))
        d = min(sch.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - d)
        losses.append(loss.item())
        if step % 50 == 0 or step == sch.gen_steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if step % 200 == 0 or step == sch.gen_steps - 1:
                log(
                    f"generator step {step} loss {np.mean(losses[-200:]):.4f} "
                    f"lr {lr_sched.get_last_lr()[0]:.2e}"
                )
    for be, b in zip(ema.buffers(), unet.buffers(), strict=True):
        be.copy_(b)
    return ema, losses


def sampling_config(scheduler: Any) -> Any:
    """The training scheduler with ``clip_sample=False``.

    Training only uses ``add_noise`` (same betas either way), but samplers built
    from this config (``make_scheduler``) clip the predicted x0 to [-1, 1] when it is
    True, and diffusers' DDIM then keeps the unclipped epsilon: with the cosine
    schedule's near-zero alpha at t=999 and CFG, 20 DDIM steps drift to grey
    backgrounds (measured: judge accuracy 0.68 -> 1.00 on plain samples).
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config, clip_sample=False)
