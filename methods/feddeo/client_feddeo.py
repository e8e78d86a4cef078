"""FedDEO's client work, free of Flower: learn one description per class of the
client's data with the diffusion noise-prediction loss of the frozen generator,
and upload the descriptions.

Real work on the client, as in the paper: a UNet forward and backward pass per
image (``feddeo-epochs`` passes over the data, ``feddeo-batch-size`` images per
step); only the description (the conditioning, ``[1, L, D]``) gets gradients.
``client-s`` and ``client-s-per-image`` measure it. With the privacy guard
(``dp-epsilon`` > 0) each description is released with Gaussian noise around its
class prompt's embedding (``learn_descriptions``), and the losses before / after
stay on the client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from common import dp
from common.diffusion import descend, diffusion_loss

from ..base import ClientJob, ClientResult
from . import payload_feddeo as P
from .config_feddeo import FedDeoConfig

# dp-epsilon > 0 makes all it uploads (epsilon, delta)-DP (OneShotMethod.private_uploads)
PRIVATE_UPLOADS = True

EVAL_IMAGES = 64  # images per class the loss before / after is measured on


@dataclass
class ClassFit:
    """One class's fitted description and its diffusion loss before and after
    the fit."""

    description: torch.Tensor  # [1, L, D]
    loss_before: float  # on fixed (image, t, noise) draws
    loss_after: float
    steps: int


def to_generator_input(gen: Any, images: torch.Tensor) -> torch.Tensor:
    """Images in ``[-1, 1]`` -> what the UNet denoises, at the side it samples at
    (latents for latent diffusion): the descriptions are learned at the
    resolution the server samples them at."""
    side = int(gen.unet.config.sample_size)
    if gen.vae is not None:
        side *= 2 ** (len(gen.vae.config.block_out_channels) - 1)
    x = images.float()
    if x.shape[-1] != side:
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
    return gen.encode(x)


def fit_description(
    unet: Any,
    scheduler: Any,
    x0: torch.Tensor,
    init: torch.Tensor,
    *,
    optimizer: str,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
) -> ClassFit:
    """Optimise one description ``[1, L, D]`` from ``init`` on one class's images
    ``x0`` (what the UNet denoises); the UNet's weights are not touched.

    Every step draws ``t ~ U{0, ..., T-1}`` and ``noise ~ N(0, I)`` per image on
    the CPU from ``seed``. The loss before and after is measured on the same
    fixed draws for up to ``EVAL_IMAGES`` images.
    """
    # 1. Check inputs
    if x0.ndim != 4 or len(x0) == 0:
        raise ValueError(f"images have shape {tuple(x0.shape)}; expected [N, C, H, W]")
    if init.ndim != 3 or len(init) != 1 or not torch.isfinite(init).all():
        raise ValueError(
            f"init has shape {tuple(init.shape)}; expected one finite [1, L, D]"
        )
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"scheduler prediction_type={prediction_type!r} is not supported; "
            "use a generator trained with 'epsilon' or 'v_prediction'"
        )
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    num_t = int(scheduler.config.num_train_timesteps)
    g = torch.Generator().manual_seed(seed)
    x0 = x0.to(device, dtype)

    # 2. Fixed draws for the loss before / after
    ev = x0[:EVAL_IMAGES]
    ev_t = torch.randint(0, num_t, (len(ev),), generator=g).to(device)
    ev_noise = torch.randn(ev.shape, generator=g).to(device, dtype)

    def eval_loss(c: torch.Tensor) -> float:
        with torch.no_grad():
            return float(
                diffusion_loss(unet, scheduler, ev, c.to(dtype), ev_t, ev_noise)
            )

    # 3. The description is the only parameter (float32, even on a half UNet)
    desc = init.detach().to(device, torch.float32).clone().requires_grad_(True)
    before = eval_loss(desc)
    opt: torch.optim.Optimizer = (
        torch.optim.SGD([desc], lr=lr)
        if optimizer == "sgd"
        else torch.optim.Adam([desc], lr=lr)
    )

    # 4. Training loop: epochs over the class's images in a random order
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(x0), generator=g)
        for i in range(0, len(x0), batch_size):
            idx = order[i : i + batch_size]
            t = torch.randint(0, num_t, (len(idx),), generator=g).to(device)
            noise = torch.randn((len(idx), *x0.shape[1:]), generator=g)
            loss = diffusion_loss(
                unet,
                scheduler,
                x0[idx.to(device)],
                desc.to(dtype),
                t,
                noise.to(device, dtype),
            )
            steps += 1
            descend(
                opt,
                loss,
                step=steps,
                what="description training",
                lr_key="feddeo-learning-rate",
                lr=lr,
            )
    desc = desc.detach()
    return ClassFit(desc.cpu(), before, eval_loss(desc), steps)


def learn_descriptions(job: ClientJob) -> tuple[P.Descriptions, dict[str, float]]:
    """One description per class of the client's training data, and the
    metrics of the fit (image-weighted means over the classes).

    With the privacy guard (dp-epsilon > 0) each description is released by
    output perturbation around its class prompt's embedding (public):
    ``init + clip(desc - init, dp-clip) + N(0, sigma^2 I)``, ``Delta = 2 dp-clip``
    whatever the class's images did (``common.dp.private_vector``); classes are
    disjoint. The losses before / after, computed on the images, are then not
    sent; the distance is that of the released descriptions."""
    from common.generator import load_generator
    from common.text_encoder import load_text_encoder

    cfg, opts = job.cfg, job.cfg.options(FedDeoConfig)
    data = job.data
    # the generator's own training scheduler adds the noise
    gen = load_generator(cfg.generator, "default")
    gen.unet.requires_grad_(False).eval()
    encoder = load_text_encoder(cfg.text_encoder)
    classes = data.train_labels.unique().tolist()
    prompts = [data.info.class_prompt(c) for c in classes]
    inits = encoder.encode(prompts, cfg.embedding)  # [K, L, D]
    x_all = to_generator_input(gen, data.train_images)
    fits: list[ClassFit] = []
    counts: list[int] = []
    t0 = time.perf_counter()
    for k, c in enumerate(classes):
        x0 = x_all[data.train_labels == c]
        fits.append(
            fit_description(
                gen.unet,
                gen.scheduler,
                x0,
                inits[k : k + 1],
                optimizer=opts.feddeo_optimizer,
                lr=opts.feddeo_learning_rate,
                epochs=opts.feddeo_epochs,
                batch_size=opts.feddeo_batch_size,
                seed=job.seed * 1000 + c,
            )
        )
        counts.append(min(len(x0), EVAL_IMAGES))
    train_s = time.perf_counter() - t0
    desc = torch.cat([f.description for f in fits])
    mu = dp.budget_mu(cfg.dp_epsilon, cfg.dp_delta)
    private: dict[str, float] = {}
    if mu > 0:
        released = [
            dp.private_vector(d, i, mu=mu, clip=cfg.dp_clip)
            for d, i in zip(desc, inits.to(desc.dtype), strict=True)
        ]
        desc = torch.stack([r for r, _ in released]).to(desc.dtype)
        private = dp.spent_metrics(mu, cfg.dp_delta, max(s for _, s in released))
    w = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    dist = (desc - inits).flatten(1).norm(dim=1).double()
    metrics = {
        "feddeo-loss-before": float(
            sum(w * torch.tensor([f.loss_before for f in fits]))
        ),
        "feddeo-loss-after": float(sum(w * torch.tensor([f.loss_after for f in fits]))),
        "feddeo-distance": float((w * dist).sum()),
        "feddeo-steps": float(sum(f.steps for f in fits)),
        "feddeo-train-s": train_s,
    }
    if private:  # the losses are statistics of the images: not released
        del metrics["feddeo-loss-before"], metrics["feddeo-loss-after"]
    metrics |= private
    return P.Descriptions(desc, torch.tensor(classes, dtype=torch.int64)), metrics


def collect(job: ClientJob) -> ClientResult:
    """Upload one learned description per class (fp16) with the class ids."""
    t0 = time.perf_counter()
    descriptions, metrics = learn_descriptions(job)
    seconds = time.perf_counter() - t0
    n = len(job.data.train_labels)
    return ClientResult(
        payload=P.layout(descriptions),
        meta={"embedding": job.cfg.embedding},
        metrics=metrics
        | {
            "num-examples": float(n),
            "client-s": seconds,
        },
        half=True,
    )
