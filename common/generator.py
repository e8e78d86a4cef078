"""The text-conditioned diffusion generator: loading and identity.

A ``Generator`` is what ``load_generator`` returns: the UNet, the scheduler it
was trained with, an optional VAE (latent diffusion, e.g. Stable Diffusion) and
how it is conditioned. Sampling is the synthesis engine's job
(``common.synthesis``), not the loader's.

``conditioning.json`` says how the generator is conditioned: ``{"embedding":
"pooled"}`` means one token per prompt, the L2-normalised projected CLIP text
embedding; Stable Diffusion checkpoints (no such file) need ``"sequence"``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .weights import EMBEDDED, load_pretrained, resolve_model

SCHEDULERS = ("ddim", "ddpm", "dpm", "euler", "default")


@dataclass
class Generator:
    """A text-conditioned diffusion model (pixel space, or latent with a VAE)."""

    unet: Any
    scheduler: Any
    vae: Any | None
    embedding: str
    name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    path: str = ""  # what from_pretrained was given (workers rebuild from it)

    @property
    def cond_dim(self) -> int:
        """Width of the conditioning the UNet attends to (``cross_attention_dim``)."""
        return int(self.unet.config.cross_attention_dim)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of what the UNet denoises (latents for latent diffusion)."""
        c = self.unet.config
        return int(c.in_channels), int(c.sample_size), int(c.sample_size)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Images in ``[-1, 1]`` -> the space the UNet denoises (identity in pixel
        space; ``z = E(x) * scaling_factor`` for latent diffusion, Rombach et al.)."""
        if self.vae is None:
            return images
        out = []
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(self.device, self.dtype)
            if x.shape[1] != self.vae.config.in_channels:
                x = x.mean(1, keepdim=True).expand(
                    -1, self.vae.config.in_channels, -1, -1
                )
            z = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
            out.append(z.float().cpu())
        return torch.cat(out)

    def fingerprint(self) -> str:
        """A digest of the UNet's weights (``generator_fingerprint``)."""
        return generator_fingerprint(self.unet)


def make_scheduler(base: Any, name: str) -> Any:
    """A sampling scheduler built from the checkpoint's training scheduler config."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
    )

    table = {
        "ddim": DDIMScheduler,
        "ddpm": DDPMScheduler,
        "dpm": DPMSolverMultistepScheduler,
        "euler": EulerDiscreteScheduler,
    }
    if name == "default":
        return base
    if name not in table:
        raise ValueError(f"scheduler={name!r} is not one of {', '.join(SCHEDULERS)}")
    return table[name].from_config(base.config)


def load_generator(
    name: str = EMBEDDED,
    scheduler: str = "ddim",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Generator:
    """Load ``unet/``, ``scheduler/`` and (if present) ``vae/`` of a diffusers folder/hub id."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    path = resolve_model(name, "generator", "generator")
    # load in the target dtype (casting a loaded model with .to(dtype) is what
    # diffusers warns about for modules kept in float32)
    unet = load_pretrained(
        UNet2DConditionModel, path, "generator", subfolder="unet", torch_dtype=dtype
    )
    base = load_pretrained(DDPMScheduler, path, "generator", subfolder="scheduler")
    vae = None
    local = Path(path)
    has_vae = (local / "vae").is_dir() if local.exists() else True
    if has_vae:
        vae = (
            load_pretrained(
                AutoencoderKL, path, "generator", subfolder="vae", torch_dtype=dtype
            )
            .to(device)
            .eval()
        )
    cond_file = local / "conditioning.json"
    embedding = (
        json.loads(cond_file.read_text()).get("embedding", "pooled")
        if cond_file.is_file()
        else "sequence"  # Stable Diffusion checkpoints attend to the token sequence
    )
    unet = unet.to(device).eval()
    if torch.device(device).type == "cuda":  # NHWC convolutions on tensor cores
        unet = unet.to(memory_format=torch.channels_last)
    return Generator(
        unet=unet,
        scheduler=make_scheduler(base, scheduler),
        vae=vae,
        embedding=embedding,
        name=name,
        device=torch.device(device),
        dtype=dtype,
        path=path,
    )


def load_decoder(
    name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """A tiny latent decoder (diffusers ``AutoencoderTiny``, TAESD) for few-step
    sampling, where the full VAE decoder dominates the time."""
    from diffusers import AutoencoderTiny

    path = resolve_model(name, "decoder", "decoder")
    return (
        load_pretrained(AutoencoderTiny, path, "decoder", torch_dtype=dtype)
        .to(device)
        .eval()
    )


def generator_fingerprint(unet: Any) -> str:
    """Identity of a base generator: its config, parameter shapes and a weight checksum.

    An adapter trained on another base model carries another fingerprint.
    """
    h = hashlib.sha256(
        json.dumps(dict(unet.config), sort_keys=True, default=str).encode()
    )
    for name, p in unet.named_parameters():
        if "lora_" in name:
            continue
        h.update(f"{name}:{tuple(p.shape)}".encode())
    first = next(p for n, p in unet.named_parameters() if "lora_" not in n)
    h.update(f"{float(first.detach().double().abs().sum()):.6e}".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------- building (pretraining, tests)


def build_generator(
    *,
    image_size: int = 16,
    channels: int = 1,
    cond_dim: int = 64,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    attention_head_dim: int = 8,
    num_train_timesteps: int = 1000,
) -> tuple[Any, Any]:
    """A pixel-space text-conditioned UNet + DDPM scheduler (random weights)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    n = len(block_out_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    unet = UNet2DConditionModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cond_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=8,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
    )
    return unet, scheduler


def save_generator(
    path: str | Path, unet: Any, scheduler: Any, embedding: str = "pooled"
) -> None:
    """Save in the diffusers folder layout (``unet/``, ``scheduler/``) + conditioning."""
    path = Path(path)
    unet.save_pretrained(path / "unet")
    scheduler.save_pretrained(path / "scheduler")
    (path / "conditioning.json").write_text(
        json.dumps({"embedding": embedding}, indent=2)
    )
