"""No federation, client side: train on the own data, evaluate on the own
held-out split; only metrics go up."""

from __future__ import annotations

import time

from common.train import accuracy

from ..base import ClientJob, ClientResult
from ..fedavg.client_fedavg import train_local_model


def collect(job: ClientJob) -> ClientResult:
    t0 = time.perf_counter()
    model = train_local_model(job.cfg, job.data, None, job.seed)
    acc = accuracy(model, job.data.test_images, job.data.test_labels)
    return ClientResult(
        metrics={
            "num-examples": float(len(job.data.train_labels)),
            "num-test-examples": float(len(job.data.test_labels)),
            "accuracy": acc,
            "client-s": time.perf_counter() - t0,
        }
    )
