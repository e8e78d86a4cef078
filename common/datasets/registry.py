"""The registry of dataset sources and what callers ask of it: a dataset's
description, a client's partition, the global test set, public pairs."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .base import (
    ClientData,
    DataArgs,
    DatasetInfo,
    DatasetSource,
    GlobalTestSet,
)
from .huggingface import HuggingFaceSource
from .image_folder import ImageFolderSource
from .mnist import MnistSource

# The registry: the first source that matches a ``dataset`` value loads it.
DATASETS: tuple[DatasetSource, ...] = (
    MnistSource(),
    HuggingFaceSource(local=True),
    ImageFolderSource(),
    HuggingFaceSource(local=False),
)


def get_source(name: str) -> DatasetSource:
    """The first source of ``DATASETS`` that matches the ``dataset`` value ``name``."""
    for src in DATASETS:
        if src.matches(name):
            return src
    raise ValueError(f"dataset={name!r}: no dataset source matches")  # unreachable


def dataset_info(args: DataArgs) -> DatasetInfo | None:
    """What the server may know without the clients (``None``: ask them)."""
    return get_source(args.dataset).info(args)


def known_domains(info: DatasetInfo | None) -> tuple[str, ...]:
    """The dataset's domains; one, ``plain``, for a dataset without domains."""
    return info.domains if info is not None and info.domains else ("plain",)


def participating_domains(
    info: DatasetInfo | None, reported: Iterable[Any]
) -> tuple[str, ...]:
    """The dataset's domains that some client reported, in the dataset's order.

    ``reported`` is client input (the replies' meta ``domain``): only values equal
    to a known domain count, so nothing a client writes reaches a file name or a
    renderer.
    """
    seen = {d for d in reported if isinstance(d, str)}
    return tuple(d for d in known_domains(info) if d in seen)


def federation_domains(args: DataArgs, num_partitions: int) -> tuple[str, ...]:
    """The domains the ``num_partitions`` partitions hold, as far as the dataset
    tells without their images (a client's view of the whole federation)."""
    return get_source(args.dataset).federation_domains(args, num_partitions)


def global_test_set(
    args: DataArgs, domains: Sequence[str], per_class: int
) -> GlobalTestSet | None:
    """The dataset's test split in every domain of ``domains``, ``per_class``
    images per class and domain, drawn from ``args.seed``; ``None`` where the
    dataset has no test split the caller can read (``NO_GLOBAL_TEST``).

    MNIST: the same test digits in every domain, so domains compare directly.
    Cached: server and in-process clients share one copy (do not modify it).
    """
    # 1. Check inputs
    if per_class < 1:
        raise ValueError(f"per_class={per_class} must be >= 1")
    domains = tuple(domains)
    if not domains or len(set(domains)) != len(domains):
        raise ValueError(f"domains={domains!r}: give at least one domain, each once")
    return _global_test_set(args, domains, per_class)


@functools.lru_cache(maxsize=4)
def _global_test_set(
    args: DataArgs, domains: tuple[str, ...], per_class: int
) -> GlobalTestSet | None:
    src = get_source(args.dataset)
    info = src.info(args)
    if info is None:
        return None
    unknown = [d for d in domains if d not in known_domains(info)]
    if unknown:
        raise ValueError(
            f"domains {unknown} are not domains of dataset={args.dataset!r} "
            f"({', '.join(known_domains(info))})"
        )
    return src.global_test(args, domains, per_class)


def public_pairs(
    args: DataArgs, n: int = 2000
) -> tuple[torch.Tensor, list[str]] | None:
    """Up to ``n`` public (image, caption) pairs the server may use, or None."""
    return get_source(args.dataset).public_pairs(args, n)


def load_client_data(
    dataset: str,
    partition: str,
    partition_id: int,
    num_partitions: int,
    **kwargs: Any,
) -> ClientData:
    """Load one client's partition of ``dataset`` with a held-out split.

    Parameters
    ----------
    dataset : str
        The run config's ``dataset`` value (see ``common.datasets``).
    partition : str
        iid, dirichlet, pathological or domain.
    partition_id, num_partitions : int
        Which partition of how many; ``0 <= partition_id < num_partitions``.
    **kwargs
        The other fields of ``DataArgs`` (``image_size``, ``alpha``, ...).
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id={partition_id} must be in [0, num-partitions={num_partitions})"
        )
    args = DataArgs(dataset, partition, **kwargs)
    return get_source(dataset).load(args, partition_id, num_partitions)
