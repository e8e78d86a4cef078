"""Federated LoRA's payload, the one place its layout is written.

Up (``lora`` ArrayRecord, fp16): ``adapter/<module>.lora_A.weight`` and
``adapter/<module>.lora_B.weight`` (a peft state dict without adapter name) plus
OSCAR's per-class embeddings under ``emb/`` (the server samples with them).
Meta: ``base-model`` (the generator's fingerprint), ``embedding``.
Down (``lora`` ArrayRecord): the merged adapter under ``adapter/``; its rank and
alpha travel in the config record (``lora-rank``, ``lora-alpha``).
"""

from __future__ import annotations

import torch

from common import contract as C
from common.contract import PayloadError

from ..oscar import payload_oscar

RECORD = "lora"
COLLECT_TYPE = "train.lora"  # the collect message's type
ADAPTER = "adapter/"
EMB = "emb/"


def layout(
    adapter: dict[str, torch.Tensor], emb: payload_oscar.ClassEmbeddings | None
) -> dict[str, torch.Tensor]:
    """The upload: the adapter under ``adapter/``, the embeddings under ``emb/``."""
    out = {ADAPTER + k: v for k, v in adapter.items()}
    if emb is not None:
        out |= payload_oscar.layout(emb, prefix=EMB)
    return out


def adapter_of(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors of a payload, without the ``adapter/`` prefix."""
    return {k[len(ADAPTER) :]: v for k, v in tensors.items() if k.startswith(ADAPTER)}


def unpack(
    tensors: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    *,
    num_classes: int,
    tokens: int,
    dim: int,
) -> tuple[dict[str, torch.Tensor], payload_oscar.ClassEmbeddings]:
    """``(adapter, embeddings)``; the adapter must have the reference's keys/shapes."""
    bad = [k for k in tensors if not k.startswith((ADAPTER, EMB))]
    if bad:
        raise PayloadError(
            f"unexpected payload keys {[C.safe_text(k) for k in bad[:3]]}"
        )
    adapter = adapter_of(tensors)
    C.check_state_dict(adapter, reference, "adapter")
    emb = payload_oscar.unpack(
        tensors, num_classes=num_classes, tokens=tokens, dim=dim, prefix=EMB
    )
    return adapter, emb
