"""The interface of a one-shot method, both halves of it.

A method is one folder ``methods/<name>/`` (``config_``, ``payload_``, ``client_``,
``server_<name>.py``) and one line in ``methods/__init__.py``. Its class says:

* client half: ``client_collect(job) -> ClientResult`` (Flower-free work on the
  node's data), optionally ``client_evaluate(job) -> metrics``;
* the wire: ``collect_type`` / ``evaluate_type`` (Flower message types) and
  ``payload_key`` (the ArrayRecord its payload module lays out), the first two
  taken from the payload module by the class keyword ``payload=`` (its
  ``COLLECT_TYPE`` and ``RECORD``), the client half by ``client=``;
* server half: ``check`` (fail fast before any client works), ``collect_content``
  (what goes down with the request), ``validate`` (reject one reply with a
  reason), ``server_work``, ``push_content``, ``summary`` (its lines of the report).

The round (``server_app/round.py``) and the ClientApp (``client_app/app.py``) know
methods only through this interface.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import torch
from flwr.app import RecordDict
from pydantic import BaseModel

from common import contract as C
from common.config import RunConfig
from common.contract import Reply
from common.datasets import ClientData, DatasetInfo
from common.device import resolve_device, resolve_dtype

QUERY_INFO = "query.info"
EVALUATE = "evaluate"

# ---------------------------------------------------------------- client half


@dataclass
class ClientJob:
    """Everything a client's work function gets; no Flower types in it."""

    cfg: RunConfig
    partition_id: int
    num_partitions: int
    data: ClientData
    config: dict[str, Any] = field(default_factory=dict)  # the server's instructions
    arrays: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # what this node uploaded earlier in the run (kept in the node's state)
    memory: dict[str, torch.Tensor] = field(default_factory=dict)
    # a SuperNode's node-config `classifier` (model-heterogeneous methods)
    node_classifier: str = ""
    # Flower's node id (a device with its own data has no partition id)
    node_id: int = 0

    @property
    def seed(self) -> int:
        """This client's seed: the run seed and its partition (or node) id.

        The server knows it too: it seeds reproducible work, never privacy
        noise (``common.dp.noise_rng``)."""
        who = self.partition_id if self.partition_id >= 0 else self.node_id % 1_000_003
        return self.cfg.seed * 1000 + who

    def meta(self) -> dict[str, Any]:
        """The envelope's description of this client's data (a device with its
        own data declares no partition: the round identifies it by its node)."""
        part = (
            {"partition-id": self.partition_id, "num-partitions": self.num_partitions}
            if self.partition_id >= 0
            else {}
        )
        return part | {
            "domain": self.data.domain,
            "num-classes": self.data.num_classes,
            "class-names": ",".join(self.data.class_names),
            "channels": self.data.channels,
        }


@dataclass
class ClientResult:
    """What a client sends up, before packing: the payload is one flat dict.

    Where a method reports ``client-s`` and ``num-examples`` but not
    ``client-s-per-image``, the cost per training example is added, so every
    method's client cost reads the same way in results.json."""

    metrics: dict[str, float]
    payload: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    half: bool = False  # send floating tensors as fp16

    def __post_init__(self) -> None:
        m = self.metrics
        if "client-s" in m and m.get("num-examples") and "client-s-per-image" not in m:
            m["client-s-per-image"] = m["client-s"] / m["num-examples"]


def classifier_accuracy(
    state: dict[str, torch.Tensor], arch: str, num_classes: int, data: ClientData
) -> float:
    """Accuracy of a classifier state dict on the client's held-out split."""
    from common.models import classifier_from_state
    from common.train import accuracy

    model = classifier_from_state(arch, state, data.channels, num_classes)
    return accuracy(model, data.test_images, data.test_labels)


def evaluate_classifier(job: ClientJob) -> dict[str, float]:
    """Accuracy of the pushed global classifier on the client's held-out split."""
    acc = classifier_accuracy(
        job.arrays[C.KEY_MODEL],
        str(job.config["arch"]),
        int(job.config["num-classes"]),
        job.data,
    )
    return {"num-test-examples": float(len(job.data.test_labels)), "accuracy": acc}


# ---------------------------------------------------------------- server half


@dataclass
class ServerOutput:
    """The result of the server work of one method."""

    model_state: dict[str, torch.Tensor] | None = None  # global classifier to push back
    arch: str = "cnn"
    timings: dict[str, float] = field(default_factory=dict)  # synthesize, train, merge
    samples: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific results
    push_arrays: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    push_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServerContext:
    """Validated config plus what the server learned about the federation."""

    cfg: RunConfig
    run_dir: Path
    info: DatasetInfo | None = None  # from the dataset registry, or the clients' vote
    # What the shared steps compute once per run (``initial.public_state``).
    memo: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        """Classes of the federation (0 while unknown)."""
        return self.info.num_classes if self.info else 0

    @property
    def class_names(self) -> list[str]:
        """Class names, in class-id order (empty while unknown)."""
        return list(self.info.class_names) if self.info else []

    @property
    def channels(self) -> int:
        """Image channels of the clients' data (1 while unknown)."""
        return self.info.channels if self.info else 1

    @property
    def max_upload_bytes(self) -> int:
        """``max-upload-mb`` in bytes: a larger reply is rejected."""
        return int(self.cfg.max_upload_mb * 2**20)

    @functools.cached_property
    def device(self) -> torch.device:
        """The server's device (``device``)."""
        return resolve_device(self.cfg.device)

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        """The server's floating precision (``precision`` on ``device``)."""
        return resolve_dtype(self.cfg.precision, self.device)

    @functools.cached_property
    def generator(self) -> Any:
        """The run's generator (``generator``, ``scheduler``), loaded once."""
        from common.generator import load_generator

        return load_generator(
            self.cfg.generator, self.cfg.scheduler, self.device, self.dtype
        )

    @functools.cached_property
    def sampling_generator(self) -> Any:
        """The generator the engine samples with: the UNet compiled (static
        shapes) when ``compile`` is set; the same modules otherwise."""
        if not self.cfg.compile:
            return self.generator
        import dataclasses

        return dataclasses.replace(
            self.generator, unet=torch.compile(self.generator.unet, dynamic=False)
        )

    @functools.cached_property
    def decoder(self) -> Any:
        """``decoder``: a tiny latent decoder instead of the generator's VAE."""
        if not self.cfg.decoder:
            return None
        from common.generator import load_decoder

        return load_decoder(self.cfg.decoder, self.device, self.dtype)

    @functools.cached_property
    def text_encoder(self) -> Any:
        """The run's text encoder (``text-encoder``), loaded once."""
        from common.text_encoder import load_text_encoder

        return load_text_encoder(self.cfg.text_encoder, self.device)

    @functools.cached_property
    def uncond(self) -> torch.Tensor:
        """The empty prompt's conditioning (classifier-free guidance)."""
        return self.text_encoder.encode([""], self.cfg.embedding)


class OneShotMethod:
    """Defaults shared by all methods; a method overrides what differs."""

    name: ClassVar[str] = ""  # its folder's name, "_" as "-" (set from the module)
    config: ClassVar[type[BaseModel] | None] = None  # its own keys (config_<name>.py)
    collect_type: ClassVar[str] = QUERY_INFO
    payload_key: ClassVar[str | None] = None
    payload_module: ClassVar[ModuleType | None] = None  # its payload_<name>.py
    evaluate_type: ClassVar[str | None] = EVALUATE  # None: nothing is pushed back
    # True where the client applies differential privacy to everything it uploads
    # when dp-epsilon > 0 (README, "Differential privacy"); the round refuses
    # dp-epsilon > 0 for a method that uploads without it. Its client module
    # says so (``PRIVATE_UPLOADS = True`` beside the mechanism).
    private_uploads: ClassVar[bool] = False

    def __init_subclass__(
        cls,
        payload: ModuleType | None = None,
        client: ModuleType | None = None,
        config: type[BaseModel] | None = None,
        **kwargs: Any,
    ) -> None:
        """Take the method from its folder: ``class Oscar(OneShotMethod,
        payload=payload_oscar, client=client_oscar, config=OscarConfig)`` in
        ``methods/oscar/server_oscar.py``.

        The name is the folder's (``fgl_instance``: ``"fgl-instance"``) for a
        class in ``<folder>/server_<folder>.py`` that sets none. ``payload``: its
        ``COLLECT_TYPE`` (the collect message's type) and ``RECORD`` (the
        ArrayRecord it lays out) become ``collect_type`` and ``payload_key``, the
        module itself ``payload_module``; ``client``: its ``collect`` (and
        ``evaluate``, where it has one) become ``client_collect`` (and
        ``client_evaluate``), its ``PRIVATE_UPLOADS`` ``private_uploads``;
        ``config``: the model of the method's own keys.
        """
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            parts = cls.__module__.split(".")
            if len(parts) > 1 and parts[-1] == f"server_{parts[-2]}":
                cls.name = parts[-2].replace("_", "-")
        if payload is not None:
            cls.payload_module = payload
            cls.collect_type = payload.COLLECT_TYPE
            cls.payload_key = payload.RECORD
        if client is not None:
            cls.client_collect = staticmethod(client.collect)  # type: ignore[method-assign]
            if hasattr(client, "evaluate"):
                cls.client_evaluate = staticmethod(client.evaluate)  # type: ignore[method-assign]
            cls.private_uploads = bool(getattr(client, "PRIVATE_UPLOADS", False))
        if config is not None:
            cls.config = config

    # ---- client half (Flower-free)
    @staticmethod
    def client_collect(job: ClientJob) -> ClientResult:
        """The client's work for the collect message (default: nothing but its
        example count); a method sets its ``client_<name>.collect``."""
        return ClientResult(metrics={"num-examples": float(len(job.data.train_labels))})

    @staticmethod
    def client_evaluate(job: ClientJob) -> dict[str, float]:
        """Metrics of what was pushed back (default: the global classifier's
        accuracy on the client's held-out split)."""
        return evaluate_classifier(job)

    # ---- server half
    def check(self, ctx: ServerContext) -> None:
        """Fail fast, before any client work, on a config the method cannot run."""

    def collect_content(self, ctx: ServerContext) -> RecordDict:
        """What goes down with the collect request (default: the method's name)."""
        content = RecordDict()
        content[C.KEY_CONFIG] = C.config_record({"method": self.name})
        return content

    def unpack(self, reply: Reply, ctx: ServerContext) -> Any:
        """One reply's upload, read and checked against this run (its payload
        module's ``unpack`` at the run's shapes and limits); raises
        ``PayloadError`` naming what is wrong. ``validate`` and ``server_work``
        both read uploads through it, so what was accepted is what is used.
        Default: nothing to read (``None``)."""
        return None

    def validate(self, reply: Reply, ctx: ServerContext) -> None:
        """Raise ``PayloadError`` to reject one client's reply (with the reason).

        Called on every reply at collection and again on every persisted upload
        when a run resumes; ``ctx.info`` is known by then. Default: ``unpack``
        (a method that checks more overrides this and calls ``super()``).
        """
        self.unpack(reply, ctx)

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """The server's work on the accepted replies: the global classifier (or
        what else is pushed back), timings, samples and the method's numbers."""
        return ServerOutput()

    def push_content(self, out: ServerOutput, ctx: ServerContext) -> RecordDict:
        """What goes down with the evaluate message: the config, the global
        classifier and ``out.push_arrays`` (fp16)."""
        content = RecordDict()
        content[C.KEY_CONFIG] = C.config_record(
            {"method": self.name, "arch": out.arch, "num-classes": ctx.num_classes}
            | out.push_config
        )
        if out.model_state is not None:
            content[C.KEY_MODEL] = C.to_array_record(out.model_state)
        for key, arrays in out.push_arrays.items():
            content[key] = C.to_array_record(arrays, half=True)
        return content

    def summary(self, replies: list[Reply]) -> dict[str, Any]:
        """The method's own entries of results.json (beyond ``ServerOutput.extra``)."""
        return {}


ClientFn = Callable[[ClientJob], ClientResult]
