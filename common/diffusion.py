"""The diffusion training objective, written once: the generator's pretraining
(``bench pretrain``), LoRA fine-tuning (``common.lora``) and FedDEO's description
learning all minimise it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .optim import AdamW


def diffusion_loss(
    unet: Any,
    scheduler: Any,
    x0: torch.Tensor,
    cond: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """The denoising loss of Ho et al. 2020 on one batch.

    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (the scheduler's
    ``add_noise``), loss ``|| target - eps_theta(x_t, t, c) ||^2`` averaged over
    every value; the target is ``noise``, or the velocity where the scheduler's
    ``prediction_type`` is ``v_prediction``.

    Parameters
    ----------
    unet : UNet2DConditionModel
        Called as ``unet(x_t, t, encoder_hidden_states=c).sample``.
    scheduler : diffusers scheduler
        Provides ``add_noise`` (and ``get_velocity`` for v-prediction).
    x0 : Tensor
        ``[N, C, H, W]`` what the UNet denoises (pixels, or scaled VAE latents).
    cond : Tensor
        ``[N, L, D]`` conditioning per image, or ``[1, L, D]`` shared by all.
    t, noise : Tensor
        ``[N]`` timesteps and ``x0``-shaped standard-normal noise.

    Returns
    -------
    Tensor
        The scalar loss, in float32.
    """
    noisy = scheduler.add_noise(x0, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:
        target = noise
    c = cond.expand(len(x0), -1, -1)
    pred = unet(noisy, t, encoder_hidden_states=c).sample
    return F.mse_loss(pred.float(), target.float())


def descend(
    opt: torch.optim.Optimizer | AdamW,
    loss: torch.Tensor,
    *,
    step: int,
    what: str,
    lr_key: str,
    lr: float,
) -> None:
    """One optimizer step on ``loss``, stopped before a non-finite loss reaches
    the weights: ``ValueError`` naming the training (``what``), its ``step`` and
    the run-config key of its learning rate (``lr_key``, now ``lr``)."""
    if not torch.isfinite(loss).all():
        raise ValueError(
            f"{what} diverged at step {step} (loss {float(loss.detach().mean())}); "
            f"lower {lr_key} (now {lr})"
        )
    opt.zero_grad()
    loss.backward()
    opt.step()
