"""What every dataset source shares: the dataset's description (``DatasetInfo``),
a client's data (``ClientData``), the run-config keys that shape a partition
(``DataArgs``), the global test set and the ``DatasetSource`` protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch

from .. import mnist_domains

# How a pool is split among clients (run-config key ``partition``).
Partition = Literal["iid", "dirichlet", "pathological", "domain"]

# Images per class and domain of the global test set by default (run-config key
# ``global-test-per-class``). 10 classes x 100 x 5 domains = 5,000 images of 16x16
# for mnist-domains: one image is 0.1 points of a domain's accuracy; built and
# evaluated (small CNN) in about 0.6 s on a 2-core CPU. Every method of a run, its
# clients and the centralized oracle read the run's value: one set per run.
GLOBAL_TEST_PER_CLASS = 100

# Metric names of a client that measures its own model on the global test set
# (a method without a global model, e.g. ``local``): overall, and per domain as
# ``global-accuracy/<domain>``.
GLOBAL_METRIC = "global-accuracy"
GLOBAL_SIZE_METRIC = "global-test-examples"

NO_GLOBAL_TEST = (
    "the dataset has no test split outside the clients' data (an image folder holds "
    "only the clients' own files; a Hugging Face dataset needs a 'test' split)"
)


@dataclass(frozen=True)
class DatasetInfo:
    """What server and clients know of a dataset without looking at the images.

    Parameters
    ----------
    name : str
        The run config's ``dataset`` value.
    class_names : tuple of str
        One name per class id.
    channels : int
        1 (grey) or 3 (RGB).
    domains : tuple of str
        The dataset's visual domains, ``()`` for a dataset without domains.
    digits : bool
        MNIST's digits, which have their own prompt templates and phrase bank.
    """

    name: str
    class_names: tuple[str, ...]
    channels: int = 1
    domains: tuple[str, ...] = ()
    # MNIST's digits have their own prompt templates and phrase bank
    digits: bool = False

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return len(self.class_names)

    def class_prompt(self, label: int) -> str:
        """The FGL-style prompt built from a class name alone."""
        if self.digits:
            return mnist_domains.class_name_prompt(label)
        return f"a photo of a {self.class_names[label]}"

    def phrase_bank(self) -> tuple[list[str], np.ndarray]:
        """Captions that retrieval captioning ranks: ``(texts, class ids)``."""
        if self.digits:
            texts, labels, _ = mnist_domains.phrase_bank(self.num_classes)
            return texts, labels
        texts = [self.class_prompt(c) for c in range(self.num_classes)]
        return texts, np.arange(self.num_classes, dtype=np.int64)

    def oracle_caption(self, label: int, domain: str) -> str:
        """The exact caption of an image (the reference captioning is measured to)."""
        if self.digits:
            return mnist_domains.caption(label, domain)
        return self.class_prompt(label)


@dataclass
class ClientData:
    """One client's private data: a training part and a held-out part of its domain.

    Images are float ``[N, C, S, S]`` in ``[-1, 1]``, labels int64 ``[N]``.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    domain: str
    info: DatasetInfo = field(
        default_factory=lambda: DatasetInfo(
            "mnist", mnist_domains.DIGIT_NAMES, digits=True
        )
    )

    @property
    def num_classes(self) -> int:
        """The number of classes of the dataset (not only those the client has)."""
        return self.info.num_classes

    @property
    def class_names(self) -> list[str]:
        """The dataset's class names, by class id."""
        return list(self.info.class_names)

    @property
    def channels(self) -> int:
        """Channels of the client's images."""
        return int(self.train_images.shape[1])


@dataclass(frozen=True)
class DataArgs:
    """The run-config keys that shape a client's partition."""

    dataset: str
    partition: str = "dirichlet"
    image_size: int = 16
    alpha: float = 0.5
    classes_per_client: int = 2
    domains: tuple[str, ...] = mnist_domains.DEFAULT_CLIENT_DOMAINS
    max_examples: int = 0
    test_fraction: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class GlobalTestSet:
    """The dataset's test split rendered in (or taken from) every participating
    domain, balanced over classes: the test set one-shot FL papers report on.

    ``images`` ``[N, C, S, S]`` in ``[-1, 1]``, ``labels`` ``[N]``,
    ``domain_index`` ``[N]`` (positions in ``domains``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    domain_index: torch.Tensor
    domains: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def score(self, predictions: torch.Tensor) -> tuple[float, dict[str, float]]:
        """Accuracy of ``predictions`` (class ids ``[N]``): overall and per domain."""
        if tuple(predictions.shape) != tuple(self.labels.shape):
            raise ValueError(
                f"predictions have shape {tuple(predictions.shape)}, the global test "
                f"set has {len(self)} labels"
            )
        hit = (predictions.cpu() == self.labels).float()
        per_domain = {
            d: float(hit[self.domain_index == k].mean())
            for k, d in enumerate(self.domains)
            if bool((self.domain_index == k).any())
        }
        return float(hit.mean()), per_domain

    def metrics(self, predictions: torch.Tensor) -> dict[str, float]:
        """``score`` as a client's flat metrics (``GLOBAL_METRIC`` and per domain)."""
        overall, per_domain = self.score(predictions)
        return {
            GLOBAL_METRIC: overall,
            GLOBAL_SIZE_METRIC: float(len(self)),
            **{f"{GLOBAL_METRIC}/{d}": a for d, a in per_domain.items()},
        }


class DatasetSource(Protocol):
    """One kind of dataset in the registry."""

    kind: str

    def matches(self, name: str) -> bool:
        """Whether this source loads the ``dataset`` value ``name``."""
        ...

    def info(self, args: DataArgs) -> DatasetInfo | None:
        """What the server may know without the clients (``None``: ask them)."""
        ...

    def load(
        self, args: DataArgs, partition_id: int, num_partitions: int
    ) -> ClientData:
        """Partition ``partition_id`` of ``num_partitions``, with a held-out split."""
        ...

    def federation_domains(
        self, args: DataArgs, num_partitions: int
    ) -> tuple[str, ...]:
        """The domains the partitions hold, as far as told without their images."""
        ...

    def public_pairs(
        self, args: DataArgs, n: int
    ) -> tuple[torch.Tensor, list[str]] | None:
        """Public images with captions (never a client's), or None."""
        ...

    def global_test(
        self, args: DataArgs, domains: tuple[str, ...], per_class: int
    ) -> GlobalTestSet | None:
        """The test split in every domain of ``domains``, ``per_class`` images per
        class and domain; ``None`` without a test split."""
        ...


def pil_to_tensor(im: Any, channels: int, size: int) -> torch.Tensor:
    """A PIL image in the clients' format: float ``[channels, size, size]`` in
    ``[-1, 1]``, converted to grey (``channels=1``) or RGB and resized."""
    im = im.convert("L" if channels == 1 else "RGB").resize((size, size))
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    t = torch.as_tensor(arr)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)
