"""The pipeline part: the engine against diffusers' StableDiffusionPipeline."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench import report

SD15_UNET: dict[str, Any] = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
)

SD15_VAE: dict[str, Any] = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    in_channels=3,
    out_channels=3,
    scaling_factor=0.18215,
)

SD15_TEXT: dict[str, Any] = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    vocab_size=49408,
)

TINY_UNET: dict[str, Any] = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    norm_num_groups=8,
)

TINY_VAE: dict[str, Any] = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    in_channels=3,
    out_channels=3,
    norm_num_groups=8,
)

TINY_TEXT: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    vocab_size=1000,
)

H100_FLOOR_IMG_S = 18.7  # SD-1.5 512 px, 25 steps + CFG at 352 TFLOP/s (FACTS.md)


def say(msg: str) -> None:
    """One progress line of the synthesis bench."""
    report.say(msg, "bench synth")


def build_sd(
    kind: str, px: int, device: torch.device, dtype: torch.dtype
) -> tuple[Any, Any]:
    """``(Generator, StableDiffusionPipeline)`` sharing one set of random modules."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from common.generator import Generator

    unet_cfg, vae_cfg, text_cfg = (
        (SD15_UNET, SD15_VAE, SD15_TEXT)
        if kind == "sd15"
        else (TINY_UNET, TINY_VAE, TINY_TEXT)
    )
    down = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    torch.manual_seed(0)
    # torch modules (diffusers' and transformers' stubs do not say so)
    unet: Any = UNet2DConditionModel(sample_size=px // down, **unet_cfg)
    unet = unet.to(device, dtype).eval()
    vae: Any = AutoencoderKL(sample_size=px, **vae_cfg)
    vae = vae.to(device, dtype).eval()
    text: Any = CLIPTextModel(CLIPTextConfig(**text_cfg))
    text = text.to(device, dtype).eval()
    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    if device.type == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    gen = Generator(unet, sched, vae, "sequence", kind, device, dtype)
    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=None,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return gen, pipe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    """Median wall seconds of ``reps`` calls of ``fn`` after one warm-up, the
    device synchronised around each."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sd15_prompts(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random SD-1.5-shaped prompt embeddings ``[n, 77, 768]`` and one
    unconditional ``[1, 77, 768]`` (seeded)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)


def compare_pipeline(
    kind: str,
    px: int,
    batch: int,
    steps: int,
    guidance: float,
    reps: int,
    device: torch.device,
    dtype: torch.dtype,
    compile_unet: bool = False,
) -> dict[str, Any]:
    """Engine vs StableDiffusionPipeline, alternated ``reps`` times."""
    from common.synthesis import image_generators, sample
    from common.synthesis_settings import SynthesisSettings

    gen, pipe = build_sd(kind, px, device, dtype)
    tokens, dim = (77, 768) if kind == "sd15" else (16, 64)
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(batch, tokens, dim, generator=g)
    uncond = torch.randn(1, tokens, dim, generator=g)
    # the engine's per-image x_T, handed to the pipeline as its latents
    latents = torch.stack(
        [
            torch.randn(gen.sample_shape, generator=x)
            for x in image_generators(0, range(batch))
        ]
    )
    if compile_unet:
        import dataclasses

        gen = dataclasses.replace(gen, unet=torch.compile(gen.unet, dynamic=False))
    engine_bs: int | str = "auto" if device.type == "cuda" else batch

    def engine() -> torch.Tensor:
        settings = SynthesisSettings(
            guidance_scale=guidance, num_inference_steps=steps, batch_size=engine_bs
        )
        x = sample(gen, cond, uncond, **settings.kwargs())
        return (x + 1) / 2

    def diffusers_pipe() -> torch.Tensor:
        out = pipe(
            prompt_embeds=cond.to(device, dtype),
            negative_prompt_embeds=uncond.expand(batch, -1, -1).to(device, dtype),
            latents=latents.to(device, dtype),
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="pt",
        )
        return out.images.float().cpu()

    times: dict[str, list[float]] = {"engine": [], "diffusers": []}
    peaks: dict[str, int | None] = {"engine": None, "diffusers": None}
    images = {}
    for name, fn in (("engine", engine), ("diffusers", diffusers_pipe)):  # warm-up
        images[name] = fn()
    for _ in range(reps):
        for name, fn in (("engine", engine), ("diffusers", diffusers_pipe)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peaks[name] = max(
                    peaks[name] or 0, torch.cuda.max_memory_allocated(device)
                )
    img_s = {k: batch / statistics.median(v) for k, v in times.items()}
    diff = float((images["engine"] - images["diffusers"]).abs().max())
    return {
        "model": kind,
        "px": px,
        "batch": batch,
        "steps": steps,
        "guidance": guidance,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "compiled": compile_unet,
        "reps": reps,
        "engine_img_s": img_s["engine"],
        "diffusers_img_s": img_s["diffusers"],
        "ratio": img_s["engine"] / img_s["diffusers"],
        "engine_peak_gb": peaks["engine"] / 2**30 if peaks["engine"] else None,
        "diffusers_peak_gb": peaks["diffusers"] / 2**30 if peaks["diffusers"] else None,
        "max_abs_diff": diff,
    }
