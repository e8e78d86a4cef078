"""No federation: each client trains and evaluates on its own data only.

The reference that tells whether collaboration helped at all. Each client also
evaluates its own model on the global test set (the round reports the mean)."""

from __future__ import annotations

from common.contract import PayloadError, Reply, safe_text
from common.datasets import GLOBAL_METRIC

from ..base import ClientJob, ClientResult, OneShotMethod, ServerContext
from . import client_local


class Local(OneShotMethod):
    """No federation: each client trains and evaluates its own classifier; the
    server checks the reported accuracies and pushes nothing back."""

    collect_type = "train.local"
    evaluate_type = None  # clients already evaluated their own models

    @staticmethod
    def client_collect(job: ClientJob) -> ClientResult:
        """Train a classifier on the client's own data; report its accuracy on the
        held-out split and on the global test set (``client_local.collect``)."""
        return client_local.collect(job)

    def validate(self, reply: Reply, ctx: ServerContext) -> None:
        """Reject a reply without an accuracy in ``[0, 1]``, or with a global-test
        accuracy outside it."""
        acc = reply.metrics.get("accuracy")
        if acc is None or not 0.0 <= acc <= 1.0:
            raise PayloadError(f"accuracy={acc} is not in [0, 1]")
        # its own model on the global test set: overall and per domain
        for key, value in reply.metrics.items():
            if key.startswith(GLOBAL_METRIC) and not 0.0 <= value <= 1.0:
                raise PayloadError(f"{safe_text(key, 60)}={value} is not in [0, 1]")
