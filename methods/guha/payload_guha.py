"""Guha et al.'s payload: one-shot FedAvg's (``methods/fedavg/payload_fedavg.py``,
a classifier state dict in the ``model`` ArrayRecord) plus one number in the
reply's metrics:

``validation-accuracy``  the uploaded model's accuracy on the client's own
                         held-out split, in ``[0, 1]`` (CV selection's score)
"""

from __future__ import annotations

import torch

from common.contract import PayloadError, Reply

from ..fedavg import payload_fedavg

RECORD = payload_fedavg.RECORD
VALIDATION = "validation-accuracy"


def unpack(
    reply: Reply, reference: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], float]:
    """The state dict (fedavg's checks) and the client's validation accuracy."""
    state = payload_fedavg.unpack(reply.tensors, reference)
    acc = reply.metrics.get(VALIDATION)
    if acc is None or not 0.0 <= acc <= 1.0:
        raise PayloadError(f"metric {VALIDATION!r}={acc} is not in [0, 1]")
    return state, float(acc)
