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

from .datasets import DataArgs
from .datasets.base import GLOBAL_TEST_PER_CLASS, Partition
from .mnist_domains import ALL_STYLES, UNSEEN_TRANSFORMS, domain_parts

T = TypeVar("T", bound=BaseModel)
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

Embedding = Literal["pooled", "sequence"]
Scheduler = Literal["ddim", "ddpm", "dpm", "euler", "default"]
Classifier = Literal["cnn", "resnet18"]
Init = Literal["random", "public"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
RobustRule = Literal["mean", "median", "trimmed-mean", "krum"]


class ConfigError(ValueError):
    """A run-config key has a bad value; the message names key, value and fix."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class KeysModel(BaseModel):
    """Base of every config model: kebab-case keys, unknown keys refused, frozen.

    A key's help text is the docstring written under its field (pydantic's
    ``use_attribute_docstrings``), joined into one line: it is the key's
    ``description``, the help column of the generated tables (``methods/docs.py``).
    """

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=_kebab,
        populate_by_name=True,
        frozen=True,
        use_attribute_docstrings=True,
    )

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        for field in cls.model_fields.values():
            if field.description:
                field.description = " ".join(field.description.split())


class RunConfig(KeysModel):
    """Validated run config. Field names are the kebab-case keys with ``_``."""

    # What to run (one of the registered methods; checked by ``parse_config``)
    method: str = Field("oscar")
    """the one-shot method (the registry in `methods/__init__.py`; see the method table)"""
    # Data and partitioning
    dataset: str = Field(
        "mnist-domains",
        min_length=1,
        json_schema_extra={
            "allowed": "mnist-domains, mnist, a Hugging Face dataset (hub id or "
            "`save_to_disk` folder), an image folder"
        },
    )
    """`mnist-domains`: the clients' half of MNIST in the styles of `domains`; HF: first
    `Image` and `ClassLabel` columns, `train` split; a folder: `<class>/<image>` or
    `<domain>/<class>/<image>`"""
    domains: str = Field(
        "inverted,thick,thin,rotated,noisy",
        json_schema_extra={
            "allowed": f"comma list of {', '.join(ALL_STYLES)}, each optionally with "
            f"`+` and one of {', '.join(UNSEEN_TRANSFORMS)}"
        },
    )
    """client `i` holds domain `i mod len(domains)`"""
    partition: Partition = Field("dirichlet")
    """label partitioning (flwr-datasets partitioners)"""
    dirichlet_alpha: float = Field(0.5, gt=0)
    """label skew of `dirichlet`"""
    classes_per_client: int = Field(2, ge=1)
    """classes per client for `pathological`"""
    max_examples_per_client: int = Field(2000, ge=0)
    """cap on a client's examples (0: all)"""
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """each client's held-out share"""
    image_size: int = Field(16, ge=8, le=1024)
    """image side the classifier and generator use"""
    # Foundation models: "embedded", a local folder or a hub id
    captioner: str = Field(
        "embedded",
        min_length=1,
        json_schema_extra={"allowed": "embedded, oracle, folder, hub id"},
    )
    """`embedded`/CLIP: retrieval captioning over a phrase bank; BLIP-style: generative
    captioning; `oracle`: exact class-and-style captions"""
    text_encoder: str = Field(
        "embedded",
        min_length=1,
        json_schema_extra={"allowed": "embedded, folder, hub id"},
    )
    """CLIP text encoder"""
    generator: str = Field(
        "embedded",
        min_length=1,
        json_schema_extra={"allowed": "embedded, folder, hub id"},
    )
    """text-conditioned diffusion model (UNet + scheduler; a VAE if latent)"""
    embedding: Embedding = Field("pooled")
    """upload the pooled projected text embedding, or the token sequence SD needs"""
    caption_with_labels: bool = Field(True)
    """retrieval restricted to captions of the image's known label"""
    # Synthesis
    images_per_class: int = Field(50, ge=1, le=100_000)
    """synthetic images per (client, class) of every synthesizing method (`python -m
    bench ablation`: OSCAR's global accuracy still rises from 30 to 50; the papers
    and the quick accuracy bench use 30)"""
    synth_budget: int = Field(5000, ge=0)
    """synthetic images of a round, all methods (0: unlimited); over it each class's
    clients are reduced to weighted k-means representatives (FedLMG: a weighted draw
    of clients)"""
    save_synthetic: bool = Field(False)
    """keep the synthetic training set at `<run-dir>/synthetic/` (a `save_to_disk`
    folder: `image`, `label`, `client`, `source`; usable as `dataset`);
    results.json's `synthetic_set` gives its path and rows"""
    guidance_scale: float = Field(3.0, ge=1.0, le=50.0)
    """classifier-free guidance"""
    num_inference_steps: int = Field(10, ge=1, le=1000)
    """sampler steps (10 with DPM-Solver++ and guidance-cutoff 0.5: 3.0x the img/s of
    DDIM 20 with full guidance, equal or better accuracy and FID-proxy over 3 seeds;
    `python -m bench synth`)"""
    scheduler: Scheduler = Field("dpm")
    """diffusers scheduler for sampling (`dpm`: DPM-Solver++ multistep)"""
    synth_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field("auto")
    """images per denoising batch; `auto`: planned from the free GPU memory (a probed
    memory model, 15% kept free; the decoder runs in chunks of its own size;
    out-of-memory halves and retries the same images), 64 on a CPU (the fastest
    batch side by side, `python -m bench synth --parts cpu-batch`)"""
    guidance_cutoff: float = Field(0.5, gt=0, le=1)
    """fraction of the steps that use classifier-free guidance; after it only the
    conditional pass runs (diffusers' CFG cut-off)"""
    decoder: str = Field("", json_schema_extra={"allowed": '"", folder, hub id'})
    """a tiny latent decoder (diffusers `AutoencoderTiny`, e.g. TAESD) instead of the
    generator's VAE; for few-step sampling, where decoding dominates"""
    compile: bool = Field(False)
    """`torch.compile` the UNet for sampling (static shapes: the last batch is padded)"""
    synth_workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field("auto")
    """Ray actors that share the synthesis, one device each (`auto`: one per visible
    GPU, 1 on a CPU); the images are the same as with one"""
    synth_ray_address: str = Field("", json_schema_extra={"allowed": '"", Ray address'})
    """the Ray cluster to run the workers on (`ray start --head` on the server); empty:
    the running Ray instance or a local one"""
    # Classifier training (server, and clients for fedavg/local)
    classifier: Classifier = Field("cnn")
    """global classifier (ResNet-18 written here, no torchvision)"""
    classifier_init: Init = Field("random")
    """where every trained classifier starts: `random` (the run seed's init) or `public`
    (public-only's classifier, trained once on the server's public data: the same
    start for every method; methods/initial.py)"""
    train_epochs: int = Field(15, ge=1)
    """server training epochs on the synthetic set"""
    train_batch_size: int = Field(128, ge=1)
    """batch size of every classifier training"""
    learning_rate: float = Field(2e-3, gt=0)
    """AdamW learning rate of classifier training"""
    local_epochs: int = Field(5, ge=1)
    """client epochs of the methods whose clients train a classifier (fedavg, local,
    fedlmg, dense, feddiff)"""
    # Server hardware
    device: Device = Field("auto")
    """server device (`auto`: CUDA when present)"""
    precision: Precision = Field("auto")
    """server generator precision (`auto`: bf16 on a CUDA GPU that supports it, else
    fp16; fp32 on a CPU)"""
    seed: int = Field(0)
    """seed of captioning, synthesis and training, and of the partition unless
    `partition-seed` is set"""
    partition_seed: int = Field(-1, ge=-1)
    """seed of the partition alone (which examples each client holds, its held-out
    split): hold the clients' data fixed while `seed` varies; -1: `seed`"""
    global_test_per_class: int = Field(GLOBAL_TEST_PER_CLASS, ge=1, le=10_000)
    """images per class and domain of the global test set (the dataset's test split
    in every participating client's domain; results.json's `global_accuracy`),
    drawn from `seed`"""
    # The round
    min_clients: int = Field(2, ge=1)
    """replies needed to go on"""
    collect_window_s: float = Field(600.0, gt=0)
    """how long the round accepts devices: each node is asked when it connects, each
    reply persisted when it arrives (see Running a fleet)"""
    target_clients: int = Field(0, ge=0)
    """close the window early once this many valid uploads are in (0: never early for
    this reason)"""
    collect_quiet_s: float = Field(10.0, ge=0)
    """close the window once every asked node has answered and no new node connected for
    this long (0: off; set 0 for a fleet that trickles in; in Flower's simulation,
    whose nodes are all there from the start, at most 1 s)"""
    evaluate_timeout_s: float = Field(600.0, gt=0)
    """how long the push-back waits for the contributors' evaluations (the global
    accuracy never waits for them)"""
    max_upload_mb: float = Field(64.0, gt=0)
    """larger uploads are rejected (everything a client sends counts: arrays, strings,
    numbers)"""
    max_weight_share: float = Field(0.5, gt=0, le=1)
    """no client's share of a weighted average (fedavg, LoRA merges) above this; the
    excess goes to the others by their example counts (1: off)"""
    robust_aggregation: RobustRule = Field("mean")
    """how the clients' uploaded weights are averaged (one-shot FedAvg's average):
    `mean` (FedAvg, example-weighted), `median` and `trimmed-mean` (per coordinate,
    unweighted; Yin et al. 2018), `krum` (Multi-Krum, Blanchard et al. 2017: the n -
    f clients nearest their neighbours, example-weighted); `robust-fraction` of the
    clients are presumed malicious (`common.robust`)"""
    robust_fraction: float = Field(0.2, ge=0, lt=0.5)
    """share of clients presumed malicious: `trimmed-mean` drops floor(share x n) values
    at each end of every coordinate, `krum` presumes f = floor(share x n)"""
    screen_outliers: bool = Field(False)
    """reject, with the reason, uploads implausible next to the cohort, before server
    work: weights (a classifier, an adapter) whose norm is over 5x or under 1/5 of
    the median of the uploads of the same layout; a client's class vectors (their
    mean per class) farther from the class's robust centre (the coordinate-wise
    median over clients) than 4x the cohort's median such distance and than the
    typical distance between class centres (each needs 3 uploads, or 3 clients of a
    class, to compare; off by default: honest clients of a rare domain can look like
    outliers)"""
    output_dir: str = Field("outputs", json_schema_extra={"allowed": "path"})
    """results go to `<output-dir>/<run-name or run id>/`; a relative path is resolved
    against the checkout the local simulation SuperLink was started from, and refused
    (with the fix) when the run's app differs from that checkout or runs in a
    deployment: give an absolute path there; the log names the absolute path"""
    run_name: str = Field(
        "",
        json_schema_extra={
            "allowed": "up to 100 letters, digits, `-_.`, starting with a letter or "
            "digit"
        },
    )
    """name of the run folder inside `output-dir` instead of the run id; re-using it
    resumes"""
    device_registry: str = Field(
        "", json_schema_extra={"allowed": "absolute path on the server, or empty"}
    )
    """deployment with node auth: the device registry (`devices.json`, written by
    `deploy.cluster` when it registers the nodes) mapping each registered key to its
    device and partition; an upload whose claims disagree with its node's registered
    device is rejected (empty: trust the node config's `partition-id`, as in
    simulation)"""
    # Privacy guard on the clients' uploads (off when dp-epsilon = 0; common/dp.py)
    dp_epsilon: float = Field(0.0, ge=0)
    """privacy guard: each client's whole upload is (epsilon, delta)-DP, analytic
    Gaussian mechanism, for the methods that have one; refused for a method that
    uploads without one (README: Differential privacy lists both; 0: off)"""
    dp_delta: float = Field(1e-5, gt=0, lt=1)
    """delta of the privacy guard's guarantee"""
    dp_clip: float = Field(1.0, gt=0)
    """C, the L2 clip of each embedding a client releases (oscar, feddisc), of each
    example's gradient (lora's DP-SGD), of a description's move from its prompt
    (feddeo)"""
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
                f"{', '.join(ALL_STYLES)}, each optionally with '+' and one of "
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
        """``domains`` split at commas, in order."""
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
            seed=self.seed if self.partition_seed < 0 else self.partition_seed,
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
    lines, unknown = [], False
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<config>"
        if err["type"] == "extra_forbidden":
            unknown = True
            lines.append(f"unknown key {key!r} (value {err['input']!r})")
        else:
            lines.append(f"{key} = {err['input']!r}: {err['msg']}")
    if unknown:  # the known keys once, after every unknown one
        lines.append("known keys: " + ", ".join(known))
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
