"""LoRA adapters on a diffusers ``UNet2DConditionModel`` via peft (Flower-free).

The adapter lives inside the UNet through diffusers' PEFT integration
(``unet.add_adapter``, which calls ``peft.inject_adapter_in_model``); it is moved
between client and server as a peft state dict (``<prefix>.lora_A.weight`` /
``<prefix>.lora_B.weight``, no adapter name), the format ``common.lora_merge``
merges. LoRA: Hu et al. 2021, ``W x + (alpha / r)·B A x``. An adapter leaves the
project in diffusers' LoRA format (``save_diffusers_lora`` / ``load_diffusers_lora``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .diffusion import descend, diffusion_loss
from .optim import AdamW

# A diffusers model with PeftAdapterMixin (UNet2DConditionModel). Typed Any: mypy
# does not see diffusers' ModelMixin as an nn.Module (as in common/generator.py).
UNet = Any

ADAPTER = "default"


def _unmatched_targets(unet: UNet, targets: Sequence[str]) -> list[str]:
    # peft's rule for a list of targets: a module matches a target when its
    # name equals it or ends with "." + target.
    names = [n for n, _ in unet.named_modules()]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def _has_lora(unet: UNet) -> bool:
    return bool(getattr(unet, "_hf_peft_config_loaded", False)) and bool(
        getattr(unet, "peft_config", None)
    )


def attach_lora(
    unet: UNet,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    *,
    seed: int | None = None,
) -> UNet:
    """Add a trainable LoRA adapter to ``unet``; the base weights are frozen.

    An adapter already attached is removed first (``unload_lora``), so this is
    also how an adapter is re-created with another rank. ``B`` starts at zero and
    ``A`` Gaussian with std ``1/r`` (peft ``init_lora_weights="gaussian"``), so the
    adapted UNet starts equal to the base.

    With ``seed`` the ``A`` factors are drawn from a CPU generator seeded with it
    (layers in name order), so one seed gives the same initial adapter on every
    machine and device: clients that share a seed start from one adapter, as
    FedIT's broadcast initial adapter (Zhang et al. 2024) assumes.

    Parameters
    ----------
    unet : UNet2DConditionModel
        Any diffusers model with ``PeftAdapterMixin``.
    rank : int
        LoRA rank ``r``.
    alpha : float
        ``lora_alpha``; the update is scaled by ``alpha / rank``.
    targets : sequence of str
        Module names (or name suffixes), e.g. ``["to_q", "to_k", "to_v", "to_out.0"]``.
    seed : int, optional
        Seed of the ``A`` factors; ``None`` draws them from torch's global RNG.

    Returns
    -------
    UNet2DConditionModel
        The same object, adapted in place.
    """
    from peft import LoraConfig

    # 1. Check inputs before touching the model: a failed add_adapter leaves
    # diffusers' peft bookkeeping half set.
    if rank < 1:
        raise ValueError(f"lora-rank={rank} must be >= 1")
    if not alpha > 0:
        raise ValueError(f"lora-alpha={alpha} must be > 0")
    targets = list(targets)
    if not targets:
        raise ValueError("lora-targets is empty; name modules such as to_q,to_k,to_v")
    missing = _unmatched_targets(unet, targets)
    if missing:
        raise ValueError(
            f"lora-targets {missing} match no module of {type(unet).__name__}; "
            "use module names such as to_q,to_k,to_v,to_out.0"
        )

    # 2. Replace any adapter already there
    if _has_lora(unet):
        unet.unload_lora()

    # 3. Inject (peft freezes every non-LoRA parameter)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft says int; it only divides it
        target_modules=targets,
        init_lora_weights="gaussian",
    )
    unet.add_adapter(config, adapter_name=ADAPTER)

    # 4. Seeded initial A factors, drawn on the CPU (peft's init uses the global RNG
    # of the device the UNet is on)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(unet.named_parameters()):
                if ".lora_A." in name:
                    p.copy_(torch.randn(p.shape, generator=g) / rank)
    return unet


def lora_parameters(unet: UNet) -> list[nn.Parameter]:
    """The LoRA parameters of ``unet`` (what ``train_lora`` optimises)."""
    return [p for n, p in unet.named_parameters() if ".lora_" in n]


def lora_spec(unet: UNet) -> tuple[dict[str, Tensor], int, float, list[str]] | None:
    """``(state, rank, alpha, targets)`` of the attached adapter, or None."""
    if not _has_lora(unet):
        return None
    cfg = unet.peft_config[ADAPTER]
    targets = cfg.target_modules
    targets = sorted(targets) if not isinstance(targets, str) else [targets]
    return get_lora_state(unet), int(cfg.r), float(cfg.lora_alpha), targets


def get_lora_state(unet: UNet) -> dict[str, Tensor]:
    """The adapter's state dict: peft keys without the adapter name, float32 on CPU.

    The tensors are clones, so later training does not change them.
    """
    from peft import get_peft_model_state_dict

    if not _has_lora(unet):
        raise ValueError("the UNet has no LoRA adapter; call attach_lora first")
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def set_lora_state(
    unet: UNet,
    state: dict[str, Tensor],
    rank: int,
    alpha: float,
    targets: Sequence[str],
) -> UNet:
    """(Re)create a LoRA adapter of ``rank`` / ``alpha`` and load ``state`` into it.

    Strict: every key the new adapter expects must be in ``state`` with the right
    shape, and ``state`` may hold no other key. For a merged adapter take ``rank``
    and ``alpha`` from the info dict of ``common.lora_merge.merge_adapters``.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    attach_lora(unet, rank, alpha, targets)
    expected = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"LoRA state does not fit lora-targets={list(targets)}: "
            f"missing keys {missing[:3]}{'...' if len(missing) > 3 else ''} "
            f"({len(missing)}), unexpected keys {unexpected[:3]}"
            f"{'...' if len(unexpected) > 3 else ''} ({len(unexpected)})"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(
                f"LoRA state key {k!r} has shape {tuple(state[k].shape)} but an "
                f"adapter of rank {rank} needs {tuple(v.shape)}; pass the rank the "
                "state was built with"
            )
        if not torch.isfinite(state[k]).all():
            raise ValueError(f"LoRA state key {k!r} contains NaN or Inf")
    # peft annotates the result as a bare ``namedtuple``; it has the fields of
    # torch's load_state_dict result.
    result: Any = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    # missing_keys lists the base weights too; only LoRA keys would be a problem.
    if result.unexpected_keys or any(".lora_" in k for k in result.missing_keys):
        raise ValueError(
            f"peft did not load the LoRA state: unexpected {result.unexpected_keys}"
        )
    return unet


def _check_training_inputs(
    images: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    steps: int,
    lr: float,
    batch_size: int,
    cond_dropout: float,
) -> None:
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(
            f"images has shape {tuple(images.shape)}; expected [N, C, H, W]"
        )
    if cond.dim() != 3 or len(cond) != len(images):
        raise ValueError(
            f"cond has shape {tuple(cond.shape)}; expected [N={len(images)}, L, D] "
            "(one conditioning sequence per image)"
        )
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(
            f"steps={steps}, batch_size={batch_size}, lr={lr}: all must be > 0"
        )
    if not 0.0 <= cond_dropout < 1.0:
        raise ValueError(f"cond_dropout={cond_dropout} must be in [0, 1)")
    if cond_dropout > 0:
        if uncond is None:
            raise ValueError(
                f"cond_dropout={cond_dropout} needs uncond (the [1, L, D] "
                "conditioning of the empty prompt); pass it or set cond_dropout=0"
            )
        if tuple(uncond.shape) != (1, *cond.shape[1:]):
            raise ValueError(
                f"uncond has shape {tuple(uncond.shape)}; expected "
                f"{(1, *cond.shape[1:])} to match cond"
            )
    if not torch.isfinite(images).all() or not torch.isfinite(cond).all():
        raise ValueError("images or cond contain NaN or Inf")


def trainable_lora_parameters(
    unet: UNet, noise_scheduler: Any
) -> list[torch.nn.Parameter]:
    """The UNet's LoRA parameters, made trainable in float32; refuses a UNet with
    no adapter and a scheduler whose prediction type the loss does not support.

    float32 even on a half-precision base: AdamW's small updates vanish in
    fp16/bf16; peft casts activations to the adapter's dtype and the result back
    to the base's.
    """
    params = lora_parameters(unet)
    if not params:
        raise ValueError("the UNet has no LoRA parameters; call attach_lora first")
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"scheduler prediction_type={prediction_type!r} is not supported; "
            "use 'epsilon' or 'v_prediction'"
        )
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
        p.requires_grad_(True)
    return params


def train_lora(
    unet: UNet,
    noise_scheduler: Any,
    images: Tensor,
    cond: Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    uncond: Tensor | None = None,
    cond_dropout: float = 0.1,
    progress: bool = False,
) -> list[float]:
    """Fine-tune only the LoRA parameters with the DDPM denoising loss.

    Ho et al. 2020: ``x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 - ᾱ_t)·ε`` with
    ``t ~ U{0, …, T-1}``, loss ``‖ε - ε_θ(x_t, t, c)‖²`` (or the velocity target
    when the scheduler's ``prediction_type`` is ``v_prediction``). With
    probability ``cond_dropout`` a sample's ``c`` is replaced by ``uncond`` so the
    adapter keeps working under classifier-free guidance (Ho & Salimans 2022).

    Parameters
    ----------
    unet : UNet2DConditionModel
        With an adapter from ``attach_lora``; the base weights are not updated.
    noise_scheduler : diffusers scheduler
        E.g. ``DDPMScheduler``; provides ``add_noise`` and ``num_train_timesteps``.
    images : Tensor
        [N, C, H, W] what the UNet denoises: pixels in [-1, 1], or VAE latents
        already multiplied by the VAE's scaling factor (the caller encodes them).
    cond : Tensor
        [N, L, D] conditioning (``encoder_hidden_states``) per image.
    steps, lr, batch_size : int, float, int
        Optimiser steps, AdamW learning rate, batch size (capped at N).
    seed : int
        Seeds batches, timesteps, noise and dropout (drawn on the CPU, so one
        seed gives the same draws on every device).
    uncond : Tensor, optional
        [1, L, D] unconditional embedding; required when ``cond_dropout > 0``.
    cond_dropout : float
        Probability of training a sample unconditionally.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    list of float
        The loss of every step.
    """
    # 1. Check inputs
    _check_training_inputs(images, cond, uncond, steps, lr, batch_size, cond_dropout)

    # 2. Set up: only LoRA parameters are optimised, in float32 (see
    # trainable_lora_parameters)
    params = trainable_lora_parameters(unet, noise_scheduler)
    device = params[0].device
    dtype = next(unet.parameters()).dtype
    opt = AdamW(params, lr=lr)  # torch.optim.AdamW's update (common/optim.py)
    g = torch.Generator().manual_seed(seed)
    n = len(images)
    bs = min(batch_size, n)
    num_t = int(noise_scheduler.config.num_train_timesteps)
    order = torch.randperm(n, generator=g)
    cursor = 0
    was_training = unet.training
    unet.train()

    # 3. Training loop
    losses: list[float] = []
    try:
        for _ in tqdm(range(steps), desc="train lora", disable=not progress):
            # Walk through a permutation; a new one each epoch.
            if cursor + bs > n:
                order, cursor = torch.randperm(n, generator=g), 0
            idx = order[cursor : cursor + bs]
            cursor += bs
            x0 = images[idx]
            c = cond[idx]
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, num_t, (bs,), generator=g)
            drop = torch.rand(bs, generator=g) < cond_dropout
            x0, noise, c = (v.to(device, dtype) for v in (x0, noise, c))
            t = t.to(device)
            if uncond is not None and drop.any():
                u = uncond.to(device, dtype).expand_as(c)
                c = torch.where(drop.to(device)[:, None, None], u, c)

            # the denoising loss on x_t ~ q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I)
            loss = diffusion_loss(unet, noise_scheduler, x0, c, t, noise)

            losses.append(float(loss.detach()))
            descend(  # stops before a non-finite loss reaches the adapter's weights
                opt,
                loss,
                step=len(losses),
                what="LoRA training",
                lr_key="lora-learning-rate",
                lr=lr,
            )
    finally:
        unet.train(was_training)
    return losses


def adapter_nbytes(state: dict[str, Tensor]) -> int:
    """Size of an adapter state dict in bytes (what a client uploads)."""
    return sum(t.numel() * t.element_size() for t in state.values())


# ---------------------------------------------------------------- export


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
UNET_PREFIX = "unet."  # diffusers' key prefix of a pipeline's UNet adapter
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def _adapter_modules(state: dict[str, Tensor], rank: int) -> list[str]:
    """The adapted modules of a peft state dict; checks its pairs and ``rank``."""
    suffixes = (".lora_A.weight", ".lora_B.weight")
    bad = [k for k in state if not k.endswith(suffixes)]
    if bad:
        raise ValueError(
            f"LoRA state keys {bad[:3]} are not '<module>.lora_A.weight' / "
            "'<module>.lora_B.weight' (a peft state dict without adapter name, as "
            "get_lora_state returns)"
        )
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    for m in modules:
        a, b = state.get(m + suffixes[0]), state.get(m + suffixes[1])
        if a is None or b is None:
            raise ValueError(f"LoRA state has lora_A or lora_B of {m!r} but not both")
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(
                f"LoRA state of {m!r}: lora_A {tuple(a.shape)}, lora_B "
                f"{tuple(b.shape)} do not have rank={rank}; pass the rank the state "
                "was built with"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"LoRA state of {m!r} contains NaN or Inf")
    return modules


def save_diffusers_lora(
    path: str | Path, state: dict[str, Tensor], rank: int, alpha: float
) -> Path:
    """Write a UNet adapter as diffusers writes LoRA weights, for diffusers' loaders.

    ``<path>/pytorch_lora_weights.safetensors`` holds the peft keys prefixed
    ``unet.`` (``unet.<module>.lora_A.weight``) and, in its header, diffusers'
    adapter metadata (``r``, ``lora_alpha``, ``target_modules`` = the adapted
    modules' full names): the format of ``StableDiffusionPipeline.save_lora_weights``
    (written by it), loaded without conversion by
    ``pipeline.load_lora_weights(path)`` or, on a bare UNet,
    ``unet.load_lora_adapter(path, weight_name=LORA_WEIGHTS, prefix="unet")``
    (without ``weight_name`` it looks for a ``.bin`` file).

    The scale ``alpha / rank`` is folded into ``lora_B`` and the metadata says
    ``lora_alpha = r``: a loader that ignores the metadata (diffusers before
    0.35, other tools) assumes exactly that, so every loader applies
    ``ΔW = (alpha / rank)·B A``, the update this project's adapter applies.

    Parameters
    ----------
    path : str or Path
        Folder to write into (created).
    state : dict of str to Tensor
        A peft state dict without adapter name (``get_lora_state``).
    rank, alpha : int, float
        ``r`` and ``lora_alpha`` the state was built with.

    Returns
    -------
    Path
        The weights file.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    # 1. Check inputs
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1")
    if not alpha > 0:
        raise ValueError(f"alpha={alpha} must be > 0")
    if not state:
        raise ValueError("LoRA state is empty; nothing to save")
    modules = _adapter_modules(state, rank)

    # 2. Fold the scale into B: (alpha / r)·B A = (s·B) A with lora_alpha = r
    s = float(alpha) / rank
    layers: dict[str, nn.Module | Tensor] = {}
    for k, v in state.items():
        v = v.detach().to("cpu", torch.float32)
        fold = s != 1.0 and k.endswith(".lora_B.weight")
        layers[k] = (v * s if fold else v).contiguous()

    # 3. Write with diffusers' own writer (its key prefix and metadata header)
    metadata = {"r": int(rank), "lora_alpha": int(rank), "target_modules": modules}
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(path), unet_lora_layers=layers, unet_lora_adapter_metadata=metadata
    )
    return Path(path) / LORA_WEIGHTS


def load_diffusers_lora(
    path: str | Path,
) -> tuple[dict[str, Tensor], int, float, list[str]]:
    """``(state, rank, alpha, targets)`` of a UNet adapter in diffusers' format.

    Reads what ``save_diffusers_lora`` writes (a folder or the file itself);
    ``set_lora_state(unet, *load_diffusers_lora(path))`` puts it on a UNet for
    this project's sampler. Without adapter metadata, ``alpha = rank`` (diffusers'
    convention).
    """
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    file = Path(path)
    if file.is_dir():
        file = file / LORA_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"no LoRA weights at {file}")
    with safe_open(str(file), framework="pt") as f:
        header = f.metadata() or {}
    state = {
        k[len(UNET_PREFIX) :]: v
        for k, v in load_file(str(file)).items()
        if k.startswith(UNET_PREFIX)
    }
    if not state:
        raise ValueError(f"{file} holds no '{UNET_PREFIX}' LoRA keys")
    meta = json.loads(header.get(_METADATA_KEY, "{}"))
    ranks = {int(v.shape[0]) for k, v in state.items() if k.endswith(".lora_A.weight")}
    rank = int(meta.get(UNET_PREFIX + "r", max(ranks, default=0)))
    alpha = float(meta.get(UNET_PREFIX + "lora_alpha", rank))
    modules = _adapter_modules(state, rank)
    targets = list(meta.get(UNET_PREFIX + "target_modules", modules))
    return state, rank, alpha, sorted(targets)
