"""No federation, client side: train on the own data, evaluate on the own
held-out split and on the global test set; only metrics go up."""

from __future__ import annotations

import time

from torch import nn

from common.datasets import federation_domains, global_test_set
from common.train import accuracy, predict

from ..base import ClientJob, ClientResult
from ..fedavg.client_fedavg import train_local_model


def collect(job: ClientJob) -> ClientResult:
    """Train on the own data; report the own and the global test accuracy."""
    t0 = time.perf_counter()
    model = train_local_model(job.cfg, job.data, None, job.seed)
    acc = accuracy(model, job.data.test_images, job.data.test_labels)
    return ClientResult(
        metrics={
            "num-examples": float(len(job.data.train_labels)),
            "num-test-examples": float(len(job.data.test_labels)),
            "accuracy": acc,
            **global_metrics(job, model),
            "client-s": time.perf_counter() - t0,
        }
    )


def global_metrics(job: ClientJob, model: nn.Module) -> dict[str, float]:
    """The own model on the global test set, as the server evaluates a global model:
    the same set, in the domains of every partition of the federation (as far as
    the dataset tells a client); none where the dataset has no test split."""
    args = job.cfg.data_args()
    domains = federation_domains(args, job.num_partitions)
    test = (
        global_test_set(args, domains, job.cfg.global_test_per_class)
        if domains
        else None
    )
    if test is None:
        return {}
    return test.metrics(predict(model, test.images))
