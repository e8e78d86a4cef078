"""DeepInversion's BatchNorm-statistic loss (Yin et al. 2020, "Dreaming to Distill"),
written once for the methods that synthesise data against trained classifiers:
DENSE over a batch, FedLMG per image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def bn_statistic_loss(
    h: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    per_image: bool = False,
) -> torch.Tensor:
    """``||mu(h) - running_mean||_2 + ||var(h) - running_var||_2`` for one BN layer.

    Parameters
    ----------
    h : Tensor
        ``[N, C, H, W]`` the layer's input.
    running_mean, running_var : Tensor
        ``[C]`` the layer's running statistics.
    per_image : bool
        ``False``: per-channel mean and biased variance over the batch and the
        positions (DeepInversion's hook, DENSE); ``True``: over each image's
        positions (FedLMG, whose code samples one image at a time).

    Returns
    -------
    Tensor
        A scalar, or ``[N]`` with ``per_image``.
    """
    h = h.float()
    if per_image:
        mean = h.mean(dim=(2, 3))
        var = h.var(dim=(2, 3), unbiased=False)
    else:
        mean = h.mean(dim=(0, 2, 3))
        var = h.transpose(0, 1).reshape(h.shape[1], -1).var(dim=1, unbiased=False)
    return torch.linalg.vector_norm(
        mean - running_mean.float(), dim=-1
    ) + torch.linalg.vector_norm(var - running_var.float(), dim=-1)


class BNStatistics:
    """Forward hooks on every ``BatchNorm2d`` of ``models``; ``pop()`` returns the
    sum of ``bn_statistic_loss`` over the layers run since the last call."""

    def __init__(self, models: Sequence[nn.Module], *, per_image: bool = False):
        self.per_image = per_image
        self.terms: list[torch.Tensor] = []
        self.handles = [
            m.register_forward_hook(self._hook)
            for model in models
            for m in model.modules()
            if isinstance(m, nn.BatchNorm2d)
        ]

    def _hook(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], _: Any
    ) -> None:
        assert isinstance(module, nn.BatchNorm2d)
        assert module.running_mean is not None and module.running_var is not None
        self.terms.append(
            bn_statistic_loss(
                inputs[0],
                module.running_mean,
                module.running_var,
                per_image=self.per_image,
            )
        )

    def pop(self) -> torch.Tensor:
        """The summed terms (a scalar, or ``[N]`` per image); zero where no BN
        layer ran."""
        total = torch.stack(self.terms).sum(0) if self.terms else torch.zeros(())
        self.terms = []
        return total

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self.handles:
            h.remove()
