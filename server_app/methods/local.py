"""No federation: each client trains and evaluates on its own data only.

The reference that tells whether collaboration helped at all."""

from __future__ import annotations

from common import contract as C
from common.contract import PayloadError, Reply

from ..context import ServerContext
from .base import OneShotMethod


class Local(OneShotMethod):
    name = "local"
    collect_type = C.TRAIN_LOCAL
    evaluate_type = None  # clients already evaluated their own models

    def validate(self, reply: Reply, ctx: ServerContext) -> None:
        acc = reply.metrics.get("accuracy")
        if acc is None or not 0.0 <= acc <= 1.0:
            raise PayloadError(f"accuracy={acc} is not in [0, 1]")
