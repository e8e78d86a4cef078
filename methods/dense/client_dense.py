"""DENSE's client work, free of Flower: one-shot FedAvg's local training, once.

The client trains the received initial classifier on its data
(``client_fedavg.collect``) and uploads the weights; ``client-s-per-image`` adds
the cost per training example to what that reports.
"""

from __future__ import annotations

from ..base import ClientJob, ClientResult
from ..fedavg import client_fedavg


def collect(job: ClientJob) -> ClientResult:
    result = client_fedavg.collect(job)
    n = max(1.0, result.metrics["num-examples"])
    result.metrics["client-s-per-image"] = result.metrics["client-s"] / n
    return result
