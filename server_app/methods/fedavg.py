"""One-shot FedAvg (McMahan et al. 2017, in one round): every client trains the
same initial classifier on its data, the server averages the weights once."""

from __future__ import annotations

import time

import torch
from flwr.app import RecordDict

from common import contract as C
from common.contract import Reply
from common.maths import fedavg_state_dicts
from common.models import build_classifier

from ..context import ServerContext, ServerOutput
from .base import OneShotMethod


class FedAvg(OneShotMethod):
    name = "fedavg"
    collect_type = C.TRAIN_MODEL
    payload_key = C.KEY_MODEL

    def initial_state(self, ctx: ServerContext) -> dict[str, torch.Tensor]:
        torch.manual_seed(ctx.cfg.seed)
        model = build_classifier(ctx.cfg.classifier, ctx.channels, ctx.num_classes)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def collect_content(self, ctx: ServerContext) -> RecordDict:
        content = super().collect_content(ctx)
        content[C.KEY_MODEL] = C.to_array_record(self.initial_state(ctx))
        return content

    def validate(self, reply: Reply, ctx: ServerContext) -> None:
        C.validate_state_dict(
            reply, self.initial_state(ctx), int(ctx.cfg.max_upload_mb * 2**20)
        )

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        t0 = time.perf_counter()
        state = fedavg_state_dicts(
            [r.tensors for r in replies], [float(r.num_examples) for r in replies]
        )
        return ServerOutput(
            model_state=state,
            arch=ctx.cfg.classifier,
            timings={"aggregate": time.perf_counter() - t0},
        )
