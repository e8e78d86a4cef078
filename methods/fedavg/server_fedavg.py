"""One-shot FedAvg (McMahan et al. 2017, in one round): every client trains the
same initial classifier on its data, the server averages the weights once,
weighted by the clients' example counts with no share above max-weight-share."""

from __future__ import annotations

import time

import torch
from flwr.app import RecordDict

from common import contract as C
from common.contract import Reply
from common.maths import cap_shares, fedavg_state_dicts
from common.models import build_classifier

from ..base import ClientJob, ClientResult, OneShotMethod, ServerContext, ServerOutput
from . import client_fedavg
from . import payload_fedavg as P


def send_initial_state(content: RecordDict, ctx: ServerContext) -> RecordDict:
    """The shared initial weights go down with the request. Unknown classes (an
    image folder): clients build the same initial model from the run seed and
    their class count."""
    if ctx.info is not None:
        content[P.RECORD] = C.to_array_record(initial_state(ctx))
    return content


def initial_state(ctx: ServerContext) -> dict[str, torch.Tensor]:
    torch.manual_seed(ctx.cfg.seed)
    model = build_classifier(ctx.cfg.classifier, ctx.channels, ctx.num_classes)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class FedAvg(OneShotMethod):
    name = "fedavg"
    collect_type = "train"
    payload_key = P.RECORD

    @staticmethod
    def client_collect(job: ClientJob) -> ClientResult:
        return client_fedavg.collect(job)

    def collect_content(self, ctx: ServerContext) -> RecordDict:
        return send_initial_state(super().collect_content(ctx), ctx)

    def validate(self, reply: Reply, ctx: ServerContext) -> None:
        P.unpack(reply.tensors, initial_state(ctx))

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        t0 = time.perf_counter()
        shares = cap_shares(
            [float(r.num_examples) for r in replies], ctx.cfg.max_weight_share
        )
        state = fedavg_state_dicts([r.tensors for r in replies], shares)
        return ServerOutput(
            model_state=state,
            arch=ctx.cfg.classifier,
            timings={"aggregate": time.perf_counter() - t0},
            extra={
                "weight_shares": {
                    r.partition_id: s for r, s in zip(replies, shares, strict=True)
                }
            },
        )
