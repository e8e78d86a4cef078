"""DENSE's client work, free of Flower: one-shot FedAvg's local training, once.

The client trains the received initial classifier on its data
(``client_fedavg.collect``) and uploads the weights (``client-s``, and per
training example ``client-s-per-image``).
"""

from __future__ import annotations

from ..base import ClientJob, ClientResult
from ..fedavg import client_fedavg


def collect(job: ClientJob) -> ClientResult:
    return client_fedavg.collect(job)
