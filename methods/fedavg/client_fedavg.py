"""One-shot FedAvg's client work, free of Flower: train the received initial
classifier on the client's data once and upload its weights. ``local``, FedLMG,
DENSE and FedDiff reuse this local training."""

from __future__ import annotations

import time

import torch

from common.config import RunConfig
from common.datasets import ClientData
from common.models import build_classifier

from ..base import ClientJob, ClientResult
from ..steps import fit_classifier
from . import payload_fedavg as P


def train_local_model(
    cfg: RunConfig,
    data: ClientData,
    init_state: dict[str, torch.Tensor] | None,
    seed: int,
) -> torch.nn.Module:
    """One-shot FedAvg's local training: ``local-epochs`` on the client's
    training split, from ``init_state`` if given (else seeded by ``seed``)."""
    return fit_classifier(
        cfg,
        data.channels,
        data.num_classes,
        data.train_images,
        data.train_labels,
        epochs=cfg.local_epochs,
        seed=seed,
        init_state=init_state,
    )


def collect(job: ClientJob) -> ClientResult:
    """Train the received initial classifier locally; upload its weights."""
    t0 = time.perf_counter()
    init = job.arrays.get(P.RECORD)
    if init is None:  # the server could not know the classes: seed-made init
        torch.manual_seed(job.cfg.seed)
        init = build_classifier(
            job.cfg.classifier, job.data.channels, job.data.num_classes
        ).state_dict()
    model = train_local_model(job.cfg, job.data, init, job.seed)
    return ClientResult(
        payload={k: v.detach() for k, v in model.state_dict().items()},
        metrics={
            "num-examples": float(len(job.data.train_labels)),
            "client-s": time.perf_counter() - t0,
        },
    )
