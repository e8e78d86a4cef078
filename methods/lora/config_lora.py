"""The keys of one-shot federated LoRA (``lora-*``), validated on construction."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from common.config import KeysModel

LoraMerge = Literal["fedavg", "stack", "svd", "ties", "dare", "generative"]
LoraInit = Literal["shared", "client"]


class LoraConfig(KeysModel):
    lora_merge: LoraMerge = "svd"
    lora_rank: int = Field(4, ge=1, le=256)
    lora_alpha: float = Field(4.0, gt=0)
    lora_targets: str = "to_q,to_k,to_v,to_out.0,conv1,conv2"
    lora_init: LoraInit = "shared"
    lora_steps: int = Field(100, ge=1)
    lora_batch_size: int = Field(32, ge=1)
    lora_learning_rate: float = Field(1e-3, gt=0)
    lora_merge_rank: int = Field(8, ge=1, le=1024)
    lora_merge_density: float = Field(0.5, gt=0, le=1)
    lora_samples_per_class: int = Field(16, ge=1)

    @field_validator("lora_targets")
    @classmethod
    def _check_targets(cls, v: str) -> str:
        targets = [t.strip() for t in v.split(",") if t.strip()]
        if not targets:
            raise ValueError("give at least one module name, e.g. 'to_q,to_v'")
        return ",".join(targets)

    @property
    def target_list(self) -> list[str]:
        return self.lora_targets.split(",")
