"""One-shot FedAvg (McMahan et al. 2017, in one round): every client trains the
same initial classifier on its data, the server averages the weights once,
weighted by the clients' example counts with no share above max-weight-share.

Its steps are the ones every method that collects trained classifiers builds on:
the initial weights that go down (``reference_state``), the check of an upload
against them (``validate``) and the capped-share average (``average_uploads``).
DENSE and FedDiff subclass ``FedAvg`` for its client half and collection and
replace the server work.
"""

from __future__ import annotations

import time
from logging import INFO
from typing import Any

import torch
from flwr.app import RecordDict
from flwr.common.logger import log

from common import contract as C
from common.contract import Reply
from common.maths import cap_shares
from common.robust import robust_state_dicts

from ..base import OneShotMethod, ServerContext, ServerOutput
from ..initial import initial_state
from . import client_fedavg
from . import payload_fedavg as P


def capped_shares(replies: list[Reply], ctx: ServerContext) -> list[float]:
    """The clients' weights: example counts, normalised, no share above
    ``max-weight-share`` (``common.maths.cap_shares``)."""
    return cap_shares(
        [float(r.num_examples) for r in replies], ctx.cfg.max_weight_share
    )


def weight_shares(replies: list[Reply], shares: list[float]) -> dict[int, float]:
    """``{partition id: share}``, as results.json reports them."""
    return {r.partition_id: s for r, s in zip(replies, shares, strict=True)}


def average_uploads(
    replies: list[Reply], ctx: ServerContext
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The capped-share weighted average of the uploaded state dicts, under
    ``robust-aggregation`` (``common.robust.robust_state_dicts``: ``mean`` is
    FedAvg's; ``median`` / ``trimmed-mean`` ignore the shares; ``krum`` keeps
    the shares of the clients it keeps).

    Returns
    -------
    tuple
        ``(averaged state dict, shares)``, shares in the replies' order.
    """
    shares = capped_shares(replies, ctx)
    state, info = robust_state_dicts(
        [r.tensors for r in replies],
        shares,
        ctx.cfg.robust_aggregation,
        ctx.cfg.robust_fraction,
    )
    if info["rule"] != "mean":
        log(INFO, "robust-aggregation: %s", info)
    return state, shares


class FedAvg(OneShotMethod, payload=P, client=client_fedavg):
    """One-shot FedAvg: clients train the run's initial classifier once; the
    server averages their weights with capped example-count shares."""

    def reference_state(self, ctx: ServerContext) -> dict[str, torch.Tensor]:
        """The weights that go down and that uploads must match: the run's
        initial classifier (``classifier-init``: ``methods/initial.py``)."""
        return initial_state(ctx)

    def collect_content(self, ctx: ServerContext) -> RecordDict:
        """The reference weights go down with the request. Unknown classes (an
        image folder): clients build the same initial model from the run seed
        and their class count."""
        content = super().collect_content(ctx)
        if ctx.info is not None:
            content[P.RECORD] = C.to_array_record(self.reference_state(ctx))
        return content

    def unpack(self, reply: Reply, ctx: ServerContext) -> Any:
        """A reply's state dict, checked: the reference weights' keys, shapes and
        floating/integer kinds (``reference_state``), finite values. (``Any``: a
        method built on FedAvg's collection returns its own upload type.)"""
        return P.unpack(reply.tensors, self.reference_state(ctx))

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """Average the uploads with capped example-count shares (under
        ``robust-aggregation``); the average is the global classifier."""
        t0 = time.perf_counter()
        state, shares = average_uploads(replies, ctx)
        return ServerOutput(
            model_state=state,
            arch=ctx.cfg.classifier,
            timings={"aggregate": time.perf_counter() - t0},
            extra={"weight_shares": weight_shares(replies, shares)},
        )
