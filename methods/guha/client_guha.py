"""Guha et al.'s client work, free of Flower: one-shot FedAvg's local training and
upload (``methods/fedavg/client_fedavg.py``), plus the trained model's accuracy on
the client's own held-out split, the score of the paper's CV selection."""

from __future__ import annotations

import time

from ..base import ClientJob, ClientResult, classifier_accuracy
from ..fedavg import client_fedavg
from .payload_guha import VALIDATION


def collect(job: ClientJob) -> ClientResult:
    """Train the local classifier as one-shot FedAvg does and add its accuracy
    on the client's held-out split (the client-side cross-validation score)."""
    t0 = time.perf_counter()
    trained = client_fedavg.collect(job)
    acc = classifier_accuracy(
        trained.payload, job.cfg.classifier, job.data.num_classes, job.data
    )
    return ClientResult(
        payload=trained.payload,
        metrics={
            "num-examples": trained.metrics["num-examples"],
            "num-validation-examples": float(len(job.data.test_labels)),
            # no held-out images: the model cannot be scored, CV ranks it last
            VALIDATION: acc if acc == acc else 0.0,
            "client-s": time.perf_counter() - t0,
        },
    )
