"""DOSFL's maths, pure: dataset distillation's unrolled steps (Wang et al. 2018,
arXiv 1811.10959) with soft labels (Sucholutsky & Schonlau 2019, arXiv
1910.02551), as a functional forward of any ``nn.Module``.

A distilled set is ``S`` batches ``x~_s`` with soft labels ``q_s`` (one image per
class the client holds in each batch) and ``E * S`` step sizes ``eta_t``; training
on it means ``E`` passes over the batches from the initial weights ``theta_0``:

    theta_{t+1} = theta_t - eta_t grad_theta l(x~_s, q_s; theta_t),
    t = e S + s,  l(x, q; theta) = mean_i sum_k -q_ik log softmax(f(x_i; theta))_k

The client learns ``x~``, ``q`` and ``eta`` by gradient descent on the loss of the
last weights on its real data, ``L(theta_T) = CE(f(x; theta_T), y)``, through the
unrolled steps (``distillation_loss``); the server replays the steps
(``replay``). BatchNorm layers run in train mode during the steps (batch
statistics; their running statistics, the plain average over the steps with
``replay_model``, are updated as a replay updates them, without gradient) and
in eval mode for ``L``, as the replayed model is evaluated.

No Flower, no I/O: functions of tensors, checked by hand in ``tests/methods/test_dosfl.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from common.train import soft_cross_entropy

Params = dict[str, torch.Tensor]


@dataclass
class Steps:
    """A distilled set in the order it is trained on.

    ``images`` ``[S, B, C, H, W]``, ``labels`` ``[S, B, K]`` (soft labels,
    rows summing to 1), ``lrs`` ``[E * S]`` (positive step sizes); step ``t``
    trains on batch ``t mod S`` with ``lrs[t]``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    lrs: torch.Tensor

    @property
    def num_steps(self) -> int:
        """``E * S``: the gradient steps of one replay."""
        return len(self.lrs)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(x~_s, q_s, eta_t)`` for ``t = 0 .. E S - 1``."""
        s = len(self.images)
        for t in range(self.num_steps):
            yield self.images[t % s], self.labels[t % s], self.lrs[t]


def replay_model(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm layer's running statistics kept as the
    plain average of the batches seen (``momentum=None``), in place.

    A replay is a few dozen steps: with the default momentum (0.1) the running
    statistics would still hold much of the initial ``(0, 1)``, far from the
    distilled batches' statistics, and the replayed model would be evaluated
    with them. Client and server both unroll through this model.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    return model


def split_state(
    state: dict[str, torch.Tensor], model: nn.Module
) -> tuple[Params, Params]:
    """``(parameters, buffers)`` of a state dict, as ``model`` names them; the
    parameters float copies (ready to be differentiated), the buffers clones."""
    names = {n for n, _ in model.named_parameters()}
    params = {k: v.detach().clone().float() for k, v in state.items() if k in names}
    buffers = {k: v.detach().clone() for k, v in state.items() if k not in names}
    return params, buffers


def step(
    model: nn.Module,
    params: Params,
    buffers: Params,
    x: torch.Tensor,
    q: torch.Tensor,
    lr: torch.Tensor,
    create_graph: bool = False,
) -> Params:
    """One step ``theta - eta grad_theta l(x, q; theta)`` in train mode.

    BatchNorm's running statistics in ``buffers`` are updated in place (as
    ``nn.BatchNorm`` does; they carry no gradient). With ``create_graph`` the
    new weights stay differentiable w.r.t. ``params``, ``x``, ``q`` and ``lr``
    (the unrolled graph of the distillation); without, they are detached.
    """
    model.train()
    logits = functional_call(model, {**params, **buffers}, (x,))
    loss = soft_cross_entropy(logits, q)
    names = list(params)
    grads = torch.autograd.grad(
        loss, [params[n] for n in names], create_graph=create_graph
    )
    new = {n: params[n] - lr * g for n, g in zip(names, grads, strict=True)}
    return new if create_graph else {n: v.detach() for n, v in new.items()}


def unroll(
    model: nn.Module,
    params: Params,
    buffers: Params,
    steps: Steps,
    create_graph: bool = False,
) -> Params:
    """The weights after every step of ``steps`` from ``params`` (``buffers``
    updated in place)."""
    for x, q, lr in steps:
        if not create_graph:
            params = {k: v.detach().requires_grad_() for k, v in params.items()}
        params = step(model, params, buffers, x, q, lr, create_graph)
    return params


def evaluate_loss(
    model: nn.Module,
    params: Params,
    buffers: Params,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """``CE(f(x; theta), y)`` in eval mode (BatchNorm's running statistics)."""
    model.eval()
    logits = functional_call(model, {**params, **buffers}, (images,))
    return F.cross_entropy(logits, labels)


def distillation_loss(
    model: nn.Module,
    params: Params,
    buffers: Params,
    steps: Steps,
    real_images: torch.Tensor,
    real_labels: torch.Tensor,
) -> torch.Tensor:
    """The distillation objective ``L(theta_T)``: the loss on real data of the
    weights the distilled steps reach from ``params`` (differentiable w.r.t. the
    steps' images, labels and step sizes; ``buffers`` are copied, not changed)."""
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    bufs = {k: v.clone() for k, v in buffers.items()}
    final = unroll(model, params, bufs, steps, create_graph=True)
    return evaluate_loss(model, final, bufs, real_images, real_labels)


def replay(
    model: nn.Module, state: dict[str, torch.Tensor], sequence: list[Steps]
) -> dict[str, torch.Tensor]:
    """The state dict after training ``state`` on the distilled sets of
    ``sequence`` one after the other (DOSFL's server: the clients' steps
    concatenated). ``model`` gives the architecture; ``state`` is not changed."""
    params, buffers = split_state(state, model)
    for steps in sequence:
        params = unroll(model, params, buffers, steps)
    return _join(state, params, buffers)


def replay_averaged(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    sets: list[Steps],
    weights: list[float],
) -> dict[str, torch.Tensor]:
    """The state dict after ``E S`` averaged steps: at step ``t`` every set's
    step is taken from the same weights and the new weights (and BatchNorm
    statistics) are the ``weights``-average of the results,

        theta_{t+1} = sum_k w_k (theta_t - eta_kt grad l(x~_kt, q_kt; theta_t)).

    Every set must have the same number of steps; ``weights`` sum to 1.
    """
    counts = {s.num_steps for s in sets}
    if len(counts) != 1:
        raise ValueError(f"the sets have different numbers of steps {sorted(counts)}")
    params, buffers = split_state(state, model)
    iters = [iter(s) for s in sets]
    for _ in range(counts.pop()):
        new_p: Params = {k: torch.zeros_like(v) for k, v in params.items()}
        new_b: Params = {}
        for it, w in zip(iters, weights, strict=True):
            x, q, lr = next(it)
            bufs = {k: v.clone() for k, v in buffers.items()}
            p = {k: v.detach().requires_grad_() for k, v in params.items()}
            out = step(model, p, bufs, x, q, lr)
            for k, v in out.items():
                new_p[k] += w * v
            for k, v in bufs.items():
                if v.is_floating_point():
                    new_b[k] = new_b.get(k, torch.zeros_like(v)) + w * v
                else:  # BatchNorm's step counter: the same in every set
                    new_b[k] = v
        params, buffers = new_p, new_b
    return _join(state, params, buffers)


def _join(
    state: dict[str, torch.Tensor], params: Params, buffers: Params
) -> dict[str, torch.Tensor]:
    """``params`` and ``buffers`` in ``state``'s key order and dtypes."""
    out = params | buffers
    return {k: out[k].detach().to(v.dtype) for k, v in state.items()}


# ---------------------------------------------------------------- parametrisation


def label_logit_init(num_classes: int) -> float:
    """The initial logit ``a`` of a soft label's own class (0 elsewhere), so that
    ``softmax`` gives it 0.9: ``e^a / (e^a + K - 1) = 0.9``, ``a = ln(9 (K - 1))``."""
    return math.log(9 * max(1, num_classes - 1))


def raw_lr(lr: float) -> float:
    """The inverse of ``softplus``: the raw value whose ``softplus`` is ``lr``
    (the step sizes are learned through ``eta = softplus(r)``, positive)."""
    return math.log(math.expm1(lr))
