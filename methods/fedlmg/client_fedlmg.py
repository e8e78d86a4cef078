"""FedLMG's client work, free of Flower: train the local classifier once (in the
client's own architecture) and upload it with its class counts. The cost is
one-shot FedAvg's local training (``client-s``)."""

from __future__ import annotations

import time

import torch

from ..base import ClientJob, ClientResult
from ..fedavg.client_fedavg import train_local_model
from . import payload_fedlmg as P
from .config_fedlmg import FedLmgConfig


def client_arch(job: ClientJob) -> str:
    """node-config ``classifier`` > ``fedlmg-client-classifiers`` > ``classifier``."""
    if job.node_classifier:
        return job.node_classifier
    archs = job.cfg.options(FedLmgConfig).client_classifiers()
    return archs[job.partition_id % len(archs)] if archs else job.cfg.classifier


def collect(job: ClientJob) -> ClientResult:
    """Train the client's own-architecture classifier once; upload it with the
    class counts."""
    t0 = time.perf_counter()
    arch = client_arch(job)
    cfg = job.cfg.model_copy(update={"classifier": arch})
    model = train_local_model(cfg, job.data, None, job.seed)
    counts = torch.bincount(job.data.train_labels, minlength=job.data.num_classes)
    seconds = time.perf_counter() - t0
    return ClientResult(
        payload=P.layout(model.state_dict(), counts),
        metrics={
            "num-examples": float(len(job.data.train_labels)),
            "client-s": seconds,
        },
        meta={"arch": arch},
    )
