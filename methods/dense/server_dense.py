"""DENSE (Zhang et al., "DENSE: Data-Free One-Shot Federated Learning", NeurIPS
2022, arXiv 2112.12371; code zj-jayzhang/DENSE): ensemble distillation through
a generator, with no data on the server.

Clients train the shared initial classifier once and upload it (one-shot FedAvg's
client, payload and collection: ``Dense`` subclasses ``FedAvg``). The server holds
the ensemble ``f_E(x) = mean_k f_k(x)`` of the client models' logits and a student
``f_S`` (the global model), and for ``train-epochs`` epochs alternates:

1. data generation: a generator ``G`` (re-initialised every epoch) and its
   latents ``z`` take ``dense-g-steps`` Adam steps on (paper eq. 4-7)
   ``L_G = bn · Σ_l (‖μ_l(x) − μ_l^BN‖₂ + ‖σ²_l(x) − σ²_l^BN‖₂)``
   ``      + oh · CE(f_E(x), y)``
   ``      − adv · mean_i 1[argmax f_S(x_i) ≠ argmax f_E(x_i)] · KL(f_E(x_i) ‖ f_S(x_i))``
   with ``x = G(z)`` (randomly shifted), ``y`` labels drawn uniformly, the sum
   over every BatchNorm layer of every client model (batch statistics of the
   layer's input against its running statistics); the batch of the step with the
   lowest ``L_G`` joins the pool;
2. model distillation: one pass over the pool (every batch so far), SGD on
   ``T² · KL(softmax(f_E(x)/T) ‖ softmax(f_S(x)/T))`` (paper eq. 8).

Deviations from the paper's code, for 16-px images on a 2-core CPU (the quick
accuracy bench: 4 clients, ``cnn``; the server work must stay under a minute):

* schedule: ``train-epochs`` (15) epochs instead of 200, ``dense-g-steps`` 20
  instead of 30, ``dense-synthesis-batch-size`` 128 instead of 256, a generator
  of width ``dense-ngf`` 32 instead of 64 (it costs more than the four client
  CNNs at width 64); the pool ends at 1,920 images instead of 51,200;
* augmentation: per-sample random shifts of up to 1/8 of the side (2 px at 16 px,
  the code's 4-px crop padding at 32 px) with replicated borders, and no
  horizontal flips (the code flips in both phases; digits are not mirror
  symmetric and the clients trained without flips); distillation batches get the
  project's shift augmentation (``common.train.augment``);
* the student is in eval mode while the generator trains (the code leaves it in
  train mode, so its BN running statistics also see every intermediate batch);
* the pool is kept in memory as uint8 (the code writes PNGs: the same 8-bit
  quantisation); the generator's sigmoid output is mapped to ``[-1, 1]``, the
  classifiers' input range; a side that is not a multiple of 4 is generated at
  the next multiple and cropped;
* no checkpoint selection on the test set (the code keeps the student with the
  best test accuracy): the last student is pushed; the student starts from the
  clients' initial weights (the code draws a fresh model);
* every random draw (labels, latents, initialisation, shifts) is seeded.

On a CUDA server the forward passes run under autocast in ``ctx.dtype`` (the
run's ``precision``); the statistics and losses are computed in fp32.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from logging import INFO
from typing import Any

import torch
import torch.nn.functional as F
from flwr.common.logger import log
from torch import nn

# DENSE's BN term is the batch one, the code's DeepInversionHook (shared with FedLMG)
from common.bn_statistics import BNStatistics, bn_statistic_loss  # noqa: F401
from common.contract import PayloadError, Reply
from common.models import classifier_from_state
from common.synthesis import from_uint8, to_uint8
from common.train import augment

from ..base import ServerContext, ServerOutput
from ..fedavg.server_fedavg import FedAvg
from ..steps import keep_samples
from .config_dense import DenseConfig

# ---------------------------------------------------------------- maths (pure)


def kl_per_sample(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` per row ``[N]`` (the code's kldiv)."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1)
    return kl * (t * t)


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The distillation loss: ``kl_per_sample`` averaged over the batch."""
    return kl_per_sample(student_logits, teacher_logits, temperature).mean()


def adversarial_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    """``−mean_i 1[argmax s_i ≠ argmax t_i] · KL(t_i ‖ s_i)`` (T = 1): minimising
    it drives the generator to images where student and ensemble disagree."""
    mask = (student_logits.argmax(1) != teacher_logits.argmax(1)).float()
    return -(kl_per_sample(student_logits, teacher_logits) * mask).mean()


def ensemble_logits(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The unweighted mean of the models' logits (the code's Ensemble_A)."""
    return torch.stack([m(x).float() for m in models]).mean(0)


# The ensemble's logits of a batch, ``f_E(x)``: DENSE's is ``ensemble_logits`` over
# the client models; a method built on DENSE (FedHydra) passes its own aggregation.
# It must run every client model once per call (the BN-statistic hooks sum per run).
Teacher = Callable[[torch.Tensor], torch.Tensor]


def _teacher(teachers: Sequence[nn.Module], teacher: Teacher | None) -> Teacher:
    """``teacher``, or DENSE's mean of the ``teachers``' logits."""
    if teacher is not None:
        return teacher
    return lambda x: ensemble_logits(teachers, x)


def random_shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift every image by its own offset of up to 1/8 of the side (replicated
    borders): the code's per-sample random crop after padding."""
    n, _, h, w = x.shape
    pad = max(1, w // 8)
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=g).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [N, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [N, W]
    batch = torch.arange(n, device=x.device)[:, None, None]
    return xp[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


# ---------------------------------------------------------------- the generator


class Generator(nn.Module):
    """The code's generator (models/generator.py, after DAFL): ``z`` -> linear ->
    ``[2 ngf, s/4, s/4]`` -> BN -> (upsample x2, 3x3 conv, BN, LeakyReLU 0.2) twice
    (``2 ngf`` then ``ngf`` channels) -> 3x3 conv -> sigmoid, here mapped to
    ``[-1, 1]``. ``s`` is ``size`` rounded up to a multiple of 4, then cropped."""

    def __init__(self, nz: int, ngf: int, size: int, channels: int):
        super().__init__()
        self.size = size
        self.init = math.ceil(size / 4)
        self.l1 = nn.Linear(nz, 2 * ngf * self.init**2)
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, channels, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``z`` ``[n, nz]`` -> images ``[n, channels, size, size]`` in
        ``[-1, 1]``."""
        x = self.blocks(self.l1(z).view(len(z), -1, self.init, self.init))
        return x[..., : self.size, : self.size] * 2.0 - 1.0


def reset_generator(gen: nn.Module, g: torch.Generator) -> None:
    """The code's reset_model: weights N(0, 0.02), BN scales N(1, 0.02), biases 0."""
    for m in gen.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02, generator=g)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02, generator=g)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()


# ---------------------------------------------------------------- the two phases


@dataclass
class DenseSettings:
    """What the two phases need: DENSE's keys plus the shared ones it uses."""

    epochs: int
    g_steps: int
    batch: int
    lr_g: float
    nz: int
    ngf: int
    bn: float
    oh: float
    adv: float
    temperature: float
    lr: float
    kd_batch: int
    seed: int

    @classmethod
    def of(cls, ctx: ServerContext) -> DenseSettings:
        """The settings of a run (its validated config)."""
        o, cfg = ctx.cfg.options(DenseConfig), ctx.cfg
        return cls(
            epochs=cfg.train_epochs,
            g_steps=o.dense_g_steps,
            batch=o.dense_synthesis_batch_size,
            lr_g=o.dense_lr_g,
            nz=o.dense_nz,
            ngf=o.dense_ngf,
            bn=o.dense_bn,
            oh=o.dense_oh,
            adv=o.dense_adv,
            temperature=o.dense_temperature,
            lr=o.dense_lr,
            kd_batch=cfg.train_batch_size,
            seed=cfg.seed,
        )


def _autocast(device: torch.device, dtype: torch.dtype) -> Any:
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def synthesize_batch(
    gen: Generator,
    teachers: Sequence[nn.Module],
    student: nn.Module,
    labels: torch.Tensor,
    s: DenseSettings,
    g: torch.Generator,
    dtype: torch.dtype = torch.float32,
    teacher: Teacher | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Phase 1 of one epoch: train a freshly initialised ``gen`` and its latents on
    ``L_G``; returns the batch with the lowest ``L_G`` (float, ``[-1, 1]``) and
    its terms. ``teacher``: ``f_E`` (default: ``ensemble_logits`` of ``teachers``,
    whose BN layers give the BN-statistic term either way)."""
    device = labels.device
    f_e = _teacher(teachers, teacher)
    reset_generator(gen, g)
    gen.train()
    z = torch.randn(len(labels), s.nz, generator=g).to(device).requires_grad_()
    opt = torch.optim.Adam([*gen.parameters(), z], lr=s.lr_g, betas=(0.5, 0.999))
    student.eval()
    best: torch.Tensor | None = None
    terms: dict[str, float] = {"loss": math.inf}
    hooks = BNStatistics(teachers)
    try:
        for _ in range(s.g_steps):
            x = gen(z)
            view = random_shift(x, g)
            with _autocast(device, dtype):
                t_out = f_e(view)
                s_out = student(view).float()
            loss_bn = hooks.pop().to(device)
            loss_oh = F.cross_entropy(t_out, labels)
            loss_adv = adversarial_loss(s_out, t_out)
            loss = s.bn * loss_bn + s.oh * loss_oh + s.adv * loss_adv
            if best is None or loss.item() < terms["loss"]:
                best = x.detach().clone()
                terms = {
                    "loss": loss.item(),
                    "bn": loss_bn.item(),
                    "oh": loss_oh.item(),
                    "adv": loss_adv.item(),
                }
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        hooks.remove()
    assert best is not None
    return best, terms


def distill_epoch(
    student: nn.Module,
    teachers: Sequence[nn.Module],
    pool: torch.Tensor,
    opt: torch.optim.Optimizer,
    s: DenseSettings,
    g: torch.Generator,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    teacher: Teacher | None = None,
) -> tuple[float, int, float]:
    """Phase 2 of one epoch: one shuffled pass over the uint8 ``pool``;
    returns ``(mean loss, steps, student-ensemble agreement)``. ``teacher`` as
    in ``synthesize_batch``."""
    f_e = _teacher(teachers, teacher)
    student.train()
    perm = torch.randperm(len(pool), generator=g)
    total, agree, steps = 0.0, 0, 0
    for i in range(0, len(pool), s.kd_batch):
        x = from_uint8(pool[perm[i : i + s.kd_batch]].to(device))
        x = augment(x, g)
        with torch.no_grad(), _autocast(device, dtype):
            t_out = f_e(x)
        with _autocast(device, dtype):
            s_out = student(x).float()
        loss = distillation_loss(s_out, t_out, s.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(x)
        agree += int((s_out.argmax(1) == t_out.argmax(1)).sum())
        steps += 1
    return total / len(pool), steps, agree / len(pool)


def run_dense(
    teachers: Sequence[nn.Module],
    student: nn.Module,
    num_classes: int,
    channels: int,
    size: int,
    s: DenseSettings,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    teacher: Teacher | None = None,
    name: str = "DENSE",
) -> dict[str, Any]:
    """Both phases for ``s.epochs`` epochs; the student is trained in place.

    ``teacher`` is ``f_E``, the ensemble's logits of a batch (default: DENSE's
    mean of the ``teachers``' logits); the BN-statistic term is over the
    ``teachers`` either way. ``name`` heads the per-epoch log line. Returns the pool (uint8), its labels, the seconds of
    each phase and DENSE's numbers for results.json.
    """
    # 1. Check inputs
    if not teachers:
        raise ValueError("run_dense: no client models (teachers)")
    if num_classes < 1:
        raise ValueError(f"run_dense: num_classes={num_classes}, expected >= 1")
    # 2. The ensemble (frozen), the student and the generator, all seeded
    device = torch.device(device)
    g = torch.Generator().manual_seed(s.seed)
    for t in teachers:
        t.to(device).eval().requires_grad_(False)
    student.to(device)
    gen = Generator(s.nz, s.ngf, size, channels).to(device)
    opt = torch.optim.SGD(student.parameters(), lr=s.lr, momentum=0.9)
    pool, pool_labels = [], []
    seconds = {"synthesize": 0.0, "train": 0.0}
    kd_loss, kd_steps, agreement = math.nan, 0, math.nan
    terms: dict[str, float] = {}
    for epoch in range(s.epochs):
        # 3. Data generation: one batch against the ensemble and the current student
        t0 = time.perf_counter()
        labels = torch.randint(0, num_classes, (s.batch,), generator=g).to(device)
        student.requires_grad_(False)
        x, terms = synthesize_batch(
            gen, teachers, student, labels, s, g, dtype, teacher
        )
        student.requires_grad_(True)
        pool.append(to_uint8(x).cpu())  # the 8-bit quantisation of the code's PNGs
        pool_labels.append(labels.cpu())
        seconds["synthesize"] += time.perf_counter() - t0
        # 4. Model distillation: one pass over every batch so far
        t0 = time.perf_counter()
        kd_loss, steps, agreement = distill_epoch(
            student, teachers, torch.cat(pool), opt, s, g, device, dtype, teacher
        )
        kd_steps += steps
        seconds["train"] += time.perf_counter() - t0
        log(
            INFO,
            "%s epoch %d/%d: L_G %.3f (bn %.3f, oh %.3f, adv %.3f), KD %.4f, agreement %.3f",
            name,
            epoch + 1,
            s.epochs,
            terms["loss"],
            terms["bn"],
            terms["oh"],
            terms["adv"],
            kd_loss,
            agreement,
        )
    student.eval()
    return {
        "images": torch.cat(pool),
        "labels": torch.cat(pool_labels),
        "seconds": seconds,
        "numbers": {
            "teachers": len(teachers),
            "epochs": s.epochs,
            "generator_iterations": s.epochs * s.g_steps,
            "synthesis_batch_size": s.batch,
            "distill_steps": kd_steps,
            "final_losses": {
                "generator": round(terms["loss"], 4),
                "bn": round(terms["bn"], 4),
                "oh": round(terms["oh"], 4),
                "adv": round(terms["adv"], 4),
                "distill": round(kd_loss, 4),
            },
            # argmax agreement of student and ensemble in the last distillation pass
            "agreement": round(agreement, 4),
        },
    }


# ---------------------------------------------------------------- the method


def _check_running_var(tensors: dict[str, torch.Tensor]) -> None:
    """BN running variances are variances: a negative one is no trained model."""
    for k, v in tensors.items():
        if k.endswith("running_var") and bool((v < 0).any()):
            raise PayloadError(f"model tensor {k!r} has negative variances")


class Dense(FedAvg, config=DenseConfig):
    """One-shot FedAvg's client work, message, payload and collection (the
    initial weights go down, a client's trained classifier comes up); DENSE's
    server work instead of the average."""

    def validate(self, reply: Reply, ctx: ServerContext) -> None:
        """FedAvg's check against the initial weights, and refuse negative BN
        running variances."""
        super().validate(reply, ctx)
        _check_running_var(reply.tensors)

    def client_models(
        self, replies: list[Reply], ctx: ServerContext
    ) -> list[nn.Module]:
        """The ensemble's members: each reply's classifier (validated against the
        initial weights: the run's ``classifier``)."""
        models = []
        for r in replies:
            model = classifier_from_state(
                ctx.cfg.classifier, r.tensors, ctx.channels, ctx.num_classes
            )
            models.append(model)
        return models

    def ensemble(
        self, models: list[nn.Module], replies: list[Reply], ctx: ServerContext
    ) -> tuple[Teacher | None, dict[str, Any]]:
        """``f_E`` and its entries of results.json: DENSE's is the mean of the
        models' logits (``None``: ``run_dense``'s default) and adds none."""
        return None, {}

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """Distil the ensemble of the client models into a student started from the
        initial weights, on images a generator synthesizes from that ensemble (DENSE's
        two phases, ``run_dense``); the student is the global classifier."""
        cfg = ctx.cfg
        s = DenseSettings.of(ctx)
        # 1. The client models: the ensemble the student learns from
        teachers = self.client_models(replies, ctx)
        teacher, numbers = self.ensemble(teachers, replies, ctx)
        student = classifier_from_state(
            cfg.classifier, self.reference_state(ctx), ctx.channels, ctx.num_classes
        )
        log(
            INFO,
            "%s: %d client models, %d epochs of %d generator steps on "
            "%d images, then distillation, on %s (%s)",
            self.name,
            len(teachers),
            s.epochs,
            s.g_steps,
            s.batch,
            ctx.device,
            ctx.dtype,
        )
        # 2. Generation and distillation, alternating
        res = run_dense(
            teachers,
            student,
            ctx.num_classes,
            ctx.channels,
            cfg.image_size,
            s,
            device=ctx.device,
            dtype=ctx.dtype,
            teacher=teacher,
            name=self.name,
        )
        # 3. The global model, a few images per class for the grid, the numbers
        out = ServerOutput(
            model_state={k: v.detach().cpu() for k, v in student.state_dict().items()},
            arch=cfg.classifier,
            timings=dict(res["seconds"]),
        )
        labels = res["labels"]
        keep_samples(out, res["images"], labels, torch.full_like(labels, -1))
        out.extra["num_synthetic"] = len(labels)
        out.extra["dense"] = res["numbers"]
        out.extra |= numbers
        return out
