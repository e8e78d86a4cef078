"""The run configuration: one pydantic model, validated once at start.

Defaults live in ``[tool.flwr.app.config]`` of ``pyproject.toml``; ``--run-config``
overrides them. Both the ServerApp and the ClientApp build ``RunConfig`` from
``context.run_config``; nothing else reads ``run_config[...]``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .data import STYLES, UNSEEN_TRANSFORMS, domain_parts

Method = Literal["oscar", "fedavg", "class-names", "local", "lora"]
Partition = Literal["iid", "dirichlet", "pathological", "domain"]
Embedding = Literal["pooled", "sequence"]
Scheduler = Literal["ddim", "ddpm", "dpm", "euler", "default"]
Classifier = Literal["cnn", "resnet18"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
LoraMerge = Literal["fedavg", "stack", "svd", "ties", "dare", "generative"]
LoraInit = Literal["shared", "client"]


class ConfigError(ValueError):
    """A run-config key has a bad value; the message names key, value and fix."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class RunConfig(BaseModel):
    """Validated run config. Field names are the kebab-case keys with ``_``."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=_kebab, populate_by_name=True, frozen=True
    )

    # What to run
    method: Method = "oscar"
    # Data and partitioning
    dataset: str = Field("mnist-domains", min_length=1)
    domains: str = "inverted,thick,thin,rotated,noisy"
    partition: Partition = "dirichlet"
    dirichlet_alpha: float = Field(0.5, gt=0)
    classes_per_client: int = Field(2, ge=1)
    max_examples_per_client: int = Field(2000, ge=0)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    image_size: int = Field(16, ge=8, le=1024)
    # Foundation models: "embedded", a local folder or a hub id
    captioner: str = Field("embedded", min_length=1)
    text_encoder: str = Field("embedded", min_length=1)
    generator: str = Field("embedded", min_length=1)
    embedding: Embedding = "pooled"
    caption_with_labels: bool = True
    # Synthesis
    images_per_class: int = Field(16, ge=1, le=100_000)
    guidance_scale: float = Field(3.0, ge=1.0, le=50.0)
    num_inference_steps: int = Field(20, ge=1, le=1000)
    scheduler: Scheduler = "ddim"
    synth_batch_size: int = Field(256, ge=1)
    # Classifier training (server, and clients for fedavg/local)
    classifier: Classifier = "cnn"
    train_epochs: int = Field(15, ge=1)
    train_batch_size: int = Field(128, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    local_epochs: int = Field(5, ge=1)
    # Server hardware
    device: Device = "auto"
    precision: Precision = "auto"
    seed: int = 0
    # The round
    min_clients: int = Field(2, ge=1)
    wait_for_nodes_s: float = Field(120.0, gt=0)
    round_timeout_s: float = Field(1800.0, gt=0)
    max_upload_mb: float = Field(64.0, gt=0)
    output_dir: str = "outputs"
    run_name: str = ""
    # Privacy guard for OSCAR uploads (off when dp-epsilon = 0)
    dp_epsilon: float = Field(0.0, ge=0)
    dp_delta: float = Field(1e-5, gt=0, lt=1)
    dp_clip: float = Field(1.0, gt=0)
    # One-shot federated LoRA
    lora_merge: LoraMerge = "svd"
    lora_rank: int = Field(4, ge=1, le=256)
    lora_alpha: float = Field(4.0, gt=0)
    lora_targets: str = "to_q,to_k,to_v,to_out.0,conv1,conv2"
    lora_init: LoraInit = "shared"
    lora_steps: int = Field(100, ge=1)
    lora_batch_size: int = Field(32, ge=1)
    lora_learning_rate: float = Field(1e-3, gt=0)
    lora_merge_rank: int = Field(8, ge=1, le=1024)
    lora_samples_per_class: int = Field(16, ge=1)

    @field_validator("domains")
    @classmethod
    def _check_domains(cls, v: str) -> str:
        names = [d.strip() for d in v.split(",") if d.strip()]
        bad = []
        for d in names:
            try:
                domain_parts(d)
            except ValueError:
                bad.append(d)
        if not names or bad:
            raise ValueError(
                f"unknown domain(s) {bad or v!r}; use a comma-separated list of "
                f"{', '.join(STYLES)}, each optionally with '+' and one of "
                f"{', '.join(UNSEEN_TRANSFORMS)}"
            )
        return ",".join(names)

    @field_validator("run_name")
    @classmethod
    def _check_run_name(cls, v: str) -> str:
        if v and not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("use letters, digits, '-', '_' and '.' only")
        return v

    @property
    def domain_list(self) -> tuple[str, ...]:
        return tuple(self.domains.split(","))

    @property
    def lora_target_list(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def to_flat(self) -> dict[str, Any]:
        """The config as kebab-case keys (for results.json and ConfigRecords)."""
        return self.model_dump(by_alias=True)


def build_config(run_config: dict[str, Any]) -> RunConfig:
    """Validate ``context.run_config``; raise ``ConfigError`` naming every bad key."""
    try:
        return RunConfig.model_validate(dict(run_config))
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<config>"
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(
                    sorted(f.alias or k for k, f in RunConfig.model_fields.items())
                )
                lines.append(
                    f"unknown key {key!r} (value {err['input']!r}); known keys: {allowed}"
                )
            else:
                lines.append(f"{key} = {err['input']!r}: {err['msg']}")
        raise ConfigError("invalid run config:\n  " + "\n  ".join(lines)) from None
