"""Latent guidance of the synthesis engine: a differentiable loss on the
predicted clean image steers every denoising step (classifier guidance as
FedLMG/FedCADO does it). Pure maths over tensors and a diffusers scheduler;
``common.synthesis`` applies it inside its denoising loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LatentGuidance:
    """Gradient guidance of the latent by a differentiable loss on the predicted
    clean image (classifier guidance as FedLMG/FedCADO does it, Yang et al. 2025).

    At every step, before the normal guided step: predict ``x0`` from ``x_t`` and
    the guided ``eps`` (VP: ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``), decode it
    (VAE or decoder, then the dataset format of ``resize_to``), and move the latent
    against the gradient of the loss: ``x_t <- x_t - step * grad_x loss(x0)``, or with
    ``normalize`` by ``step`` noise standard deviations along it (``guidance_move``).
    ``warmup`` extra such moves happen at the first step with ``warmup=True`` (the
    method's loss may differ there, e.g. FedLMG's BN-only warm-up).

    ``loss(images, rows, warmup)`` returns one loss per image ``[b]``: ``rows`` are
    the images' global indices (a method looks up labels and models by them).
    Losses are per image, so the gradients, like the noise, do not depend on the
    batch the image is sampled in.
    """

    loss: Callable[[torch.Tensor, range, bool], torch.Tensor]
    step: float = 1.0
    warmup: int = 0
    until: float = 1.0  # fraction of the steps that are guided (1: all)
    # move each image by ``step`` noise standard deviations (``sqrt(1 - a_t)``) per
    # element (root mean square) along its gradient's direction, instead of
    # ``step * grad``: a step that means the same in any latent space and scale
    normalize: bool = False


def predicted_x0(
    scheduler: Any, x: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The clean sample a VP scheduler's model output predicts at ``t`` (DDPM Eq. 15):
    epsilon: ``(x - sqrt(1 - a_t) eps) / sqrt(a_t)``; v: ``sqrt(a_t) x - sqrt(1 - a_t) v``."""
    a = scheduler.alphas_cumprod.to(x.device)[int(t)].to(x.dtype)
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return (x - (1 - a).sqrt() * model_out) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * model_out
    if kind == "sample":
        return model_out
    raise ValueError(f"latent guidance: prediction_type={kind!r} is not supported")


def guidance_move(
    grad: torch.Tensor, step: float, alpha_bar: torch.Tensor | float, normalize: bool
) -> torch.Tensor:
    """What ``LatentGuidance`` subtracts from ``x_t`` (``[b, ...]``): ``step * grad``,
    or with ``normalize`` each image's gradient direction scaled to a root mean
    square of ``step * sqrt(1 - alpha_bar_t)`` per element (``step`` noise standard
    deviations at ``t``); a zero gradient gives no move."""
    if not normalize:
        return step * grad
    rms = grad.flatten(1).pow(2).mean(1).sqrt()
    scale = torch.where(rms > 0, 1.0 / rms.clamp_min(1e-30), torch.zeros_like(rms))
    sigma = (
        1.0 - torch.as_tensor(alpha_bar, dtype=grad.dtype, device=grad.device)
    ).sqrt()
    return grad * (step * sigma * scale).view(-1, *[1] * (grad.ndim - 1))
