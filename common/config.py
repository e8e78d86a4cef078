"""The run configuration: one pydantic model, validated once at start.

Defaults live in ``[tool.flwr.app.config]`` of ``pyproject.toml``; ``--run-config``
overrides them. Both the ServerApp and the ClientApp build the config once from
``context.run_config`` (``methods.build_config``); nothing else reads
``run_config[...]``. ``RunConfig`` holds the keys every method shares; a method's
own keys are declared and validated by its ``config_<name>.py`` model and read
with ``cfg.options(ThatConfig)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from .data import STYLES, UNSEEN_TRANSFORMS, domain_parts
from .datasets import DataArgs

T = TypeVar("T", bound=BaseModel)
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

Partition = Literal["iid", "dirichlet", "pathological", "domain"]
Embedding = Literal["pooled", "sequence"]
Scheduler = Literal["ddim", "ddpm", "dpm", "euler", "default"]
Classifier = Literal["cnn", "resnet18"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]


class ConfigError(ValueError):
    """A run-config key has a bad value; the message names key, value and fix."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class KeysModel(BaseModel):
    """Base of every config model: kebab-case keys, unknown keys refused, frozen."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=_kebab, populate_by_name=True, frozen=True
    )


class RunConfig(KeysModel):
    """Validated run config. Field names are the kebab-case keys with ``_``."""

    # What to run (one of the registered methods; checked by ``parse_config``)
    method: str = "oscar"
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
    images_per_class: int = Field(50, ge=1, le=100_000)
    synth_budget: int = Field(5000, ge=0)
    save_synthetic: bool = False
    guidance_scale: float = Field(3.0, ge=1.0, le=50.0)
    num_inference_steps: int = Field(10, ge=1, le=1000)
    scheduler: Scheduler = "dpm"
    synth_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    guidance_cutoff: float = Field(0.5, gt=0, le=1)
    decoder: str = ""
    compile: bool = False
    synth_workers: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    synth_ray_address: str = ""
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
    collect_window_s: float = Field(600.0, gt=0)
    target_clients: int = Field(0, ge=0)
    collect_quiet_s: float = Field(10.0, ge=0)
    evaluate_timeout_s: float = Field(600.0, gt=0)
    max_upload_mb: float = Field(64.0, gt=0)
    max_weight_share: float = Field(0.5, gt=0, le=1)
    output_dir: str = "outputs"
    run_name: str = ""
    # Privacy guard for OSCAR uploads (off when dp-epsilon = 0)
    dp_epsilon: float = Field(0.0, ge=0)
    dp_delta: float = Field(1e-5, gt=0, lt=1)
    dp_clip: float = Field(1.0, gt=0)
    _options: dict[type[BaseModel], BaseModel] = PrivateAttr(default_factory=dict)

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
        # The run folder is output-dir/run-name: "..", "." or "a/b" would leave it.
        if v and not RUN_NAME.fullmatch(v):
            raise ValueError(
                "the run folder is <output-dir>/<run-name> and must stay inside "
                "output-dir: use up to 100 letters, digits, '-', '_' and '.', "
                "starting with a letter or digit (or leave it empty for the run id)"
            )
        return v

    @property
    def domain_list(self) -> tuple[str, ...]:
        return tuple(self.domains.split(","))

    def options(self, model: type[T]) -> T:
        """The validated keys of one method's config model (``config_<name>.py``)."""
        try:
            return self._options[model]  # type: ignore[return-value]
        except KeyError:
            raise KeyError(
                f"{model.__name__} is not a registered method config; register the "
                "method in methods/__init__.py"
            ) from None

    def replace(self, **updates: Any) -> RunConfig:
        """A copy with some keys changed (field names, ``_`` form), methods' included.

        For programmatic sweeps (benchmarks); values are trusted, not re-validated.
        """
        mine = {k: v for k, v in updates.items() if k in type(self).model_fields}
        new = self.model_copy(update=mine)
        new._options = dict(self._options)
        taken = set(mine)
        for model, opts in self._options.items():
            theirs = {k: v for k, v in updates.items() if k in model.model_fields}
            if theirs:
                new._options[model] = opts.model_copy(update=theirs)
                taken |= set(theirs)
        unknown = sorted(set(updates) - taken)
        if unknown:
            raise KeyError(f"unknown config field(s) {unknown}")
        return new

    def data_args(self) -> DataArgs:
        """The keys that shape a client's partition (``common.datasets``)."""
        return DataArgs(
            dataset=self.dataset,
            partition=self.partition,
            image_size=self.image_size,
            alpha=self.dirichlet_alpha,
            classes_per_client=self.classes_per_client,
            domains=self.domain_list,
            max_examples=self.max_examples_per_client,
            test_fraction=self.test_fraction,
            seed=self.seed,
        )

    def to_flat(self) -> dict[str, Any]:
        """Every key, kebab-case, methods' own included (for results.json)."""
        flat = self.model_dump(by_alias=True)
        for opts in self._options.values():
            flat |= opts.model_dump(by_alias=True)
        return flat


def _keys(model: type[BaseModel]) -> set[str]:
    return {f.alias or k for k, f in model.model_fields.items()}


def all_keys(method_configs: Mapping[str, type[BaseModel] | None]) -> list[str]:
    """Every run-config key: the shared ones and each method's own."""
    keys = _keys(RunConfig)
    for model in method_configs.values():
        if model is not None:
            keys |= _keys(model)
    return sorted(keys)


def _describe(e: ValidationError, known: list[str]) -> list[str]:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<config>"
        if err["type"] == "extra_forbidden":
            lines.append(
                f"unknown key {key!r} (value {err['input']!r}); known keys: "
                + ", ".join(known)
            )
        else:
            lines.append(f"{key} = {err['input']!r}: {err['msg']}")
    return lines


def parse_config(
    run_config: Mapping[str, Any],
    method_configs: Mapping[str, type[BaseModel] | None],
) -> RunConfig:
    """Validate ``context.run_config`` once; raise ``ConfigError`` naming every bad key.

    ``method_configs`` is the registry's ``{method name: its config model or None}``.
    Each method's keys are validated by its own model (all of them, so a typo in
    any key is caught whichever method runs); the rest by ``RunConfig``.
    """
    known = all_keys(method_configs)
    values = dict(run_config)
    lines: list[str] = []
    options: dict[type[BaseModel], BaseModel] = {}
    for model in dict.fromkeys(m for m in method_configs.values() if m is not None):
        own = _keys(model)
        try:
            options[model] = model.model_validate(
                {k: values.pop(k) for k in list(values) if k in own}
            )
        except ValidationError as e:
            lines += _describe(e, known)
    try:
        cfg = RunConfig.model_validate(values)
    except ValidationError as e:
        lines += _describe(e, known)
        cfg = None
    method = values.get("method", RunConfig.model_fields["method"].default)
    if method not in method_configs:
        lines.append(
            f"method = {method!r}: not a registered method; use one of "
            + ", ".join(map(repr, method_configs))
        )
    if lines or cfg is None:
        raise ConfigError("invalid run config:\n  " + "\n  ".join(lines))
    cfg._options.update(options)
    return cfg
