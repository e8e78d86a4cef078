"""AdamW and the one-cycle schedule for a client's training, without the
import of ``torch._dynamo`` that ``torch.optim.Optimizer`` makes.

Flower starts a fresh ClientApp process for every message, so a client that
trains pays every import again. ``torch.optim.Optimizer`` imports
``torch._dynamo`` (and sympy) on its first use: its ``add_param_group``,
``zero_grad`` and ``step`` are wrapped by ``torch._disable_dynamo`` and
``_use_grad_for_differentiable``. That import took 1.0 CPU-second and 70 MB
of resident memory in a fresh process on this project's 2-core CI machine
(torch 2.13), and is paid again by every message that trains, for no use:
nothing here is compiled. (diffusers imports ``torch._dynamo`` itself, so a
client that loads the UNet, as LoRA's and FedBiP's do, pays it anyway; they use
this optimizer too, so that every client trains with one.)

So the update itself is torch's: ``AdamW.step`` calls ``torch.optim.adam.adam``,
the functional form that ``torch.optim.AdamW.step`` calls, with the same state
and arguments (decoupled weight decay; on a CPU its single-tensor path, on CUDA
foreach, as ``torch.optim`` picks). What is written here is the bookkeeping
around it (the per-parameter state) and ``OneCycle``, the schedule of
``torch.optim.lr_scheduler.OneCycleLR`` (cosine annealing, momentum cycled in
Adam's ``beta1``) as a pure function of the step. ``tests/unit/test_optim.py``
checks both against ``torch.optim`` bit for bit, and that a fresh process that
trains with them does not import ``torch._dynamo``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.optim.adam import adam


@dataclass(frozen=True)
class OneCycle:
    """``OneCycleLR``'s learning rate and momentum at each step (two phases,
    cosine annealing), as in Smith & Topin 2019 and ``torch.optim.lr_scheduler``.

    Phase 1 (the first ``pct_start`` of the steps): the learning rate rises from
    ``max_lr / div_factor`` to ``max_lr`` while the momentum falls from
    ``max_momentum`` to ``base_momentum``; phase 2: the learning rate falls to
    ``max_lr / div_factor / final_div_factor`` and the momentum rises back.
    """

    max_lr: float
    total_steps: int
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    base_momentum: float = 0.85
    max_momentum: float = 0.95

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"OneCycle: total_steps={self.total_steps} must be >= 1")
        if not 0.0 <= self.pct_start <= 1.0:
            raise ValueError(f"OneCycle: pct_start={self.pct_start} not in [0, 1]")

    def at(self, step: int) -> tuple[float, float]:
        """``(learning rate, momentum)`` for optimizer step ``step`` (0-based)."""
        if not 0 <= step <= self.total_steps:
            raise ValueError(
                f"OneCycle: step {step} outside [0, total_steps={self.total_steps}]"
            )
        initial = self.max_lr / self.div_factor
        lows = initial / self.final_div_factor
        # (end step, learning rate from, to, momentum from, to), as OneCycleLR
        rise = (float(self.pct_start * self.total_steps) - 1, initial, self.max_lr)
        fall = (float(self.total_steps - 1), self.max_lr, lows)
        phases = (
            (*rise, self.max_momentum, self.base_momentum),
            (*fall, self.base_momentum, self.max_momentum),
        )
        start = 0.0
        for i, (end, lr0, lr1, m0, m1) in enumerate(phases):
            if step <= end or i == len(phases) - 1:
                # a phase of no length (OneCycleLR divides by zero there)
                pct = (step - start) / (end - start) if end > start else 1.0
                return _cos(lr0, lr1, pct), _cos(m0, m1, pct)
            start = end
        raise AssertionError("unreachable")


def _cos(start: float, end: float, pct: float) -> float:
    """Cosine annealing from ``start`` to ``end`` as ``pct`` goes 0 -> 1."""
    cos_out = math.cos(math.pi * pct) + 1
    return end + (start - end) / 2.0 * cos_out


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019): the update of
    ``torch.optim.AdamW`` (same defaults), through torch's functional ``adam``.

    ``schedule``: a ``OneCycle`` sets the learning rate and ``beta1`` before
    every step, as ``OneCycleLR`` does when stepped after each ``step()``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        schedule: OneCycle | None = None,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("AdamW: no parameter requires a gradient")
        self.lr, self.betas = lr, betas
        self.eps, self.weight_decay = eps, weight_decay
        self.schedule = schedule
        self.steps = 0  # optimizer steps taken
        self.state: dict[torch.Tensor, tuple[torch.Tensor, ...]] = {}

    def zero_grad(self) -> None:
        """Drop the gradients (``set_to_none``, as ``torch.optim``'s default)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        lr, (beta1, beta2) = self.lr, self.betas
        if self.schedule is not None:
            lr, beta1 = self.schedule.at(self.steps)
        params = [p for p in self.params if p.grad is not None]
        for p in params:
            if p not in self.state:  # as torch.optim.Adam._init_group
                self.state[p] = (
                    torch.tensor(0.0, dtype=torch.get_default_dtype()),
                    torch.zeros_like(p, memory_format=torch.preserve_format),
                    torch.zeros_like(p, memory_format=torch.preserve_format),
                )
        adam(
            params,
            [p.grad for p in params],  # type: ignore[misc]
            [self.state[p][1] for p in params],
            [self.state[p][2] for p in params],
            [],
            [self.state[p][0] for p in params],
            amsgrad=False,
            has_complex=any(torch.is_complex(p) for p in params),
            beta1=beta1,
            beta2=beta2,
            lr=lr,
            weight_decay=self.weight_decay,
            eps=self.eps,
            maximize=False,
            decoupled_weight_decay=True,
        )
        self.steps += 1
