"""The keys of one-shot federated LoRA (``lora-*``), validated on construction."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from common.config import KeysModel

LoraMerge = Literal["fedavg", "stack", "svd", "ties", "dare", "generative"]
LoraInit = Literal["shared", "client"]


class LoraConfig(KeysModel):
    """The keys of one-shot federated LoRA (``lora-*``): the clients' adapter
    and its training, and the server's merge."""

    lora_merge: LoraMerge = Field("svd")
    """how the server merges the clients' adapters"""
    lora_rank: int = Field(4, ge=1, le=256)
    """client LoRA rank"""
    lora_alpha: float = Field(4.0, gt=0)
    """LoRA alpha"""
    lora_targets: str = Field(
        "to_q,to_k,to_v,to_out.0,conv1,conv2",
        json_schema_extra={"allowed": "comma list of module names"},
    )
    """UNet modules that get adapters: attention projections and the resnets' 3x3 convs
    (LoCon; the same names in SD 1.5)"""
    lora_init: LoraInit = Field("shared")
    """`shared`: every client starts from the adapter the run `seed` draws (FedIT's
    common initial adapter); `client`: each client from its own"""
    lora_steps: int = Field(100, ge=1)
    """client fine-tuning steps"""
    lora_batch_size: int = Field(32, ge=1)
    """batch size of LoRA fine-tuning (clients, and the `generative` correction)"""
    lora_learning_rate: float = Field(1e-3, gt=0)
    """client LoRA learning rate"""
    lora_merge_rank: int = Field(8, ge=1, le=1024)
    """rank of the `svd`, `ties`, `dare` and `generative` merges"""
    lora_merge_density: float = Field(0.5, gt=0, le=1)
    """share of each update's entries TIES keeps (by magnitude) and DARE keeps (at
    random, rescaled)"""
    lora_samples_per_class: int = Field(16, ge=1)
    """auxiliary samples per (client, class) of the `generative` merge, and each
    client's FID-proxy samples per class"""

    @field_validator("lora_targets")
    @classmethod
    def _check_targets(cls, v: str) -> str:
        targets = [t.strip() for t in v.split(",") if t.strip()]
        if not targets:
            raise ValueError("give at least one module name, e.g. 'to_q,to_v'")
        return ",".join(targets)

    @property
    def target_list(self) -> list[str]:
        """``lora-targets`` as a list of UNet module names."""
        return self.lora_targets.split(",")
