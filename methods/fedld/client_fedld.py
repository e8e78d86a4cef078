"""FedLD's client work, free of Flower: map the private images into the space the
server's generator denoises and fit a Gaussian mixture per class there.

No network is trained: a latent generator (Stable Diffusion) costs one VAE
encoder pass per image (the UNet is never loaded); a pixel-space generator (the
embedded one) costs nothing but a resize.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common.config import RunConfig
from common.weights import load_pretrained, resolve_model

from ..base import ClientJob, ClientResult
from . import payload_fedld as P
from .config_fedld import FedLDConfig
from .maths_fedld import components_for, fit_gmm


@dataclass
class LatentSpace:
    """What the generator denoises: ``shape`` ``(C, H, W)`` and the VAE that
    maps images there (``None``: pixel space)."""

    shape: tuple[int, int, int]
    vae: Any | None


def latent_space(generator: str) -> LatentSpace:
    """The generator's latent shape (from the UNet's config alone) and its VAE."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = resolve_model(generator, "generator", "generator")
    try:
        unet = UNet2DConditionModel.load_config(path, subfolder="unet")
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"generator={generator!r}: no unet/config.json ({e.__class__.__name__}); "
            "FedLD's clients need the generator's configuration and VAE"
        ) from e
    shape = (
        int(unet["in_channels"]),
        int(unet["sample_size"]),
        int(unet["sample_size"]),
    )
    local = Path(path)
    has_vae = (local / "vae").is_dir() if local.exists() else True
    vae = None
    if has_vae:
        vae = load_pretrained(AutoencoderKL, path, "generator", subfolder="vae").eval()
    return LatentSpace(shape, vae)


def _as_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    return x.mean(1, keepdim=True).expand(-1, channels, -1, -1)


@torch.no_grad()
def to_latents(
    images: torch.Tensor, space: LatentSpace, batch_size: int = 64
) -> torch.Tensor:
    """Images in ``[-1, 1]`` -> ``[N, C, H, W]`` in the generator's space:
    ``z = E(x) * scaling_factor`` (the posterior mean, Rombach et al. 2022) at the
    VAE's image size, or the image itself resized for a pixel-space UNet."""
    c, h, w = space.shape
    if space.vae is None:
        x = _as_channels(images.float(), c)
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True)
        return x.clamp(-1, 1)
    vae = space.vae
    side = int(vae.config.sample_size)
    scale = float(vae.config.scaling_factor)
    out = []
    for i in range(0, len(images), batch_size):
        x = _as_channels(images[i : i + batch_size].float(), vae.config.in_channels)
        if x.shape[-1] != side:
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
        out.append(vae.encode(x).latent_dist.mean.float() * scale)
    z = torch.cat(out)
    if tuple(z.shape[1:]) != space.shape:
        raise ValueError(
            f"the VAE encodes {side}-px images to {tuple(z.shape[1:])}, but the UNet "
            f"denoises {space.shape}: the generator's vae/ and unet/ do not match"
        )
    return z


def fit_class_mixtures(
    latents: torch.Tensor, labels: torch.Tensor, opts: FedLDConfig, seed: int
) -> P.ClassMixtures:
    """One diagonal Gaussian mixture per class of at least
    ``fedld-min-per-component`` images, classes in ascending order: at most
    ``components_for`` components, refitted with one fewer while a component
    has fewer than that many images assigned (one component always has them
    all). A smaller class is withheld: no uploaded mean averages fewer images.
    """
    floor = opts.fedld_min_per_component
    ids, counts, means, variances = [], [], [], []
    shape = tuple(latents.shape[1:])
    for c in labels.unique().tolist():
        x = latents[labels == c].flatten(1)
        if len(x) < floor:
            continue
        k = components_for(len(x), opts.fedld_components, floor)
        m = fit_gmm(x, k, iters=opts.fedld_em_iters, seed=seed + c)
        while len(m.counts) > 1 and int(m.counts.min()) < floor:
            m = fit_gmm(x, len(m.counts) - 1, iters=opts.fedld_em_iters, seed=seed + c)
        ids += [c] * len(m.counts)
        counts.append(m.counts)
        means.append(m.means.reshape(-1, *shape))
        variances.append(m.variances.reshape(-1, *shape))
    if not ids:
        return P.ClassMixtures(
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, *shape),
            torch.zeros(0, *shape),
        )
    return P.ClassMixtures(
        torch.tensor(ids, dtype=torch.int64),
        torch.cat(counts),
        torch.cat(means),
        torch.cat(variances),
    )


def nearest_image_rms(means: torch.Tensor, latents: torch.Tensor) -> float:
    """The smallest root-mean-square distance between an uploaded mean and any
    private latent (0: some mean is a private image), as a multiple of the
    latents' own spread (RMS distance of a latent to their overall mean)."""
    if len(means) == 0:
        return float("nan")
    d = torch.cdist(means.flatten(1).float(), latents.flatten(1).float())
    spread = (latents - latents.mean(0)).flatten(1).pow(2).mean().sqrt()
    rms = d.min() / means[0].numel() ** 0.5
    return float(rms / spread.clamp_min(1e-12))


def collect(job: ClientJob) -> ClientResult:
    """Upload per class a Gaussian mixture of the latents (no images, no network)."""
    t0 = time.perf_counter()
    cfg: RunConfig = job.cfg
    opts = cfg.options(FedLDConfig)
    space = latent_space(cfg.generator)
    z = to_latents(job.data.train_images, space)
    encode_s = time.perf_counter() - t0
    mixtures = fit_class_mixtures(z, job.data.train_labels, opts, job.seed)
    n = len(job.data.train_labels)
    return ClientResult(
        payload=P.layout(mixtures),
        meta={"latent-shape": "x".join(map(str, space.shape))},
        metrics={
            "num-examples": float(n),
            "components": float(len(mixtures.counts)),
            # classes with fewer than fedld-min-per-component images: not uploaded
            "classes-withheld": float(
                len(job.data.train_labels.unique()) - len(mixtures.class_ids.unique())
            ),
            # how close the nearest uploaded mean comes to a private image
            "nearest-image-rms": nearest_image_rms(mixtures.means, z),
            "encode-s-per-image": encode_s / max(1, n),
            "client-s": time.perf_counter() - t0,
        },
        half=True,
    )
