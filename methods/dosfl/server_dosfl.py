"""Distilled One-Shot Federated Learning (Zhou, Pu, Ma, Li & Wu, "Distilled
One-Shot Federated Learning", arXiv 2009.07999): every client distils its data
into a few synthetic images with soft labels and learned step sizes for the
shared initial weights, uploads them once, and the server trains the global
model on them.

1. down: the run's initial classifier (one-shot FedAvg's collect message and
   initial weights, ``methods/fedavg``);
2. client: dataset distillation for those weights (``client_dosfl.distil``:
   ``dosfl-steps`` batches of one image per held class, soft labels,
   ``dosfl-steps x dosfl-epochs`` step sizes, learned through the unrolled
   steps, ``maths_dosfl``);
3. server (``dosfl-server``), from the same initial weights:
   ``sequential`` the paper's: every client's steps replayed with their step
   sizes, client after client (partition-id order),
   ``theta <- theta - eta_kt grad l(x~_kt, q_kt; theta)``;
   ``averaged``: at each step ``t`` the capped-share average of every client's
   step from the same weights; ``train``: ordinary training
   (``dosfl-server-epochs``) on the union of the distilled images with their
   soft labels (``CE(z, argmax q) + CE(z, q)``).

Deviations (README.md): the images start from real images of their class
(``dosfl-init=real``; the paper: noise) and run ``dosfl-iterations`` outer
iterations, few for a 2-core CPU; BatchNorm keeps plain averages over the
replayed steps; the default server is ``train``, because on the domain-shifted
clients here the replay of one client's steps from another's end point
collapses. The paper's soft resets and random masking are not implemented.
"""

from __future__ import annotations

import time
from logging import INFO
from typing import Any

import torch
from flwr.common.logger import log

from common.contract import Reply
from common.models import build_classifier

from ..base import ServerContext, ServerOutput
from ..fedavg.server_fedavg import FedAvg, capped_shares, weight_shares
from ..steps import SAMPLES_PER_CELL, classes_uploaded, fit_classifier
from . import client_dosfl
from . import payload_dosfl as P
from .config_dosfl import DosflConfig
from .maths_dosfl import replay, replay_averaged, replay_model


def display(images: torch.Tensor) -> torch.Tensor:
    """Distilled images scaled into ``[-1, 1]`` one by one (min to -1, max
    to 1) for the sample grid; their pixels are not bounded."""
    flat = images.flatten(1)
    lo = flat.min(1).values.view(-1, *[1] * (images.ndim - 1))
    hi = flat.max(1).values.view(-1, *[1] * (images.ndim - 1))
    return (images - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1


def order(replies: list[Reply]) -> list[Reply]:
    """The replies in the order their steps are replayed: partition id, then
    node id (a device with its own data has partition id -1)."""
    return sorted(replies, key=lambda r: (r.partition_id, r.node_id))


class Dosfl(FedAvg, config=DosflConfig):
    """One-shot FedAvg's collection (message, initial weights down) with a
    distilled set as the upload, and the global classifier trained on the sets."""

    payload_key = P.RECORD
    client_collect = staticmethod(client_dosfl.collect)

    def shape(self, ctx: ServerContext) -> P.Shape:
        """What an upload must have: the run's steps, epochs, classes, image."""
        opts = ctx.cfg.options(DosflConfig)
        size = ctx.cfg.image_size
        return P.Shape(
            opts.dosfl_steps,
            opts.dosfl_epochs,
            ctx.num_classes,
            (ctx.channels, size, size),
        )

    def unpack(self, reply: Reply, ctx: ServerContext) -> P.Upload:
        """A reply's distilled set, checked against the layout of
        ``payload_dosfl``: shapes and dtypes, finite pixels of sane size, ids in
        range, soft labels that are distributions, step sizes in ``(0, MAX_LR]``."""
        return P.unpack(reply.tensors, self.shape(ctx))

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """Train the global classifier from the shared initial weights on the
        distilled sets, as ``dosfl-server`` says."""
        cfg, opts = ctx.cfg, ctx.cfg.options(DosflConfig)
        out = ServerOutput(arch=cfg.classifier)
        t0 = time.perf_counter()
        # 1. The uploads, in replay order, and the shared initial weights
        replies = order(replies)
        shape = self.shape(ctx)
        uploads = [self.unpack(r, ctx) for r in replies]
        init = self.reference_state(ctx)
        model = replay_model(
            build_classifier(cfg.classifier, ctx.channels, ctx.num_classes)
        )
        # 2. Training on the distilled sets
        how = opts.dosfl_server
        steps = [u.steps for u in uploads]
        if how == "sequential":
            state = replay(model, init, steps)
        elif how == "averaged":
            shares = capped_shares(replies, ctx)
            state = replay_averaged(model, init, steps, shares)
            out.extra["weight_shares"] = weight_shares(replies, shares)
        else:
            images = torch.cat([s.images.flatten(0, 1) for s in steps])
            soft = torch.cat([s.labels.flatten(0, 1) for s in steps])
            trained = fit_classifier(
                cfg,
                ctx.channels,
                ctx.num_classes,
                images,
                soft.argmax(1),
                epochs=opts.dosfl_server_epochs,
                seed=cfg.seed,
                init_state=init,
                device=ctx.device,
                soft_targets=soft,
            )
            state = {k: v.detach().cpu() for k, v in trained.state_dict().items()}
        out.model_state = state
        out.timings["train"] = time.perf_counter() - t0
        # 3. What the server trained on: the sample grid and the report
        for r, u in zip(replies, uploads, strict=True):
            for j, c in enumerate(u.class_ids.tolist()):
                shown = display(u.steps.images[:SAMPLES_PER_CELL, j])
                out.samples[(r.partition_id, int(c))] = shown
        total = sum(u.steps.images.shape[0] * u.steps.images.shape[1] for u in uploads)
        lrs = torch.cat([u.steps.lrs for u in uploads])
        out.extra["num_synthetic"] = total
        out.extra["dosfl"] = {
            "server": how,
            "order": [r.partition_id for r in replies],
            "steps_replayed": {
                "sequential": len(lrs),
                "averaged": shape.epochs * shape.steps,
            }.get(how),
            "step_size_mean": float(lrs.mean()),
            "step_size_range": [float(lrs.min()), float(lrs.max())],
        }
        log(
            INFO,
            "DOSFL: %d distilled images from %d clients, server %s",
            total,
            len(uploads),
            how,
        )
        return out

    def summary(self, replies: list[Reply]) -> dict[str, Any]:
        """Upload bytes per uploaded (client, class): one class's distilled
        images, soft labels and its share of the step sizes."""
        return classes_uploaded(replies)
