"""FedLMG (Yang et al., ICML 2025, arXiv 2311.08870; code MingzhaoYang/FedCADO):
one-shot, model-heterogeneous FL with local-model-guided diffusion. Clients train
their classifier once, each in its own architecture, and upload it; the server
samples every (client, class) the client has data for with the class prompt and,
at every step, moves the latent against the gradient of the client model's loss
on the predicted clean image:

    x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)         eps: the CFG-guided eps
    L      = CE(f_client(D(x0_hat)), y) + 0.1 * sum_BN ||mu - mu_run|| + ||var - var_run||
    x_t   <- x_t - grad_x L,   then the normal guided step from the moved x_t

(``bn_statistic_loss``, ``guidance_loss``; the moves run in the synthesis engine as
``LatentGuidance``), after a BN-only warm-up of a few moves at t = T. The global
model is trained on the union of the guided images: ``ft`` (cross-entropy),
``md`` (+ soft labels of the averaged client ensemble), ``sd`` (+ soft labels of
the client model that guided each image).

Deviations from the paper's code:
* the run's scheduler and steps (default DPM-Solver++ 10 steps with the
  guidance cut-off) instead of DDPM 50, ``images-per-class`` images per
  (client, class) (paper: 30), and only the classes a client has examples of
  (the code samples every class from every client: its clients each hold one
  domain with all classes; here labels are skewed, and a client model says
  nothing of a class it never saw). The client therefore also uploads its class
  counts (``K`` integers);
* the BN statistics are per image (the code samples with batch size 1), so the
  images do not depend on how the engine batches them;
* the client classifiers are ordinary classifiers of the clean image (the code's
  ``ClientTune`` also takes the timestep);
* a 16-px world with the embedded pixel-space generator (no VAE to decode
  through; with a latent generator the VAE decode is in the graph, as in the
  code).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.config import ConfigError
from common.contract import Reply
from common.models import build_classifier
from common.synthesis import LatentGuidance

from ..base import ClientJob, ClientResult, OneShotMethod, ServerContext, ServerOutput
from ..oscar.server_oscar import check_embedding_kind
from ..steps import CondUnits, budget_rows, synthesize_set, train_global
from . import client_fedlmg
from . import payload_fedlmg as P
from .config_fedlmg import FedLmgConfig

# ---------------------------------------------------------------- maths


def bn_statistic_loss(
    h: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor
) -> torch.Tensor:
    """Per image ``n``: ``||mean_hw h_n - mu_run||_2 + ||var_hw h_n - var_run||_2``
    for a BN layer's input ``h`` ``[N, C, H, W]`` (DeepInversion's statistic, over
    one image's positions); returns ``[N]``."""
    mean = h.mean(dim=(2, 3))
    var = h.var(dim=(2, 3), unbiased=False)
    return (mean - running_mean).norm(dim=1) + (var - running_var).norm(dim=1)


class GuidingModel:
    """A client classifier frozen in eval mode, with hooks on its BN layers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)
        self.inputs: list[tuple[nn.BatchNorm2d, torch.Tensor]] = []
        for m in self.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.register_forward_hook(self._keep)

    def _keep(self, m: nn.Module, inp: tuple[torch.Tensor, ...], _: Any) -> None:
        assert isinstance(m, nn.BatchNorm2d)
        self.inputs.append((m, inp[0]))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [N, K], summed BN-statistic loss [N])``."""
        self.inputs = []
        logits = self.model(x)
        bn = torch.zeros(len(x), device=x.device)
        for m, h in self.inputs:
            assert m.running_mean is not None and m.running_var is not None
            bn = bn + bn_statistic_loss(h.float(), m.running_mean, m.running_var)
        self.inputs = []
        return logits.float(), bn


def guidance_loss(
    logits: torch.Tensor,
    bn: torch.Tensor,
    y: torch.Tensor,
    bn_weight: float,
    warmup: bool,
) -> torch.Tensor:
    """Per image: ``CE(logits, y) + bn_weight * bn``; in the warm-up ``bn_weight * bn``."""
    reg = bn_weight * bn
    return reg if warmup else F.cross_entropy(logits, y, reduction="none") + reg


# ---------------------------------------------------------------- method


class FedLmg(OneShotMethod):
    name = "fedlmg"
    config = FedLmgConfig
    collect_type = "train.fedlmg"
    payload_key = P.RECORD

    @staticmethod
    def client_collect(job: ClientJob) -> ClientResult:
        return client_fedlmg.collect(job)

    def check(self, ctx: ServerContext) -> None:
        check_embedding_kind(ctx)
        if float(ctx.generator.scheduler.init_noise_sigma) != 1.0:
            raise ConfigError(
                f"method='fedlmg' predicts x0 with the variance-preserving formula; "
                f"scheduler={ctx.cfg.scheduler!r} scales the noise (sigma "
                f"{float(ctx.generator.scheduler.init_noise_sigma):.1f}); use "
                "scheduler='dpm', 'ddim' or 'ddpm'"
            )

    def _unpack(self, reply: Reply, ctx: ServerContext) -> P.ClientModel:
        return P.unpack(
            reply.tensors,
            reply.meta.get("arch"),
            channels=ctx.channels,
            num_classes=ctx.num_classes,
        )

    def validate(self, reply: Reply, ctx: ServerContext) -> None:
        self._unpack(reply, ctx)

    def _models(self, replies: list[Reply], ctx: ServerContext) -> dict[int, nn.Module]:
        models: dict[int, nn.Module] = {}
        for r in replies:
            cm = self._unpack(r, ctx)
            m = build_classifier(cm.arch, ctx.channels, ctx.num_classes)
            m.load_state_dict({k: v.float() for k, v in cm.state.items()})
            models[r.partition_id] = m.to(ctx.device).eval().requires_grad_(False)
        return models

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        out = ServerOutput()
        opts = ctx.cfg.options(FedLmgConfig)
        assert ctx.info is not None
        n = opts.fedlmg_images_per_class
        models = self._models(replies, ctx)
        # 1. One row per image: every (client, class the client has seen); over
        #    synth-budget, a weighted draw of a class's clients (a guiding model is
        #    a network, of the client's own architecture: nothing to average)
        prompts = ctx.text_encoder.encode(
            [ctx.info.class_prompt(c) for c in range(ctx.num_classes)],
            ctx.cfg.embedding,
        )
        labels, owners, weights = [], [], []
        for r in replies:
            classes = self._unpack(r, ctx).classes
            labels += classes
            owners += [r.partition_id] * len(classes)
            weights += [float(r.num_examples)] * len(classes)
        cells = torch.tensor(labels, dtype=torch.int64)
        units = CondUnits(
            prompts[cells],
            cells,
            torch.tensor(owners, dtype=torch.int64),
            torch.tensor(weights, dtype=torch.float64),
            torch.full_like(cells, n),
        )
        cond, y, o, _ = budget_rows(ctx, units, out, represent="clients").expand()
        # 2. The guidance loss: each image's own client model
        guiding = {pid: GuidingModel(m) for pid, m in models.items()}
        y_dev = y.to(ctx.device)

        def loss(images: torch.Tensor, rows: range, warmup: bool) -> torch.Tensor:
            idx = torch.arange(rows.start, rows.stop).clamp(max=len(y) - 1)
            per_image = torch.zeros(len(idx), device=images.device)
            for pid in o[idx].unique().tolist():
                mine = torch.nonzero(o[idx] == pid).flatten().to(images.device)
                logits, bn = guiding[pid](images[mine].float())
                per_image = per_image.index_put(
                    (mine,),
                    guidance_loss(
                        logits,
                        bn,
                        y_dev[idx.to(y_dev.device)][mine],
                        opts.fedlmg_bn_weight,
                        warmup,
                    ),
                )
            return per_image

        guide = LatentGuidance(
            loss,
            step=opts.fedlmg_guidance_step,
            warmup=opts.fedlmg_warmup_steps,
            until=opts.fedlmg_guided_fraction,
            normalize=opts.fedlmg_guidance_norm == "rms",
        )
        images = synthesize_set(
            ctx,
            cond,
            y,
            o,
            out,
            desc="synthesize (model-guided)",
            latent_guidance=guide,
            source="fedlmg:guided",
        )
        # 3. Soft labels for md / sd, then the global model
        soft, agree = self._teacher(models, images, y, o, opts.fedlmg_aggregation, ctx)
        train_global(ctx, images, y, out, soft_targets=soft)
        out.extra["num_synthetic"] = len(y)
        out.extra["fedlmg"] = {
            "aggregation": opts.fedlmg_aggregation,
            "client_archs": {r.partition_id: r.meta.get("arch") for r in replies},
            # how often the guiding client model classifies its images as the label
            "guiding_model_agreement": agree,
        }
        return out

    @torch.no_grad()
    def _teacher(
        self,
        models: dict[int, nn.Module],
        images: torch.Tensor,
        labels: torch.Tensor,
        owners: torch.Tensor,
        how: str,
        ctx: ServerContext,
    ) -> tuple[torch.Tensor | None, float]:
        """Soft labels for ``md`` (the averaged ensemble) or ``sd`` (each image's
        guiding model; ``ft``: none), and how often the guiding model agrees with
        the label."""
        x = images.float() / 127.5 - 1.0
        own = torch.zeros(len(x), ctx.num_classes)
        ens = torch.zeros(len(x), ctx.num_classes)
        for s in range(0, len(x), 512):
            xb = x[s : s + 512].to(ctx.device)
            probs = {
                pid: F.softmax(m(xb).float(), dim=1).cpu() for pid, m in models.items()
            }
            ens[s : s + 512] = torch.stack(list(probs.values())).mean(0)
            for pid, p in probs.items():
                mine = owners[s : s + 512] == pid
                own[s : s + 512][mine] = p[mine]
        agree = float((own.argmax(1) == labels).float().mean()) if len(x) else 0.0
        return {"ft": None, "md": ens, "sd": own}[how], agree
