"""Local classifier training, free of Flower (one-shot FedAvg and ``local``)."""

from __future__ import annotations

import time

import torch

from common.config import RunConfig
from common.datasets import ClientData
from common.models import build_classifier
from common.train import train_classifier

from ..base import ClientJob, ClientResult
from . import payload_fedavg as P


def train_local_model(
    cfg: RunConfig,
    data: ClientData,
    init_state: dict[str, torch.Tensor] | None,
    seed: int,
) -> torch.nn.Module:
    """Train the classifier on the client's data, from ``init_state`` if given."""
    torch.manual_seed(seed)
    model = build_classifier(cfg.classifier, data.channels, data.num_classes)
    if init_state is not None:
        model.load_state_dict(init_state)
    train_classifier(
        model,
        data.train_images,
        data.train_labels,
        epochs=cfg.local_epochs,
        batch_size=cfg.train_batch_size,
        lr=cfg.learning_rate,
        seed=seed,
    )
    return model


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
