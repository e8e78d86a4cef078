"""FedBiP's client work, free of Flower: bi-level personalization of the frozen
generator on the client's data, then the upload.

1. Concept level: a domain token (shared by the client's classes) and one token
   per class, the input embeddings at the two slots of the prompt
   (``concepts_fedbip``), initialised from the words of the client's domain and
   class names and optimised with Adam on the diffusion noise-prediction loss
   of the frozen generator (``common.diffusion.diffusion_loss``):
   ``fedbip-concept-steps`` steps of ``fedbip-concept-batch-size`` images, a forward and a
   backward pass of the UNet and the text tower each.
2. Instance level: up to ``fedbip-instances-per-class`` images per class, mapped
   into the space the generator denoises (the VAE's latents, or the image
   itself in pixel space) and noised forward to the timestep the server's
   sampler starts at (``fedbip-strength``), with noise only the client can draw
   (``maths_fedbip.private_rng``).

``client-s`` and ``client-s-per-image`` (over the client's training images) in
the metrics measure both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from common.diffusion import descend, diffusion_loss
from common.optim import AdamW
from common.synthesis_settings import SynthesisSettings
from common.synthesis_start import alpha_bar, start_timestep

from ..base import ClientJob, ClientResult
from ..feddeo.client_feddeo import EVAL_IMAGES, to_generator_input
from . import payload_fedbip as P
from .concepts_fedbip import (
    ConceptPrompt,
    concept_prompt,
    encode_with_concepts,
    token_table,
    word_token,
)
from .config_fedbip import FedBiPConfig
from .maths_fedbip import forward_noise, private_rng, standard_normal


@dataclass
class ConceptFit:
    """The fitted domain token ``[1, H]`` and class tokens ``[K, H]``, with the
    diffusion loss before and after the fit on fixed draws."""

    domain: torch.Tensor
    classes: torch.Tensor
    loss_before: float
    loss_after: float
    steps: int


def fit_concepts(
    gen: Any,
    encoder: Any,
    prompt: ConceptPrompt,
    x0: torch.Tensor,
    rows: torch.Tensor,
    domain: torch.Tensor,
    classes: torch.Tensor,
    *,
    kind: str,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> ConceptFit:
    """Optimise the domain token ``[1, H]`` and the class tokens ``[K, H]`` from
    their initial values on ``x0`` ``[N, ...]`` (what the UNet denoises), image
    ``n`` conditioned on the prompt with the domain token and class token
    ``rows[n]``; the UNet and the text tower are not touched.

    Every step draws a batch, ``t ~ U{0, ..., T-1}`` and ``noise ~ N(0, I)`` on
    the CPU from ``seed`` (Adam, as the code). The loss before and after is
    measured on the same fixed draws for up to ``EVAL_IMAGES`` images.
    """
    # 1. Check inputs
    if x0.ndim != 4 or len(x0) == 0 or rows.shape != (len(x0),):
        raise ValueError(
            f"images {tuple(x0.shape)} and rows {tuple(rows.shape)}: expected "
            "[N, C, H, W] with N >= 1 and one class row per image"
        )
    scheduler = gen.scheduler
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"scheduler prediction_type={scheduler.config.prediction_type!r} is "
            "not supported; use a generator trained with 'epsilon' or 'v_prediction'"
        )
    unet = gen.unet
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    num_t = int(scheduler.config.num_train_timesteps)
    g = torch.Generator().manual_seed(seed)
    x0 = x0.to(device, dtype)

    # 2. The tokens are the only parameters (float32)
    d = domain.detach().float().clone().requires_grad_(True)
    c = classes.detach().float().clone().requires_grad_(True)

    def loss_on(idx: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> Any:
        cond = encode_with_concepts(
            encoder, prompt, d.expand(len(idx), -1), c[rows[idx]], kind
        )
        return diffusion_loss(
            unet, scheduler, x0[idx], cond.to(device, dtype), t.to(device), noise
        )

    # 3. Fixed draws for the loss before / after
    ev = torch.arange(min(len(x0), EVAL_IMAGES))
    ev_t = torch.randint(0, num_t, (len(ev),), generator=g)
    ev_noise = torch.randn((len(ev), *x0.shape[1:]), generator=g).to(device, dtype)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(loss_on(ev, ev_t, ev_noise))

    before = eval_loss()
    opt = AdamW([d, c], lr=lr, weight_decay=0.0)  # torch.optim.Adam's update

    # 4. Training loop: random batches of the client's images
    for step in range(steps):
        idx = torch.randint(0, len(x0), (min(batch_size, len(x0)),), generator=g)
        t = torch.randint(0, num_t, (len(idx),), generator=g)
        noise = torch.randn((len(idx), *x0.shape[1:]), generator=g).to(device, dtype)
        loss = loss_on(idx, t, noise)
        descend(
            opt,
            loss,
            step=step + 1,
            what="concept training",
            lr_key="fedbip-concept-lr",
            lr=lr,
        )
    return ConceptFit(d.detach().cpu(), c.detach().cpu(), before, eval_loss(), steps)


def pick_instances(
    labels: torch.Tensor, per_class: int, generator: torch.Generator
) -> torch.Tensor:
    """Indices of at most ``per_class`` images of each class, drawn without
    replacement, classes in ascending order."""
    out = []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        out.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    return torch.cat(out)


def personalize(job: ClientJob) -> tuple[P.BiLevel, int, dict[str, float]]:
    """The client's bi-level personalization: ``(upload, timestep, metrics)``."""
    from common.generator import load_generator, make_scheduler
    from common.text_encoder import load_text_encoder

    cfg, opts = job.cfg, job.cfg.options(FedBiPConfig)
    data = job.data
    # the generator's own training scheduler adds the noise
    gen = load_generator(cfg.generator, "default")
    gen.unet.requires_grad_(False).eval()
    encoder = load_text_encoder(cfg.text_encoder)
    encoder.model.requires_grad_(False)
    x_all = to_generator_input(gen, data.train_images)
    classes = data.train_labels.unique()
    rows = torch.searchsorted(classes, data.train_labels)

    # 1. Concept level: domain and class tokens from the words, then fitted
    t0 = time.perf_counter()
    token_table(encoder)  # a text tower without token embeddings fails here
    prompt = concept_prompt(encoder, data.info)
    domain0 = word_token(encoder, data.domain)[None]
    classes0 = torch.stack(
        [word_token(encoder, data.info.class_names[c]) for c in classes.tolist()]
    )
    fit = fit_concepts(
        gen,
        encoder,
        prompt,
        x_all,
        rows,
        domain0,
        classes0,
        kind=cfg.embedding,
        steps=opts.fedbip_concept_steps,
        batch_size=opts.fedbip_concept_batch_size,
        lr=opts.fedbip_concept_lr,
        seed=job.seed,
    )
    train_s = time.perf_counter() - t0

    # 2. Instance level: z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) e, e private
    sampling = make_scheduler(gen.scheduler, cfg.scheduler)
    steps = SynthesisSettings.from_config(cfg).num_inference_steps
    t = start_timestep(sampling, steps, opts.fedbip_strength)
    abar = alpha_bar(sampling, t)
    pick = pick_instances(
        data.train_labels,
        opts.fedbip_instances_per_class,
        torch.Generator().manual_seed(job.seed),
    )
    z0 = x_all[pick].float()
    noise = standard_normal(tuple(z0.shape), private_rng(data.train_images, cfg.seed))
    upload = P.BiLevel(
        forward_noise(z0, abar, noise),
        data.train_labels[pick],
        fit.domain,
        fit.classes,
        classes.to(torch.int64),
    )
    drift = (fit.classes - classes0).norm(dim=1).mean() / classes0.norm(dim=1).mean()
    metrics = {
        "fedbip-loss-before": fit.loss_before,
        "fedbip-loss-after": fit.loss_after,
        "fedbip-concept-steps": float(fit.steps),
        "fedbip-train-s": train_s,
        "fedbip-instances": float(len(pick)),
        # the share of each image left in its latent: sqrt(abar_t)
        "fedbip-signal": abar**0.5,
        "fedbip-domain-drift": float(
            (fit.domain - domain0).norm() / domain0.norm().clamp_min(1e-12)
        ),
        "fedbip-class-drift": float(drift),
    }
    return upload, t, metrics


def collect(job: ClientJob) -> ClientResult:
    """Upload the noised instance latents and the concept tokens (fp16)."""
    t0 = time.perf_counter()
    upload, t, metrics = personalize(job)
    return ClientResult(
        payload=P.layout(upload),
        meta={"embedding": job.cfg.embedding, P.TIMESTEP: t},
        metrics=metrics
        | {
            "num-examples": float(len(job.data.train_labels)),
            "client-s": time.perf_counter() - t0,
        },
        half=True,
    )
