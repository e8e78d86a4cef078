"""FedHydra's client work, free of Flower: one-shot FedAvg's local training (in
the client's own architecture where it has one) and the trained model's
per-class record on the client's held-out split, which the server stratifies
the models by. The extra cost is one forward pass over the held-out split."""

from __future__ import annotations

import time

import torch

from common.datasets import ClientData
from common.train import predict

from ..base import ClientJob, ClientResult
from ..fedavg.client_fedavg import train_local_model
from . import payload_fedhydra as P
from .config_fedhydra import FedHydraConfig


def client_arch(job: ClientJob) -> str:
    """node-config ``classifier`` > ``fedhydra-client-classifiers`` > ``classifier``."""
    if job.node_classifier:
        return job.node_classifier
    archs = job.cfg.options(FedHydraConfig).client_classifiers()
    return archs[job.partition_id % len(archs)] if archs else job.cfg.classifier


def heldout_record(
    model: torch.nn.Module, data: ClientData
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the held-out examples and how many ``model`` gets right:
    ``(held-out [K], correct [K])``, int64."""
    k, labels = data.num_classes, data.test_labels
    held = torch.bincount(labels, minlength=k)
    if not len(labels):
        return held, torch.zeros(k, dtype=torch.int64)
    right = predict(model, data.test_images) == labels
    return held, torch.bincount(labels[right], minlength=k)


def collect(job: ClientJob) -> ClientResult:
    """Train the local classifier once as one-shot FedAvg does (from the shared
    initial weights where it is the run's ``classifier``, else from the client's
    seed) and upload it with its class counts and per-class held-out record."""
    t0 = time.perf_counter()
    arch = client_arch(job)
    cfg, init = job.cfg, job.arrays.get(P.RECORD)
    if arch != cfg.classifier:  # its own architecture: the initial weights don't fit
        cfg, init = cfg.model_copy(update={"classifier": arch}), None
    model = train_local_model(cfg, job.data, init, job.seed)
    held, correct = heldout_record(model, job.data)
    counts = torch.bincount(job.data.train_labels, minlength=job.data.num_classes)
    seconds = time.perf_counter() - t0
    return ClientResult(
        payload=P.layout(model.state_dict(), counts, held, correct),
        metrics={
            "num-examples": float(len(job.data.train_labels)),
            "num-validation-examples": float(int(held.sum())),
            "validation-accuracy": float(correct.sum() / held.sum().clamp_min(1)),
            "client-s": seconds,
        },
        meta={"arch": arch},
    )
