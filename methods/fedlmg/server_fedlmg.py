"""FedLMG (Yang et al., ICML 2025, arXiv 2311.08870; code MingzhaoYang/FedCADO):
one-shot, model-heterogeneous FL with local-model-guided diffusion. Clients train
their classifier once, each in its own architecture (``classifier``,
``fedlmg-client-classifiers`` or a SuperNode's node-config ``classifier``), and
upload it with their examples per class. The server

1. makes ``images-per-class`` rows per (client, class the client has examples
   of), each conditioned on the class prompt; over ``synth-budget``, a class keeps
   a weighted draw of its clients (``budget_rows(represent="clients")``: a guiding
   model is a network of its client's architecture, there is nothing to average);
2. samples them with the run's sampler; at every guided step (the first
   ``fedlmg-guided-fraction`` of them, after ``fedlmg-warmup-steps`` BN-only moves
   at t = T) it moves the latent against the gradient of the row's own client
   model's loss on the predicted clean image, then takes the normal guided step:

       x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)         eps: the CFG-guided eps
       L      = CE(f_client(D(x0_hat)), y)
                + fedlmg-bn-weight * sum_BN (||mu - mu_run|| + ||var - var_run||)
       x_t   <- x_t - step * sqrt(1 - a_t) * g / rms(g)       g = grad_x L (``rms``)
       x_t   <- x_t - step * g                                  (``none``: the code's)

   with ``step`` = ``fedlmg-guidance-step`` (``bn_statistic_loss``,
   ``guidance_loss``; the moves run in the synthesis engine as ``LatentGuidance``);
3. trains the global model on the guided images: ``fedlmg-aggregation`` = ``ft``
   (cross-entropy), ``md`` (+ soft labels of the averaged client ensemble), ``sd``
   (+ soft labels of the client model that guided each image); results.json's
   ``fedlmg`` has the clients' architectures and how often a guiding model
   classifies its own images as their label.

Deviations from the paper's code:
* the move normalised per image to ``step`` noise standard deviations (default
  ``rms``, step 0.5) instead of the raw gradient times 1: the code's step is tuned
  to SD latents decoded by the VAE at 224 px, and a raw gradient's size changes
  with the decoder, the resolution and the client model;
* the run's sampler (default DPM-Solver++ 10 steps with the guidance cut-off)
  instead of DDPM 50; 2 warm-up moves instead of 10 (each a UNet forward and
  backward per image on the CPU); ``images-per-class`` per (client, class)
  (paper: 30), and only the classes a client has examples of (the code's clients
  each hold one domain with all classes; here labels are skewed, and a client
  model says nothing of a class it never saw), hence the uploaded class counts
  (``K`` integers);
* the BN statistics are per image (the code samples with batch size 1), so the
  images do not depend on how the engine batches them;
* the client classifiers are ordinary classifiers of the clean image (the code's
  ``ClientTune`` also takes the timestep);
* a 16-px world with the embedded pixel-space generator (no VAE to decode
  through; with a latent generator the VAE decode is in the graph, as in the
  code).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from common.bn_statistics import BNStatistics
from common.bn_statistics import bn_statistic_loss as _bn_statistic_loss
from common.config import ConfigError
from common.contract import Reply
from common.models import classifier_from_state
from common.synthesis import LatentGuidance, from_uint8

from .. import steps
from ..base import ServerContext, ServerOutput
from . import client_fedlmg
from . import payload_fedlmg as P
from .config_fedlmg import FedLmgConfig

# ---------------------------------------------------------------- maths

# DeepInversion's term over one image's positions (the code samples one image at
# a time): ``||mean_hw h_n - mu_run||_2 + ||var_hw h_n - var_run||_2``, ``[N]``
bn_statistic_loss = functools.partial(_bn_statistic_loss, per_image=True)


class GuidingModel:
    """A client classifier frozen in eval mode, with hooks on its BN layers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)
        self.bn = BNStatistics([self.model], per_image=True)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [N, K], summed BN-statistic loss [N])``."""
        self.bn.pop()  # drop what an earlier call left
        logits = self.model(x)
        bn = torch.zeros(len(x), device=x.device) + self.bn.pop()
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


class FedLmg(
    steps.SynthesisMethod, payload=P, client=client_fedlmg, config=FedLmgConfig
):
    """FedLMG: clients upload classifiers of their own architectures; each
    synthetic image is guided by the model of the client it stands for, and the
    global classifier learns the guided images."""

    def check(self, ctx: ServerContext) -> None:
        """Refuse a generator not conditioned on the run's ``embedding`` kind, or a
        scheduler that scales the initial noise (the x0 prediction assumes sigma 1)."""
        super().check(ctx)
        if float(ctx.generator.scheduler.init_noise_sigma) != 1.0:
            raise ConfigError(
                f"method='fedlmg' predicts x0 with the variance-preserving formula; "
                f"scheduler={ctx.cfg.scheduler!r} scales the noise (sigma "
                f"{float(ctx.generator.scheduler.init_noise_sigma):.1f}); use "
                "scheduler='dpm', 'ddim' or 'ddpm'"
            )

    def unpack(self, reply: Reply, ctx: ServerContext) -> P.ClientModel:
        """A reply's classifier, checked: a known meta ``arch``, a state dict and
        class counts that fit it and the classes."""
        return P.unpack(
            reply.tensors,
            reply.meta.get("arch"),
            channels=ctx.channels,
            num_classes=ctx.num_classes,
        )

    def _models(self, replies: list[Reply], ctx: ServerContext) -> dict[int, nn.Module]:
        models: dict[int, nn.Module] = {}
        for r in replies:
            cm = self.unpack(r, ctx)
            m = classifier_from_state(
                cm.arch,
                {k: v.float() for k, v in cm.state.items()},
                ctx.channels,
                ctx.num_classes,
            )
            models[r.partition_id] = m.to(ctx.device).eval().requires_grad_(False)
        return models

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """Sample ``images-per-class`` images per (client, class it has examples
        of) from the class prompt (within ``synth-budget``), each steered by its
        client's model (cross-entropy and BN-statistic loss on the predicted clean
        image); train the global classifier on them, with soft labels for ``md`` /
        ``sd``."""
        out = ServerOutput()
        opts = ctx.cfg.options(FedLmgConfig)
        assert ctx.info is not None
        n = ctx.cfg.images_per_class
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
            classes = self.unpack(r, ctx).classes
            labels += classes
            owners += [r.partition_id] * len(classes)
            weights += [float(r.num_examples)] * len(classes)
        cells = torch.tensor(labels, dtype=torch.int64)
        units = steps.CondUnits(
            prompts[cells],
            cells,
            torch.tensor(owners, dtype=torch.int64),
            torch.tensor(weights, dtype=torch.float64),
            torch.full_like(cells, n),
        )
        cond, y, o, _ = steps.budget_rows(ctx, units, out, represent="clients").expand()
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
        images = steps.synthesize_set(
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
        steps.train_global(ctx, images, y, out, soft_targets=soft)
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
        x = from_uint8(images)
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
