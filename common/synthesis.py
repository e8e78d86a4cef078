"""The synthesis engine: a conditioning set -> images. The only sampler methods call.

Methods say *what* to sample (one conditioning row per image); the engine decides
*how*: batching and memory, precision, seeds, scheduler, guidance, workers.
Written as diffusers writes pipelines: ``check_inputs`` first, then numbered steps.

Reproducibility: image ``i`` of a call draws all its noise (the initial ``x_T``
and every stochastic scheduler step, e.g. DDPM's) from its own
``torch.Generator`` seeded by ``(seed, first_index + i)``. The images therefore do
not depend on the batch size, the batch order, an out-of-memory retry, padding
for static shapes, or how the work is split between calls and workers.

Memory: ``batch_size="auto"`` plans the denoising batch from the free device
memory with a memory model (``plan_batch``: fixed bytes + bytes per image, a
margin kept free); the decoder runs in chunks of its own size, since the VAE
decoder, not the UNet, needs most memory per image (published SD-1.5 figures:
~0.25 GB per image for the UNet with CFG, ~0.8 GB per decoded 512-px image). An
out-of-memory error halves the batch (or the decode chunk) and retries the same
images: none is lost or repeated.

Latent guidance (a loss on the predicted clean image) is in
``common.synthesis_guidance``; sampling sharded over Ray workers in
``common.synthesis_workers``.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .generator import Generator
from .synthesis_guidance import LatentGuidance, guidance_move, predicted_x0
from .synthesis_start import Start, initial_state, pad_rows

Output = Literal["images", "latents"]
# "auto" on a CPU: the fastest denoising batch measured side by side on a 2-core
# CPU (python -m bench synth --parts cpu-batch: 64 gives 1.29x the img/s of 256,
# 48 to 64 best; larger batches fall out of the caches)
CPU_AUTO_BATCH = 64
MAX_AUTO_BATCH = 256  # beyond this a GPU gains little (compute-bound already)


def image_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for image ``index`` of a run seeded ``seed``."""
    state = np.random.SeedSequence([seed & (2**63 - 1), index]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def image_generators(seed: int, indices: range) -> list[torch.Generator]:
    """One CPU generator per image (noise is drawn on the CPU, then moved)."""
    return [torch.Generator().manual_seed(image_seed(seed, i)) for i in indices]


# ---------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryModel:
    """Bytes the sampler needs: ``fixed + batch * per_image`` while denoising,
    ``fixed + chunk * decode_per_image`` while decoding."""

    fixed: int
    per_image: int
    decode_per_image: int


@dataclass(frozen=True)
class MemoryPlan:
    """A denoising batch and a decode chunk, with the reason they were chosen."""

    batch_size: int
    decode_chunk: int
    reason: str


def plan_batch(
    free_bytes: int,
    model: MemoryModel,
    margin: float = 0.15,
    max_batch: int = MAX_AUTO_BATCH,
) -> MemoryPlan:
    """The largest batch and decode chunk that fit ``free_bytes`` less ``margin``.

    Pure: ``batch = floor((free (1 - margin) - fixed) / per_image)``, clipped to
    ``[1, max_batch]``; the same for the decode chunk with ``decode_per_image``.
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin={margin} must be in [0, 1)")
    usable = free_bytes * (1 - margin) - model.fixed
    batch = int(usable // max(1, model.per_image)) if usable > 0 else 0
    chunk = int(usable // max(1, model.decode_per_image)) if usable > 0 else 0
    batch, chunk = max(1, min(batch, max_batch)), max(1, min(chunk, max_batch))
    gb = 2**30
    return MemoryPlan(
        batch,
        min(chunk, batch),
        (
            f"free {free_bytes / gb:.1f} GB, margin {margin:.0%}, fixed {model.fixed / gb:.2f} GB, "
            f"{model.per_image / gb:.3f} GB/image denoising, "
            f"{model.decode_per_image / gb:.3f} GB/image decoding"
        ),
    )


def probe_memory(
    gen: Generator, cond: torch.Tensor, uncond: torch.Tensor, guided: bool
) -> MemoryModel:
    """Measure the memory model on a CUDA device: one step at batch 1 and 2, one decode."""
    dev = gen.device
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    peaks = []
    with torch.no_grad():
        for b in (1, 2):
            torch.cuda.reset_peak_memory_stats(dev)
            x = torch.zeros(b, *gen.sample_shape, device=dev, dtype=gen.dtype)
            c = cond[:1].to(dev, gen.dtype).expand(b, -1, -1)
            ctx = (
                torch.cat([uncond[:1].to(dev, gen.dtype).expand(b, -1, -1), c])
                if guided
                else c
            )
            xin = torch.cat([x, x]) if guided else x
            gen.unet(xin, torch.tensor(999, device=dev), encoder_hidden_states=ctx)
            peaks.append(torch.cuda.max_memory_allocated(dev) - base)
        decode = 0
        if gen.vae is not None:
            torch.cuda.reset_peak_memory_stats(dev)
            z = torch.zeros(1, *gen.sample_shape, device=dev, dtype=gen.dtype)
            _decode(gen, None, z)
            decode = torch.cuda.max_memory_allocated(dev) - base
    per_image = max(1, peaks[1] - peaks[0])
    return MemoryModel(base + max(0, peaks[0] - per_image), per_image, max(1, decode))


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device; None on a CPU (planned by ``CPU_AUTO_BATCH``)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an out-of-memory error (CUDA's, or one that says so)."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# ---------------------------------------------------------------- sampling


def check_inputs(
    gen: Generator,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    num_inference_steps: int,
    batch_size: int | str,
    guidance_cutoff: float,
) -> None:
    """Raise ``ValueError`` naming the argument, its value and the fix."""
    if cond.ndim != 3 or cond.shape[-1] != gen.cond_dim:
        raise ValueError(
            f"conditioning has shape {tuple(cond.shape)}; generator {gen.name!r} "
            f"needs [batch, tokens, {gen.cond_dim}] (embedding={gen.embedding!r})"
        )
    if uncond.ndim != 3 or uncond.shape[1:] != cond.shape[1:]:
        raise ValueError(
            f"unconditional embedding {tuple(uncond.shape)} does not match "
            f"conditioning {tuple(cond.shape)}"
        )
    if not torch.isfinite(cond).all():
        raise ValueError("conditioning contains NaN or Inf")
    if guidance_scale < 1.0:
        raise ValueError(f"guidance-scale={guidance_scale} must be >= 1")
    if num_inference_steps < 1:
        raise ValueError(f"num-inference-steps={num_inference_steps} must be >= 1")
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"synth-batch-size={batch_size!r} must be 'auto' or >= 1")
    if not 0 < guidance_cutoff <= 1:
        raise ValueError(f"guidance-cutoff={guidance_cutoff} must be in (0, 1]")


def _decode(gen: Generator, decoder: Any, z: torch.Tensor) -> torch.Tensor:
    """x = D(z / scaling_factor) with the generator's VAE, or a tiny decoder."""
    vae: Any = decoder if decoder is not None else gen.vae
    scale = float(getattr(vae.config, "scaling_factor", 1.0))
    return vae.decode(z / scale).sample


def to_dataset_format(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Generated images -> the clients' image format (channels, side), float in [-1, 1]."""
    x = images.float()
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.clamp(-1, 1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in ``[-1, 1]`` -> uint8 ``round((x + 1) * 127.5)``, clamped; uint8
    images come back unchanged (the inverse of ``from_uint8``)."""
    if x.dtype == torch.uint8:
        return x
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] (the training format)."""
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def _denoise(
    gen: Generator,
    c: torch.Tensor,
    u: torch.Tensor,
    gens: list[torch.Generator],
    guidance_scale: float,
    num_inference_steps: int,
    guidance_cutoff: float,
    extras: list[tuple[torch.Tensor, float]] | None = None,
    latent_guidance: LatentGuidance | None = None,
    to_images: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rows: range | None = None,
    start: Start | None = None,
) -> torch.Tensor:
    """Steps 2-4 for one batch: the first state, then the loop.

    ``to_images`` maps denoised samples to images (decode, dataset format) for
    ``latent_guidance``; ``rows`` are the batch's global image indices; ``start``
    the batch's initial latents (``Start``), else x_T from the images' generators."""
    scheduler = gen.scheduler
    b = len(c)
    # 2-3. Prepare timesteps (resets multistep schedulers' state) and the first
    #      state: x_T ~ N(0, I), each image from its own generator, or the last
    #      ``strength`` of the schedule from ``start``'s latents (SDEdit)
    x, timesteps = initial_state(
        scheduler,
        num_inference_steps,
        gens,
        gen.sample_shape,
        gen.device,
        gen.dtype,
        start,
    )
    step_kwargs: dict[str, Any] = (
        {"generator": gens}
        if "generator" in inspect.signature(scheduler.step).parameters
        else {}
    )
    extras = extras or []
    guided = guidance_scale != 1.0 or bool(extras)
    context = (
        torch.cat([u.expand(b, -1, -1), c, *(e for e, _ in extras)]) if guided else c
    )
    n_ctx = 2 + len(extras)
    # the unconditional pass stops after this many steps (diffusers' CFG cut-off)
    cutoff = math.ceil(guidance_cutoff * len(timesteps))

    # 4. Denoising loop with classifier-free guidance (Ho & Salimans 2022):
    #    eps = eps(x, 0) + w (eps(x, c) - eps(x, 0)) + sum_k w_k (eps(x, c_k) - eps(x, 0))
    #    (extra terms: composable guidance, e.g. FedDISC, FedDEO); at w = 1 with no
    #    extra term that is eps(x, c) and the unconditional pass is skipped.
    def model_eps(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        if guided and i < cutoff:
            xin = scheduler.scale_model_input(torch.cat([x] * n_ctx), t)
            eps_all = gen.unet(xin, t, encoder_hidden_states=context).sample.chunk(
                n_ctx
            )
            eps_u = eps_all[0]
            eps = eps_u + guidance_scale * (eps_all[1] - eps_u)
            for (_, w), eps_k in zip(extras, eps_all[2:], strict=True):
                eps = eps + w * (eps_k - eps_u)
            return eps
        xin = scheduler.scale_model_input(x, t)
        return gen.unet(xin, t, encoder_hidden_states=c).sample

    guide = latent_guidance
    n_guided = 0 if guide is None else math.ceil(guide.until * len(timesteps))

    def guide_step(
        x: torch.Tensor, t: torch.Tensor, i: int, warmup: bool
    ) -> torch.Tensor:
        # x_t <- x_t - step * grad_x loss(D(x0_hat(x_t, eps(x_t))))  (FedLMG)
        assert guide is not None and to_images is not None and rows is not None
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0 = predicted_x0(scheduler, xg, model_eps(xg, t, i), t)
            loss = guide.loss(to_images(x0), rows, warmup)[: len(rows)].sum()
            (grad,) = torch.autograd.grad(loss, xg)
        a = scheduler.alphas_cumprod.to(x.device)[int(t)]
        return (
            x - guidance_move(grad.to(x.dtype), guide.step, a, guide.normalize)
        ).detach()

    for i, t in enumerate(timesteps):
        if guide is not None and i < n_guided:
            for _ in range(guide.warmup if i == 0 else 0):
                x = guide_step(x, t, i, warmup=True)
            x = guide_step(x, t, i, warmup=False)
        eps = model_eps(x, t, i)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


@torch.no_grad()
def sample(
    gen: Generator,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 20,
    seed: int = 0,
    batch_size: int | str = "auto",
    first_index: int = 0,
    output: Output = "images",
    guidance_cutoff: float = 1.0,
    resize_to: tuple[int, int] | None = None,
    as_uint8: bool = False,
    decoder: Any = None,
    static_shapes: bool = False,
    memory: MemoryModel | None = None,
    free_bytes: int | None = None,
    extra_conds: list[tuple[torch.Tensor, float]] | None = None,
    latent_guidance: LatentGuidance | None = None,
    start: Start | None = None,
    progress: Callable[[int], Any] | None = None,
) -> torch.Tensor:
    """Sample one image per row of ``cond`` ``[N, L, D]``.

    ``extra_conds``: further guidance terms ``(cond_k [N, L, D], w_k)`` added as
    ``w_k (eps(x, c_k) - eps(x, 0))`` (composable guidance). ``latent_guidance``:
    a loss on the predicted clean image steers every step (``LatentGuidance``;
    it sees images in the format of ``resize_to``). ``start``: initial latents,
    one per row, denoised over the last ``strength`` of the schedule (``Start``).

    Returns ``[N, C, H, W]`` on the CPU: images in ``[-1, 1]`` (decoded by the VAE,
    or ``decoder``, for latent diffusion), resized on the device to
    ``resize_to = (channels, side)`` and kept as uint8 with ``as_uint8``; or with
    ``output="latents"`` what the UNet denoises. ``first_index`` is the global
    index of row 0 (its noise seed). ``static_shapes`` pads the last batch to the
    batch size (for a compiled UNet). ``memory`` / ``free_bytes`` override the
    measured memory model and free memory (tests inject budgets with them).
    """
    # 1. Check inputs and plan the batch
    check_inputs(
        gen,
        cond,
        uncond,
        guidance_scale,
        num_inference_steps,
        batch_size,
        guidance_cutoff,
    )
    extra_conds = list(extra_conds or [])
    for k, (e, w) in enumerate(extra_conds):
        if tuple(e.shape) != tuple(cond.shape) or not torch.isfinite(e).all() or w < 0:
            raise ValueError(
                f"extra_conds[{k}]: shape {tuple(e.shape)} must equal cond's "
                f"{tuple(cond.shape)}, finite, with weight {w} >= 0"
            )
    if start is not None:
        start.check(len(cond), tuple(gen.sample_shape))
    u = uncond[:1].to(gen.device, gen.dtype)

    def to_images(z: torch.Tensor) -> torch.Tensor:
        x = z if gen.vae is None and decoder is None else _decode(gen, decoder, z)
        return to_dataset_format(x, *resize_to) if resize_to is not None else x

    batch, chunk = _plan(
        gen, cond, uncond, guidance_scale, batch_size, memory, free_bytes
    )
    out: list[torch.Tensor] = []
    lo = 0
    while lo < len(cond):
        b = min(batch, len(cond) - lo)
        rows = range(first_index + lo, first_index + lo + b)
        c = cond[lo : lo + b]
        ex = [(e[lo : lo + b], w) for e, w in extra_conds]
        st = start.rows(lo, lo + b) if start is not None else None
        if static_shapes and b < batch:  # pad with copies; their images are dropped
            c = pad_rows(c, batch)
            ex = [(pad_rows(e, batch), w) for e, w in ex]
            st = st.padded(batch) if st is not None else None
            rows = range(rows.start, rows.start + batch)
        ex = [(e.to(gen.device, gen.dtype), w) for e, w in ex]
        try:
            x = _denoise(
                gen,
                c.to(gen.device, gen.dtype),
                u,
                image_generators(seed, rows),
                guidance_scale,
                num_inference_steps,
                guidance_cutoff,
                ex,
                latent_guidance,
                to_images,
                rows,
                st,
            )[:b]
            # 5. Decode latents in chunks, clamp, convert on the device
            if output == "images":
                x, chunk = _decode_chunks(gen, decoder, x, chunk)
                if resize_to is not None:
                    x = to_dataset_format(x, *resize_to)
                x = to_uint8(x) if as_uint8 else x.float().clamp(-1, 1)
            out.append(x.cpu() if as_uint8 else x.float().cpu())
        except Exception as e:
            if not is_oom(e) or batch == 1:
                raise
            batch = max(1, b // 2)  # the same images again, in smaller batches
            _empty_cache(gen.device)
            continue
        lo += b
        if progress is not None:
            progress(b)
    if not out:
        return torch.empty(0, *gen.sample_shape)
    return torch.cat(out)


def _plan(
    gen: Generator,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    batch_size: int | str,
    memory: MemoryModel | None,
    free_bytes: int | None,
) -> tuple[int, int]:
    if batch_size != "auto":
        return int(batch_size), int(batch_size)
    free = free_bytes if free_bytes is not None else free_memory(gen.device)
    if free is None:
        return CPU_AUTO_BATCH, CPU_AUTO_BATCH
    model = memory or probe_memory(gen, cond, uncond, guidance_scale != 1.0)
    plan = plan_batch(free, model)
    return plan.batch_size, plan.decode_chunk


def _decode_chunks(
    gen: Generator, decoder: Any, z: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, int]:
    """Decode ``z`` ``chunk`` images at a time, halving ``chunk`` on out-of-memory."""
    if gen.vae is None and decoder is None:
        return z, chunk
    parts, i = [], 0
    while i < len(z):
        try:
            parts.append(_decode(gen, decoder, z[i : i + chunk]))
            i += chunk
        except Exception as e:
            if not is_oom(e) or chunk == 1:
                raise
            chunk = max(1, chunk // 2)
            _empty_cache(gen.device)
    return torch.cat(parts), chunk


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synthesize(
    gen: Generator,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    desc: str = "synthesize",
    **kwargs: Any,
) -> tuple[torch.Tensor, float]:
    """``sample`` with a progress bar in images per second; returns ``(x, seconds)``."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    with tqdm(total=len(cond), desc=desc, unit="img") as bar:
        x = sample(gen, cond, uncond, progress=bar.update, **kwargs)
    return x, time.perf_counter() - t0
