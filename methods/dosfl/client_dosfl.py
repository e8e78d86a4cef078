"""DOSFL's client work, free of Flower: distil the private training split into a
few synthetic images per class, with soft labels and step sizes, for the shared
initial weights (dataset distillation, Wang et al. 2018, with soft labels as
Sucholutsky & Schonlau 2019; ``maths_dosfl`` holds the unrolled steps).

The initial weights come down with the request as one-shot FedAvg's do
(``methods/fedavg``); the server replays the uploaded steps from the same
weights.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.models import build_classifier
from common.optim import AdamW

from ..base import ClientJob, ClientResult
from ..fedavg import payload_fedavg
from . import payload_dosfl as P
from .config_dosfl import DosflConfig
from .maths_dosfl import (
    Steps,
    distillation_loss,
    label_logit_init,
    raw_lr,
    replay_model,
    split_state,
    unroll,
)


@dataclass
class Distilled:
    """One client's distilled set and how the distillation went.

    ``class_ids`` ``[B]``: the class of each image of a batch (the classes the
    client holds, ascending); ``steps``: ``S`` batches of ``B`` images, soft
    labels and ``E S`` step sizes; ``losses``: the real-data loss of the
    replayed weights at the first and the last outer iteration.
    """

    class_ids: torch.Tensor
    steps: Steps
    losses: tuple[float, float]


def _batches(n: int, size: int, g: torch.Generator) -> Iterator[torch.Tensor]:
    """Indices of one batch after another, reshuffled at every pass (an
    infinite loader over ``n`` examples, ``min(size, n)`` at a time)."""
    size = min(size, n)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - size + 1, size):
            yield perm[i : i + size]


def initial_images(
    images: torch.Tensor,
    labels: torch.Tensor,
    class_ids: torch.Tensor,
    steps: int,
    g: torch.Generator,
) -> torch.Tensor:
    """``[steps, B, C, H, W]``: for each class of ``class_ids`` ``steps``
    training images of that class drawn at random (without replacement while
    the class has enough)."""
    cols = []
    for c in class_ids.tolist():
        idx = torch.nonzero(labels == c).flatten()
        pick = (
            torch.randperm(len(idx), generator=g)[:steps]
            if len(idx) >= steps
            else torch.randint(len(idx), (steps,), generator=g)
        )
        cols.append(images[idx[pick]].float())
    return torch.stack(cols, dim=1).clone()


def distil(
    model: nn.Module,
    init_state: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    opts: DosflConfig,
    *,
    batch_size: int,
    seed: int,
) -> Distilled:
    """Dataset distillation of ``images`` / ``labels`` for ``init_state``.

    Parameters
    ----------
    model : nn.Module
        The classifier's architecture (its own weights are not used), as
        ``maths_dosfl.replay_model`` prepares it.
    init_state : dict
        The shared initial weights every replay starts from (the paper's
        known initialisation ``theta_0``).
    images, labels : Tensor
        The client's training split, ``[N, C, H, W]`` in ``[-1, 1]`` and ``[N]``.
    num_classes : int
        ``K``: the width of the soft labels.
    opts : DosflConfig
        ``dosfl-steps`` (``S``), ``dosfl-epochs`` (``E``), ``dosfl-iterations``,
        ``dosfl-distill-lr``, ``dosfl-step-lr``, ``dosfl-soft-labels``.
    batch_size, seed : int
        Real images per outer iteration; the seed of the initial images and of
        the batches.

    Returns
    -------
    Distilled
        ``S`` batches of one image per held class, detached.
    """
    # 1. Check inputs
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(
            f"distil: {len(images)} images, {len(labels)} labels; need as many, >= 1"
        )
    s, e = opts.dosfl_steps, opts.dosfl_epochs
    g = torch.Generator().manual_seed(seed)
    params, buffers = split_state(init_state, model)

    # 2. Learnable set: real images of the class or noise (dataset
    # distillation's), one-hot soft labels at 0.9 on their class, every step
    # size at dosfl-step-lr
    class_ids = labels.unique().sort().values
    b = len(class_ids)
    if opts.dosfl_init == "real":
        x = initial_images(images, labels, class_ids, s, g)
    else:
        x = torch.randn((s, b, *images.shape[1:]), generator=g)
    x.requires_grad_()
    onehot = F.one_hot(class_ids, num_classes).float()
    logits = (onehot * label_logit_init(num_classes)).repeat(s, 1, 1)
    logits.requires_grad_(opts.dosfl_soft_labels)
    hard = onehot.repeat(s, 1, 1)

    def labels_now() -> torch.Tensor:
        return logits.softmax(-1) if opts.dosfl_soft_labels else hard

    raw = torch.full((e * s,), raw_lr(opts.dosfl_step_lr)).requires_grad_()
    learned = [x, raw] + ([logits] if opts.dosfl_soft_labels else [])
    # dataset distillation's optimiser: Adam with beta1 = 0.5 (torch.optim.Adam's
    # update: AdamW without decay, common/optim.py)
    opt = AdamW(learned, lr=opts.dosfl_distill_lr, betas=(0.5, 0.999), weight_decay=0.0)

    # 3. Outer loop: unroll from theta_0, loss on a real batch, update the set
    first = last = float("nan")
    batches = _batches(len(labels), batch_size, g)
    for it in range(opts.dosfl_iterations):
        idx = next(batches)
        steps = Steps(x, labels_now(), F.softplus(raw))
        loss = distillation_loss(
            model, params, buffers, steps, images[idx].float(), labels[idx]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = float(loss.detach())
        first = last if it == 0 else first

    with torch.no_grad():
        final = Steps(x.detach(), labels_now().detach(), F.softplus(raw).detach())
    return Distilled(class_ids, final, (first, last))


@torch.no_grad()
def replay_accuracy(
    model: nn.Module,
    init_state: dict[str, torch.Tensor],
    steps: Steps,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> float:
    """Accuracy on ``images`` of the weights the steps reach from
    ``init_state`` (NaN without images)."""
    if len(labels) == 0:
        return float("nan")
    params, buffers = split_state(init_state, model)
    with torch.enable_grad():
        final = unroll(model, params, buffers, steps)
    model.load_state_dict(final | buffers)
    model.eval()
    return float((model(images.float()).argmax(1) == labels).float().mean())


def collect(job: ClientJob) -> ClientResult:
    """Distil the training split for the received initial weights; upload the
    distilled images, soft labels, step sizes and the images' classes."""
    t0 = time.perf_counter()
    cfg, data = job.cfg, job.data
    opts = cfg.options(DosflConfig)
    model = replay_model(
        build_classifier(cfg.classifier, data.channels, data.num_classes)
    )
    init = job.arrays.get(payload_fedavg.RECORD)
    if init is None:  # the server could not know the classes: seed-made init
        torch.manual_seed(cfg.seed)
        init = build_classifier(
            cfg.classifier, data.channels, data.num_classes
        ).state_dict()
    out = distil(
        model,
        init,
        data.train_images,
        data.train_labels,
        data.num_classes,
        opts,
        batch_size=cfg.train_batch_size,
        seed=job.seed,
    )
    seconds = time.perf_counter() - t0
    metrics = {
        "num-examples": float(len(data.train_labels)),
        "client-s": seconds,
        "distill-loss-first": out.losses[0],
        "distill-loss-last": out.losses[1],
    }
    acc = replay_accuracy(model, init, out.steps, data.test_images, data.test_labels)
    if acc == acc:  # the client's own steps replayed, on its held-out split
        metrics["replay-accuracy"] = acc
    return ClientResult(payload=P.layout(out.class_ids, out.steps), metrics=metrics)
