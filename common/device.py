"""Device and precision selection for server work (synthesis, merging, training)."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; an explicit choice is checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} but CUDA is not available on this machine; "
            "use device='auto' or 'cpu'"
        )
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"device={device!r} is not one of {', '.join(DEVICES)}")
    return torch.device(device)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto`` is half precision on a GPU (bf16 where the GPU supports it: the
    range of fp32, no overflow in the VAE; else fp16), fp32 on a CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in table:
        raise ValueError(
            f"precision={precision!r} is not one of {', '.join(PRECISIONS)}"
        )
    if device.type == "cpu" and precision == "fp16":
        raise ValueError(
            "precision='fp16' is not supported for diffusion on the CPU; "
            "use precision='auto', 'fp32' or 'bf16'"
        )
    return table[precision]
